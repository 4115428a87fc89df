//! The CPU's grouped router operation: each row routed by
//! [`GroupedTopK::route`] (grouped_routing.rs), the reference arithmetic.

use super::CpuBackend;
use super::grouped_routing::GroupedTopK;
use crate::backend::Slot;
use crate::backend::grouped_router::GroupedRouting;
use crate::error::{PipelineError, Result};
use crate::tensor::HostTensor;
use crate::weights::WeightId;

impl GroupedRouting for CpuBackend {
    fn route_grouped(
        &mut self,
        logits: Slot,
        bias: WeightId,
        router: &GroupedTopK,
        weights_out: Slot,
        indices_out: Slot,
    ) -> Result<()> {
        let bias = self.weight(bias);
        let (rows, width, x) = self.rows(logits)?;
        router.check(width).map_err(PipelineError::BadInput)?;
        if bias.len() != width {
            return Err(PipelineError::BadInput(format!(
                "the router's correction bias has {} entries for {width} experts",
                bias.len()
            )));
        }
        let k = router.top_k;
        let (mut weights, mut indices) = (Vec::with_capacity(rows * k), Vec::with_capacity(rows * k));
        for row in x.chunks(width) {
            let routed = router.route_as(row, &bias, self.bug);
            weights.extend_from_slice(&routed.weights);
            indices.extend_from_slice(&routed.experts);
        }
        self.set(weights_out, HostTensor::f32(vec![rows, k], weights));
        self.set(indices_out, HostTensor::i32(vec![rows, k], indices));
        Ok(())
    }
}
