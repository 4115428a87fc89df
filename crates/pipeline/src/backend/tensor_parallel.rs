//! Tensor-parallel ranks' operations, a backend capability
//! ([`super::Backend::tensor_parallel`]): the row-split projections
//! (o_proj, the dense and shared experts' down_proj), whose input columns
//! are split across the ranks and whose partial sums are all-reduced in
//! rank order. Column-split projections (q, k, v, gate, up) compute each
//! output column whole on one rank: the same bits as one rank, so they
//! need nothing here. Ranks are virtual (one backend computes every
//! rank's part); the CPU's arithmetic is the reference.

use super::Slot;
use crate::error::Result;
use crate::weights::WeightId;

/// The operations of tensor-parallel ranks.
pub trait TensorParallelOps {
    /// `out = input · weightᵀ` with the input's columns split into `ranks`
    /// contiguous blocks: each rank's partial product rounded to f32, the
    /// partials added in rank order; then `bias`, once (a row-split
    /// projection's bias belongs to no rank's partial).
    fn linear_row_split(
        &mut self,
        input: Slot,
        weight: WeightId,
        bias: Option<WeightId>,
        ranks: usize,
        out: Slot,
    ) -> Result<()>;
}
