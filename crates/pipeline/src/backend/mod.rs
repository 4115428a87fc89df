//! The [`Backend`] trait: one method per operation the stage systems need.
//! Activations live inside the backend, one buffer per stage (the stage's
//! output), addressed by [`SaveTensorStage`]; weights are addressed by
//! [`WeightId`]. Systems call these methods and never ask which backend
//! they talk to. What only some backends can do is an optional capability
//! they offer or not: recording steps ([`StepRecorder`]) and preparing
//! memory of their own ([`DeviceSetup`]).

pub mod contract;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device_setup;
pub mod expert_parallel;
pub mod grouped_router;
pub mod mla;
pub mod oss;
pub mod recorder;
pub mod tensor_parallel;

pub use device_setup::DeviceSetup;
pub use recorder::{StepGraph, StepRecorder};

use stage_types::SaveTensorStage;

use crate::error::{PipelineError, Result};
use crate::tensor::{HostTensor, PendingTensor};
use crate::weights::WeightId;

/// The greedy choice, shared by the backends: index of the largest value (lowest index on ties; NaN never wins; 0 if
/// all are NaN).
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    let mut best_value = f32::NEG_INFINITY;
    for (i, &x) in row.iter().enumerate() {
        if x > best_value {
            best = i;
            best_value = x;
        }
    }
    best
}

/// Names an activation buffer: the output of that stage in the current
/// step and layer.
pub type Slot = SaveTensorStage;

/// Per-head RMSNorm of the q and k parts of a qkv row (Qwen3 QK-norm).
#[derive(Debug, Clone, Copy)]
pub struct QkNormArgs {
    /// nh.
    pub q_heads: usize,
    /// nkv.
    pub kv_heads: usize,
    /// hd.
    pub head_dim: usize,
    /// q_norm weight, [hd].
    pub q_weight: WeightId,
    /// k_norm weight, [hd].
    pub k_weight: WeightId,
    /// RMSNorm epsilon.
    pub eps: f64,
}

/// Which heads of a row RoPE rotates, and its base.
#[derive(Debug, Clone, Copy)]
pub struct RopeArgs {
    /// First column of the first head.
    pub col_start: usize,
    /// Heads rotated.
    pub heads: usize,
    /// hd.
    pub head_dim: usize,
    /// RoPE base.
    pub theta: f64,
}

/// The shared expert's term of an MoE block's sum: its output `[T,H]`,
/// weighted per token by `weight` (`[T,1]`, the sigmoid gate's value) or
/// added as is when None.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedTerm {
    /// The shared expert's output, `[T,H]`.
    pub out: Slot,
    /// Its weight per token, `[T,1]`, if gated.
    pub weight: Option<Slot>,
}

impl SharedTerm {
    /// Checks a `moe_combine`'s operand shapes against each other, as
    /// `shape_of` gives them: `expert_out` `[T,k,H]`, `weights` `[T,k]`, this
    /// term's output `[T,H]` and weight `[T,1]`. Returns (T, k, H).
    pub(crate) fn combine_shapes(
        expert_out: Slot,
        weights: Slot,
        shared: Option<SharedTerm>,
        shape_of: impl Fn(Slot) -> Result<Vec<usize>>,
    ) -> Result<(usize, usize, usize)> {
        let (et, wt) = (shape_of(expert_out)?, shape_of(weights)?);
        if et.len() != 3 || wt != et[..2] {
            return Err(PipelineError::BadInput(format!(
                "moe_combine needs [T,k,H] outputs and [T,k] weights, got {et:?} and {wt:?}"
            )));
        }
        let (t_len, k, h) = (et[0], et[1], et[2]);
        if let Some(term) = shared {
            let values = shape_of(term.out)?;
            if values != [t_len, h] {
                return Err(PipelineError::BadInput(format!(
                    "moe_combine's shared expert output `{}` is {values:?}, not [{t_len}, {h}]",
                    term.out
                )));
            }
            if let Some(slot) = term.weight {
                let w = shape_of(slot)?;
                if w != [t_len, 1] {
                    return Err(PipelineError::BadInput(format!(
                        "moe_combine's shared expert weight `{slot}` is {w:?}, not [{t_len}, 1]"
                    )));
                }
            }
        }
        Ok((t_len, k, h))
    }
}

/// Geometry of attention for one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    /// nh.
    pub heads: usize,
    /// nkv; query head h reads kv head h / (nh / nkv).
    pub kv_heads: usize,
    /// hd.
    pub head_dim: usize,
}

/// The operations of a forward pass. Every method reads named input slots
/// and writes one output slot (replacing its shape and contents).
pub trait Backend: Send + Sync + 'static {
    /// Short name for manifests and messages, e.g. `cpu`.
    fn name(&self) -> &'static str;

    /// Activation dtype, e.g. `f32`.
    fn dtype(&self) -> &'static str;

    /// The rounding points this backend's arithmetic promises (see
    /// [`contract::NumericContract`]); bisect emulates the target's on the
    /// CPU to know each stage's expected error. By default the CPU
    /// reference's own.
    fn numeric_contract(&self) -> contract::NumericContract {
        contract::NumericContract::REFERENCE
    }

    /// Starts a step computing `tokens` at positions `start_position..`.
    /// Truncates the KV caches to `start_position` entries; fails if they
    /// hold fewer.
    fn begin_step(&mut self, tokens: &[u32], start_position: usize) -> Result<()>;

    /// The step recorder, if this backend records steps as graphs and
    /// copies what observers read itself (see [`StepRecorder`]); None: every
    /// step runs its stage systems eagerly.
    fn recorder(&mut self) -> Option<&mut dyn StepRecorder> {
        None
    }

    /// Preparation of the backend's own memory before a run, if it computes
    /// in memory of its own (see [`DeviceSetup`]); None: it computes in the
    /// host's, which the caller checks.
    fn device_setup(&mut self) -> Option<&mut dyn DeviceSetup> {
        None
    }

    /// Multi-head latent attention's operations, if this backend has them
    /// (see [`mla::MlaOps`]); None: an MLA model is refused.
    fn mla(&mut self) -> Option<&mut dyn mla::MlaOps> {
        None
    }

    /// gpt-oss's operations, if this backend has them (see
    /// [`oss::OssOps`]); None: a gpt-oss model is refused.
    fn oss(&mut self) -> Option<&mut dyn oss::OssOps> {
        None
    }

    /// Expert-parallel ranks' dispatch, partial sums and reduction, if
    /// this backend has them (see [`expert_parallel::ExpertParallelOps`]);
    /// None: a run with `parallel:` ranks is refused.
    fn expert_parallel(&mut self) -> Option<&mut dyn expert_parallel::ExpertParallelOps> {
        None
    }

    /// Tensor-parallel ranks' row-split projections, if this backend has
    /// them (see [`tensor_parallel::TensorParallelOps`]); None: a run with
    /// `parallel: (tensor: T)` is refused.
    fn tensor_parallel(&mut self) -> Option<&mut dyn tensor_parallel::TensorParallelOps> {
        None
    }

    /// DeepSeek's grouped router, if this backend has it (see
    /// [`grouped_router::GroupedRouting`]); None: such a model is refused.
    fn grouped_router(&mut self) -> Option<&mut dyn grouped_router::GroupedRouting> {
        None
    }

    /// `out[t] = table[tokens[t]]`.
    fn embedding(&mut self, table: WeightId, out: Slot) -> Result<()>;

    /// `out = x * rsqrt(mean(x²) + eps) * weight`, per row.
    fn rms_norm(&mut self, input: Slot, weight: WeightId, eps: f64, out: Slot) -> Result<()>;

    /// `out = input · [w0; w1; ...]ᵀ`: the outputs of each weight,
    /// concatenated along features.
    fn linear(&mut self, input: Slot, weights: &[WeightId], out: Slot) -> Result<()>;

    /// `out = input + [b0, b1, ...]` per row.
    fn add_bias(&mut self, input: Slot, biases: &[WeightId], out: Slot) -> Result<()>;

    /// Per-head RMSNorm over hd of the first nh heads (q, with q_weight)
    /// and the next nkv heads (k, with k_weight) of each input row.
    fn qk_norm(&mut self, input: Slot, args: QkNormArgs, out: Slot) -> Result<()>;

    /// NeoX split-half RoPE of `args.heads` heads of `args.head_dim`
    /// starting at column `args.col_start` of each input row; dim i pairs
    /// with i + hd/2, angle = position * theta^(-2i/hd).
    fn rope(&mut self, input: Slot, args: RopeArgs, out: Slot) -> Result<()>;

    /// Appends this step's keys (all columns of `k`) and values (nkv*hd
    /// columns of `v` from `v_col`) to the cache of `layer`.
    fn append_kv(&mut self, layer: usize, k: Slot, v: Slot, v_col: usize) -> Result<()>;

    /// `out[h,t,p] = q[t,h]·k[p,h/g] / sqrt(hd)` over the cached keys of
    /// `layer`, 0 where p > position of t (causal mask).
    fn attn_scores(&mut self, layer: usize, q: Slot, shape: AttentionShape, out: Slot) -> Result<()>;

    /// Causal softmax over p of `[nh,T,P]` scores (masked entries 0).
    fn attn_softmax(&mut self, scores: Slot, out: Slot) -> Result<()>;

    /// `out[t,h] = Σ_p probs[h,t,p] · v[p,h/g]` over the cached values of
    /// `layer`.
    fn attention(&mut self, layer: usize, probs: Slot, shape: AttentionShape, out: Slot) -> Result<()>;

    /// `out = a + b`.
    fn add(&mut self, a: Slot, b: Slot, out: Slot) -> Result<()>;

    /// `out = x * sigmoid(x)`.
    fn silu(&mut self, input: Slot, out: Slot) -> Result<()>;

    /// `out = a * b`.
    fn mul(&mut self, a: Slot, b: Slot, out: Slot) -> Result<()>;

    /// `out = 1 / (1 + exp(-x))`.
    fn sigmoid(&mut self, input: Slot, out: Slot) -> Result<()>;

    /// `out = silu(gate) * up`.
    fn swiglu(&mut self, gate: Slot, up: Slot, out: Slot) -> Result<()>;

    /// Softmax over all experts, top-k (descending, ties to the lower id),
    /// divided by their sum when `normalise`: weights `[T,k]` and ids
    /// `[T,k]` int32.
    fn router_top_k(
        &mut self,
        logits: Slot,
        k: usize,
        normalise: bool,
        weights_out: Slot,
        indices_out: Slot,
    ) -> Result<()>;

    /// Per selected expert projection: `out[t,j] = W[indices[t,j]] · x`
    /// where x is `input[t]` for a `[T,H]` input or `input[t,j]` for a
    /// `[T,k,I]` input. `out` is `[T,k,N]`.
    fn expert_linear(&mut self, input: Slot, indices: Slot, experts: &[WeightId], out: Slot) -> Result<()>;

    /// `out[t] = Σ_j weights[t,j] · expert_out[t,j]`, plus
    /// `shared.weight[t] · shared.out[t]` (or `shared.out[t]`) when the
    /// block has a shared expert, in one sum.
    fn moe_combine(&mut self, expert_out: Slot, weights: Slot, shared: Option<SharedTerm>, out: Slot) -> Result<()>;

    /// Copies a slot to the host. Fails if the slot holds nothing.
    fn read(&mut self, slot: Slot) -> Result<HostTensor>;

    /// Starts copying a slot to the host without waiting for it (capture
    /// uses this). The default reads at once; the CUDA backend copies into
    /// pinned host memory on a separate stream, so the forward pass goes on
    /// while the copy runs. What is computed is unchanged either way.
    fn read_async(&mut self, slot: Slot) -> Result<PendingTensor> {
        self.read(slot).map(PendingTensor::ready)
    }

    /// Replaces a slot's contents from the host.
    fn write(&mut self, slot: Slot, tensor: &HostTensor) -> Result<()>;

    /// The KV cache of `layer`: keys and values, `[len, nkv*hd]` each.
    fn kv_cache(&mut self, layer: usize) -> Result<(HostTensor, HostTensor)>;

    /// Replaces the KV cache of `layer` (both `[len, nkv*hd]`).
    fn set_kv_cache(&mut self, layer: usize, keys: &HostTensor, values: &HostTensor) -> Result<()>;

    /// Index of the largest value in the last row of a 2-D f32 slot (the
    /// greedy next token; the lowest index on ties, NaN never wins).
    fn argmax_last_row(&mut self, slot: Slot) -> Result<u32>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_ignores_nan_and_prefers_the_lower_index() {
        assert_eq!(argmax(&[1.0, 5.0, 5.0, f32::NAN]), 1);
        assert_eq!(argmax(&[f32::NAN, f32::NAN]), 0);
    }
}
