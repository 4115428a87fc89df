//! The `parallel:` field of a config (virtual expert- and tensor-parallel
//! ranks for every pass of a command) and how it lays a loaded model out
//! ([`apply_parallel`]: checked against the model and the backends).

use serde::Deserialize;

use crate::backend_spec::BackendSpec;

/// `parallel: (experts: R, tensor: T, combine: SlotOrder | RankSum,
/// replicas: [...])`: the routed experts split across R virtual
/// expert-parallel ranks (contiguous blocks), each MoE layer adding the
/// per-rank stages moe_expert_map, moe_dispatch and moe_combine; the
/// row-split projections split across T tensor-parallel ranks (their
/// partial sums added in rank order). Every pass of the command runs so
/// (a bisect's reference and target alike).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParallelSpec {
    /// R: expert-parallel ranks (a divisor of the model's experts; default
    /// 1).
    #[serde(default = "one_rank")]
    pub experts: usize,
    /// T: tensor-parallel ranks splitting the row-split projections (a
    /// divisor of the heads and the MLP widths; default 1).
    #[serde(default = "one_rank")]
    pub tensor: usize,
    /// How moe_ffn_out reduces the ranks' work (default SlotOrder).
    #[serde(default)]
    pub combine: CombineOrder,
    /// Extra copies of experts on other ranks (default none); a replicated
    /// expert's tokens go to its last copy listed.
    #[serde(default)]
    pub replicas: Vec<ReplicaSpec>,
}

fn one_rank() -> usize {
    1
}

/// `(expert: e, rank: r)`: a copy of logical expert e on rank r.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaSpec {
    /// The logical expert copied.
    pub expert: usize,
    /// The rank holding the copy (not the expert's home rank).
    pub rank: usize,
}

/// How moe_ffn_out sums the work of expert-parallel ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum CombineOrder {
    /// Each token's slots in slot order, as one rank sums them: the
    /// one-rank result to the bit (what proves the ranks' machinery).
    #[default]
    SlotOrder,
    /// The ranks' partial sums (moe_combine) added in rank order, as an
    /// all-reduce of engines does: the last bits differ from one rank's.
    RankSum,
}

/// Lays the model out on the virtual ranks `parallel` names; Err (the
/// message, `parallel: ...`) where the model or a backend cannot.
pub(crate) fn apply_parallel(
    config: &mut pipeline::ModelConfig,
    parallel: &ParallelSpec,
    backends: &[&BackendSpec],
) -> std::result::Result<(), String> {
    let rank_sum = parallel.combine == CombineOrder::RankSum;
    let replicas: Vec<(usize, usize)> = parallel.replicas.iter().map(|r| (r.expert, r.rank)).collect();
    if parallel.experts != 1 || !replicas.is_empty() {
        config.set_expert_parallel(parallel.experts, rank_sum, &replicas).map_err(|e| format!("parallel: {e}"))?;
    }
    config.set_tensor_parallel(parallel.tensor).map_err(|e| format!("parallel: {e}"))?;
    match backends.iter().find(|b| b.is_cuda()).filter(|_| parallel.tensor > 1) {
        Some(gpu) => Err(format!(
            "parallel: tensor-parallel ranks run on the CPU backends (Cpu, CpuEmulating, Cuda(dtype: F64)) for now, not {gpu}"
        )),
        None => Ok(()),
    }
}
