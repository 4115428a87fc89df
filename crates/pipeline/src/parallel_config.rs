//! How a run lays a model out on virtual ranks (`parallel:`): the
//! expert-parallel layout ([`ExpertParallel`]: contiguous expert blocks,
//! replicas, the reduction order) and the tensor-parallel split, each
//! checked against the model's sizes when it is set (`ModelConfig`'s
//! `set_expert_parallel`, `set_tensor_parallel` store them). A property of
//! the run, not of the checkpoint
//! (docs/decisions/2026-12-07-expert-parallel-plan.md).

/// How a run splits the routed experts across expert-parallel ranks
/// (virtual ranks on one backend; docs/decisions/2026-12-07-expert-parallel-plan.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpertParallel {
    /// R: ranks, each holding E / R contiguous experts.
    pub ranks: usize,
    /// Extra copies of experts: (logical expert, the rank holding the
    /// copy). A replicated expert's tokens are served by its last copy
    /// listed (every rank agreeing).
    pub replicas: Vec<(usize, usize)>,
    /// moe_ffn_out reduces the ranks' partial sums in rank order (as
    /// engines do), else sums each token's slots in slot order (the
    /// one-rank sum to the bit).
    pub rank_sum: bool,
}

impl ExpertParallel {
    /// The rank holding expert `e` of `experts` (its home block).
    pub fn rank_of(&self, e: usize, experts: usize) -> usize {
        e / (experts / self.ranks)
    }

    /// The rank that serves expert `e`'s tokens: its last replica's, else
    /// its home rank.
    pub fn server(&self, e: usize, experts: usize) -> usize {
        self.replicas.iter().rev().find(|(x, _)| *x == e).map_or_else(|| self.rank_of(e, experts), |(_, r)| *r)
    }

    /// The layout of `ranks` ranks over `experts` experts (of a model of
    /// `architecture`, for messages) with `replicas` (expert, rank) copies,
    /// reduced as `rank_sum` says; None for one rank (no split). Err (the
    /// reason, with the valid counts) when `ranks` is 0, there are no
    /// experts, `ranks` does not divide them, or a replica is outside the
    /// layout or on its expert's home rank.
    pub fn checked(
        experts: usize,
        architecture: &str,
        ranks: usize,
        rank_sum: bool,
        replicas: &[(usize, usize)],
    ) -> Result<Option<Self>, String> {
        let e = experts;
        if e == 0 {
            return Err(format!("{architecture} has no routed experts to split across ranks"));
        }
        if ranks == 0 || !e.is_multiple_of(ranks) {
            let valid: Vec<String> = (1..=e).filter(|r| e.is_multiple_of(*r)).map(|r| r.to_string()).collect();
            return Err(format!(
                "{ranks} expert-parallel ranks cannot split {e} experts evenly (valid: {})",
                valid.join(", ")
            ));
        }
        let layout = Self { ranks, rank_sum, replicas: replicas.to_vec() };
        for &(x, r) in replicas {
            if x >= e || r >= ranks {
                return Err(format!("replica (expert: {x}, rank: {r}) is outside {e} experts on {ranks} ranks"));
            }
            if layout.rank_of(x, e) == r {
                return Err(format!("replica (expert: {x}, rank: {r}): rank {r} holds expert {x} already"));
            }
        }
        Ok((ranks > 1).then_some(layout))
    }
}

/// Whether `ranks` tensor-parallel ranks split every one of `widths`
/// (named sizes: heads, MLP widths) evenly; Err (with them and the valid
/// counts) where not, or where `ranks` is 0.
pub fn check_tensor_split(ranks: usize, widths: &[(&str, usize)]) -> Result<(), String> {
    let divides = |r: usize| r > 0 && widths.iter().all(|(_, w)| w.is_multiple_of(r));
    if divides(ranks) {
        return Ok(());
    }
    let limit = widths.iter().map(|(_, w)| *w).min().unwrap_or(1);
    let valid: Vec<String> = (1..=limit).filter(|r| divides(*r)).map(|r| r.to_string()).collect();
    let what: Vec<String> = widths.iter().map(|(n, w)| format!("{w} {n}")).collect();
    Err(format!("{ranks} tensor-parallel ranks cannot split {} evenly (valid: {})", what.join(", "), valid.join(", ")))
}
