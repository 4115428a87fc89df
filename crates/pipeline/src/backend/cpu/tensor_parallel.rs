//! The CPU's tensor-parallel ranks ([`TensorParallelOps`]): a row-split
//! projection's partial products per rank, added in rank order
//! (`math::matmul_t_split`), then the projection's bias once.

use super::CpuBackend;
use super::known_bugs::KnownBug;
use crate::backend::Backend;
use crate::backend::Slot;
use crate::backend::tensor_parallel::TensorParallelOps;
use crate::error::{PipelineError, Result};
use crate::tensor::HostTensor;
use crate::weights::WeightId;

impl TensorParallelOps for CpuBackend {
    fn linear_row_split(
        &mut self,
        input: Slot,
        weight: WeightId,
        bias: Option<WeightId>,
        ranks: usize,
        out: Slot,
    ) -> Result<()> {
        let (rows, width, x) = self.rows(input)?;
        let w = self.store.get(weight);
        self.check_width(input, width, w.row_len(), &format!("weight `{}`", w.describe()))?;
        if ranks == 0 || !width.is_multiple_of(ranks) {
            return Err(PipelineError::BadInput(format!(
                "{ranks} tensor-parallel ranks cannot split `{input}`'s {width} columns"
            )));
        }
        let inputs: Vec<&[f32]> = x.chunks(width).collect();
        let n = w.shape[0];
        let data = self.pool.install(|| super::math::matmul_t_split(&inputs, w, self.contract.weights, ranks));
        self.set(out, HostTensor::f32(vec![rows, n], data));
        let Some(bias) = bias else { return Ok(()) };
        // The bias once after the reduction; with the bug, once in every
        // rank's partial, so the sum holds it `ranks` times.
        let times = if self.bug == Some(KnownBug::BiasOnEveryRank) { ranks } else { 1 };
        for _ in 0..times {
            self.add_bias(out, &[bias], out)?;
        }
        Ok(())
    }
}
