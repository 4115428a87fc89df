//! Expert-parallel ranks' operations, a backend capability
//! ([`super::Backend::expert_parallel`]): the dispatch of each token's
//! slots to the ranks holding their experts, each rank's partial sum, and
//! the reduction into moe_ffn_out (docs/decisions/2026-12-07-expert-parallel-plan.md).
//! Ranks here are virtual: one backend computes every rank's part, each
//! into its own rows of the per-rank stages, with the reduction order a
//! multi-GPU run would have. The expert projections themselves are
//! per-slot dot products, the same bits on whichever rank computes them,
//! so the expert stages keep their one-rank shapes and values. The CPU's
//! arithmetic (cpu/expert_parallel.rs) is the reference.

use super::{SharedTerm, Slot};
use crate::error::Result;
use crate::parallel_config::ExpertParallel;

/// The operations of expert-parallel ranks.
pub trait ExpertParallelOps {
    /// moe_expert_map: for each rank r, the rank that serves each of the
    /// `experts` logical experts in r's view of `layout` (the replica's
    /// rank for a replicated expert), `[R,E]` int32.
    fn expert_map(&mut self, layout: &ExpertParallel, experts: usize, out: Slot) -> Result<()>;

    /// moe_dispatch: for each rank r and slot (t, j) of `indices` (`[T,k]`
    /// expert ids), the slot's row in rank r's receive buffer (the rank's
    /// slots in (t, j) order) where r serves expert `indices[t,j]` in its
    /// own view (`map[r][e] == r`), else -1: `[R,T,k]` int32. Ranks whose
    /// views disagree serve a slot twice, or never.
    fn dispatch(&mut self, indices: Slot, map: Slot, out: Slot) -> Result<()>;

    /// moe_combine: for each rank r and token t, `Σ_j weights[t,j] ·
    /// expert_out[t,j]` over the slots r received (`dispatch[r,t,j] >=
    /// 0`), in slot order, `[R,T,H]` (0 where r received none of t's).
    fn combine_partials(&mut self, expert_out: Slot, weights: Slot, dispatch: Slot, out: Slot) -> Result<()>;

    /// moe_ffn_out of expert-parallel ranks, plus the shared expert's term:
    /// with `partials` (moe_combine), their sum over the ranks in rank
    /// order; without, each token's received slots summed in slot order
    /// (a slot each rank received counted once per rank), which for a
    /// correct dispatch is the one-rank sum to the bit.
    fn reduce(
        &mut self,
        expert_out: Slot,
        weights: Slot,
        dispatch: Slot,
        partials: Option<Slot>,
        shared: Option<SharedTerm>,
        out: Slot,
    ) -> Result<()>;
}

/// R of a dispatch of `shape` `[R,T,k]` over `[T,k]` slots; Err naming
/// `dispatch` otherwise.
pub(crate) fn dispatch_ranks(shape: &[usize], dispatch: Slot, t_len: usize, k: usize) -> Result<usize> {
    match shape {
        [r, t, kk] if *t == t_len && *kk == k => Ok(*r),
        _ => {
            Err(crate::error::PipelineError::BadInput(format!("`{dispatch}` is {shape:?}, expected [R, {t_len}, {k}]")))
        }
    }
}
