//! gpt-oss's operations, a backend capability ([`super::Backend::oss`]):
//! per-layer attention windows, attention sinks, YaRN RoPE on the ordinary
//! heads, the router's and the experts' biases, and the clamped SwiGLU.
//! The stage systems of a gpt-oss model call them (stages/oss.rs); a
//! backend without them is refused at the first such stage with what it
//! lacks. The CPU's arithmetic (cpu/oss.rs) is the reference.

use super::{AttentionShape, RopeArgs, Slot};
use crate::backend::mla::MlaRope;
use crate::error::Result;
use crate::weights::WeightId;

/// gpt-oss's operations.
pub trait OssOps {
    /// attn_window: for each of this step's T query rows, the first and
    /// last key position it sees through `window` (itself and up to
    /// window - 1 before it; all before it for None), `[T,2]` int32.
    fn window(&mut self, window: Option<usize>, out: Slot) -> Result<()>;

    /// NeoX (rotate-half) RoPE of `args`' heads with `rope`'s frequencies,
    /// cos and sin times its attention factor (YaRN), `[T, heads*hd]`.
    fn rope_scaled(&mut self, input: Slot, args: RopeArgs, rope: &MlaRope, out: Slot) -> Result<()>;

    /// Appends this step's keys and values as `Backend::append_kv` does,
    /// then `q·kᵀ / sqrt(hd)` over the positions `window` leaves each row,
    /// others 0, `[nh,T,P]`.
    fn windowed_scores(
        &mut self,
        layer: usize,
        q: Slot,
        shape: AttentionShape,
        window: Option<usize>,
        out: Slot,
    ) -> Result<()>;

    /// Softmax of each row of `scores` over the positions `window` leaves
    /// it and, with `sinks` (`[nh]`), the head's sink logit joining the
    /// denominator: probabilities `[nh,T,P]` into `probs_out` (masked 0),
    /// the sink's share `[nh,T]` into `sink_out`.
    fn softmax_with_sinks(
        &mut self,
        scores: Slot,
        window: Option<usize>,
        sinks: WeightId,
        probs_out: Slot,
        sink_out: Slot,
    ) -> Result<()>;

    /// The router's logits plus its bias (`[E]`), `[T,E]`.
    fn router_bias(&mut self, logits: Slot, bias: WeightId, out: Slot) -> Result<()>;

    /// Each chosen expert's bias (`biases[e]`, `[W]`) added to its slot of
    /// `input` (`[T,k,W]`, the experts `indices` names), `[T,k,W]`.
    fn expert_bias(&mut self, input: Slot, indices: Slot, biases: &[WeightId], out: Slot) -> Result<()>;

    /// gate clamped above at `limit` and up clamped to `[-limit, limit]`
    /// (`[T,k,I]` each; NaN stays NaN), side by side: `[T,k,2I]`.
    fn clamp_gate_up(&mut self, gate: Slot, up: Slot, limit: f64, out: Slot) -> Result<()>;

    /// `(up + 1) * gate * sigmoid(alpha * gate)` of the clamped gate and up
    /// (`[T,k,2I]`, gate first), `[T,k,I]`.
    fn clamped_swiglu(&mut self, clamped: Slot, alpha: f64, out: Slot) -> Result<()>;
}
