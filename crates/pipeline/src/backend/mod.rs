//! The [`Backend`] trait: one method per operation the stage systems need.
//! Activations live inside the backend, one buffer per stage (the stage's
//! output), addressed by [`SaveTensorStage`]; weights are addressed by
//! [`WeightId`]. Systems call these methods and never ask which backend
//! they talk to.

pub mod contract;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

use stage_types::SaveTensorStage;

use crate::error::Result;
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

/// How the backend runs the step begun last: decode steps can be recorded
/// once as a CUDA graph and replayed (same kernels, same arguments read
/// from device memory, so the same bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepGraph {
    /// Run the stage systems, each launching its own work.
    Eager,
    /// Run the stage systems between [`Backend::begin_graph_capture`] and
    /// [`Backend::end_graph_capture`]; nothing executes until the graph
    /// is replayed.
    Capture,
    /// Do not run the stage systems: [`Backend::replay_step`] does the
    /// step's work.
    Replay,
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

    /// What setting the backend up involved worth telling apart from the
    /// run's own time (the CUDA backend: compiling its kernels), if any.
    fn setup_note(&self) -> Option<String> {
        None
    }

    /// Whether a step of `rows` rows computes attention without keeping
    /// `[nh, T, P]` scores in memory unless they are read (the CUDA
    /// backend's fused attention); by default, no.
    fn fuses_attention(&self, rows: usize, head_dim: usize) -> bool {
        let _ = (rows, head_dim);
        false
    }

    /// Checks, before a run, that `bytes` of KV caches and activations
    /// (see [`crate::ModelConfig::forward_bytes`]) fit the memory this
    /// backend computes in, failing with the numbers. The CPU backend's
    /// memory is the host's, which the caller checks: by default, Ok.
    fn check_run_memory(&self, bytes: f64) -> Result<()> {
        let _ = bytes;
        Ok(())
    }

    /// Prepares for capturing tensors of these element counts in one step
    /// (the CUDA backend pins host buffers for them now, so the first step
    /// does not pay for it). By default nothing to do.
    fn reserve_capture(&mut self, elements: &[usize]) -> Result<()> {
        let _ = elements;
        Ok(())
    }

    /// Loads, before the first step, whatever the backend would otherwise
    /// load inside it for a prompt of `prompt_tokens` (the CUDA backend:
    /// cuBLAS's kernels for each projection shape, which it loads on first
    /// use), so that the prefill's time is the prefill's. Changes no
    /// result. By default nothing to do.
    fn warm_up(&mut self, prompt_tokens: usize) -> Result<()> {
        let _ = prompt_tokens;
        Ok(())
    }

    /// Starts a step computing `tokens` at positions `start_position..`.
    /// Truncates the KV caches to `start_position` entries; fails if they
    /// hold fewer.
    fn begin_step(&mut self, tokens: &[u32], start_position: usize) -> Result<()>;

    /// Allows the next [`Backend::begin_step`] (only that one) to plan a
    /// recorded step ([`StepGraph`]); [`crate::Forward::step`] asks when
    /// nothing observes, amends or forces a stage. By default ignored.
    fn allow_step_graph(&mut self) {}

    /// What the step begun last does (see [`StepGraph`]). By default eager.
    fn step_graph(&self) -> StepGraph {
        StepGraph::Eager
    }

    /// Starts recording the step (after `begin_step` planned
    /// [`StepGraph::Capture`]).
    fn begin_graph_capture(&mut self) -> Result<()> {
        Err(crate::PipelineError::BadInput(format!("the {} backend records no step graphs", self.name())))
    }

    /// Stops recording; `failure` is why a stage system failed while
    /// recording, if one did. Returns whether a graph was made (then
    /// [`Backend::replay_step`] executes the step). If not, graphs are off
    /// from now on and the caller runs the step again eagerly (after
    /// `begin_step`).
    fn end_graph_capture(&mut self, failure: Option<String>) -> Result<bool> {
        let _ = failure;
        Ok(false)
    }

    /// For a step planned [`StepGraph::Capture`] or [`StepGraph::Replay`]:
    /// the slots the scope observers will read at the end of each scope
    /// (`reads[i]` for the i-th scope of [`crate::Forward::scopes`], in the
    /// order they read them), or None when that is not known. The recorded
    /// step copies these to the host itself, so replayed steps can be
    /// captured. Returns how the step runs now: a recorded step that reads
    /// other slots is recorded again (Capture), and a step whose reads
    /// cannot be recorded runs eagerly. By default eager.
    fn set_step_reads(&mut self, reads: Option<&[Vec<Slot>]>) -> Result<StepGraph> {
        let _ = reads;
        Ok(StepGraph::Eager)
    }

    /// Whether an eager step begun last could copy its scope observers'
    /// reads itself (then [`crate::Forward::step`] probes them and calls
    /// [`Backend::set_step_reads`] for it too). By default no.
    fn can_gather_reads(&self) -> bool {
        false
    }

    /// Whether the step begun last copies the planned reads itself
    /// ([`Backend::set_step_reads`]): then the stage systems run with the
    /// observers off, [`Backend::record_scope_reads`] after each scope, and
    /// the observers after the step, their reads answered from the copies.
    /// Always so for a recorded or replayed step. By default no.
    fn gathers_reads(&self) -> bool {
        self.step_graph() != StepGraph::Eager
    }

    /// Scope `scope` (index as in [`Backend::set_step_reads`]) has run (or
    /// been recorded): copies the slots its observers read. By default
    /// nothing to do.
    fn record_scope_reads(&mut self, scope: usize) -> Result<()> {
        let _ = scope;
        Ok(())
    }

    /// The step has run (or its replay was launched): the observers' reads
    /// come next, in the order of [`Backend::set_step_reads`], answered from
    /// the copies. By default nothing to do.
    fn observe_step_reads(&mut self) -> Result<()> {
        Ok(())
    }

    /// The observers have read: the backend lands their reads once the step
    /// has finished. By default nothing to do.
    fn end_step_reads(&mut self) -> Result<()> {
        Ok(())
    }

    /// After [`Self::replay_step`] was launched ahead of the probe: whether
    /// the recording copies exactly `reads` (what the scope observers will
    /// read; None: not known), so the replay stands. If not, the backend
    /// lets the launched replay finish and forgets its copies, and the
    /// caller begins the step again. By default, no.
    fn keep_replay(&mut self, reads: Option<&[Vec<Slot>]>) -> Result<bool> {
        let _ = reads;
        Ok(false)
    }

    /// How many steps so far were replayed from a recorded graph.
    fn graph_replays(&self) -> usize {
        0
    }

    /// Executes the recorded step for the step begun last.
    fn replay_step(&mut self) -> Result<()> {
        Err(crate::PipelineError::BadInput(format!("the {} backend records no step graphs", self.name())))
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

    /// `out[t] = Σ_j weights[t,j] · expert_out[t,j]`.
    fn moe_combine(&mut self, expert_out: Slot, weights: Slot, out: Slot) -> Result<()>;

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
