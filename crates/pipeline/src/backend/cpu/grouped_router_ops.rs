//! The CPU's grouped router operation: each row routed by
//! [`GroupedTopK::route`] (grouped_routing.rs), the reference arithmetic.

use super::CpuBackend;
use super::grouped_routing::GroupedTopK;
use crate::backend::Slot;
use crate::backend::grouped_router::{GroupedRouting, GroupedSlots};
use crate::error::{PipelineError, Result};
use crate::tensor::HostTensor;
use crate::weights::WeightId;

impl GroupedRouting for CpuBackend {
    fn route_grouped(&mut self, logits: Slot, bias: WeightId, router: &GroupedTopK, out: GroupedSlots) -> Result<()> {
        let bias = self.weight(bias);
        let (rows, width, x) = self.rows(logits)?;
        router.check(width).map_err(PipelineError::BadInput)?;
        if bias.len() != width {
            return Err(PipelineError::BadInput(format!(
                "the router's correction bias has {} entries for {width} experts",
                bias.len()
            )));
        }
        let (k, n_group, kept) = (router.top_k, router.n_group, router.topk_group);
        let (mut weights, mut indices) = (Vec::with_capacity(rows * k), Vec::with_capacity(rows * k));
        let (mut group_scores, mut groups) = (Vec::with_capacity(rows * n_group), Vec::with_capacity(rows * kept));
        for row in x.chunks(width) {
            let routed = router.route_as(row, &bias, self.bug);
            weights.extend_from_slice(&routed.weights);
            indices.extend_from_slice(&routed.experts);
            group_scores.extend(routed.group_scores.iter().map(|&s| s as f32));
            groups.extend_from_slice(&routed.groups);
        }
        self.set(out.group_scores, HostTensor::f32(vec![rows, n_group], group_scores));
        self.set(out.groups, HostTensor::i32(vec![rows, kept], groups));
        self.set(out.weights, HostTensor::f32(vec![rows, k], weights));
        self.set(out.indices, HostTensor::i32(vec![rows, k], indices));
        Ok(())
    }
}
