//! Multi-head latent attention's geometry and the operations a backend
//! offers for it (DeepSeek-V2/V3): the stage systems of an MLA layer
//! (stages/mla.rs) call these through [`super::Backend::mla`] (the CPU's
//! cpu/mla.rs, CUDA's cuda/mla.rs); a backend without them is refused at
//! the first MLA stage with what it lacks.

use super::Slot;
use crate::error::Result;
use crate::weights::WeightId;

/// MLA's widths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MlaDims {
    /// Query heads (MLA's keys and values have as many).
    pub heads: usize,
    /// The compressed query's width, None for a plain `q_proj`.
    pub q_lora_rank: Option<usize>,
    /// The compressed key-value latent's width.
    pub kv_lora_rank: usize,
    /// Per-head query/key columns without rotation.
    pub qk_nope: usize,
    /// Per-head query/key columns rotated (the key's shared by every head).
    pub qk_rope: usize,
    /// Per-head value width.
    pub v_head_dim: usize,
}

impl MlaDims {
    /// Query and key width per head.
    pub fn qk_head(&self) -> usize {
        self.qk_nope + self.qk_rope
    }
}

/// The rotation: inverse frequencies (`qk_rope / 2`), the factor cos and
/// sin are multiplied by (YaRN's attention factor, 1 otherwise), and
/// whether pairs are interleaved.
#[derive(Debug, Clone, PartialEq)]
pub struct MlaRope {
    /// One per rotated pair.
    pub inv_freq: Vec<f64>,
    /// cos and sin are multiplied by it.
    pub attention_factor: f64,
    /// DeepSeek's interleaved pairs (`rope_interleave`), else rotate-half.
    pub interleave: bool,
}

impl MlaRope {
    /// `x` (one head's rotated columns) at `position`, into `out`.
    pub fn rotate(&self, x: &[f32], position: usize, out: &mut [f32]) {
        let half = x.len() / 2;
        for (i, f) in self.inv_freq.iter().enumerate().take(half) {
            let (sin, cos) = (position as f64 * f).sin_cos();
            let (sin, cos) = (sin * self.attention_factor, cos * self.attention_factor);
            let (a, b) = if self.interleave { (x[2 * i], x[2 * i + 1]) } else { (x[i], x[i + half]) };
            let (a, b) = (f64::from(a), f64::from(b));
            out[i] = (a * cos - b * sin) as f32;
            out[i + half] = (b * cos + a * sin) as f32;
        }
    }
}

/// What an MLA layer needs beyond the Backend operations.
pub trait MlaOps {
    /// RMSNorm of each row's first `weight`-length columns of `kv_a`
    /// (the latent, before the shared key's rope columns).
    fn latent_norm(&mut self, kv_a: Slot, weight: WeightId, eps: f64, out: Slot) -> Result<()>;

    /// The query with each head's rope columns rotated at the step's
    /// positions, its nope columns as they are, `[T, heads * qk_head]`.
    fn query_rope(&mut self, q: Slot, dims: MlaDims, rope: &MlaRope, out: Slot) -> Result<()>;

    /// Each head's key: its k_nope columns of `kv_b`, then `kv_a`'s rope
    /// columns rotated once and shared, `[T, heads * qk_head]`.
    fn keys(&mut self, kv_a: Slot, kv_b: Slot, dims: MlaDims, rope: &MlaRope, out: Slot) -> Result<()>;

    /// Appends this step's keys (`keys`) and values (each head's value
    /// columns of `kv_b`) to layer `layer`'s cache.
    fn append_kv(&mut self, layer: usize, keys: Slot, kv_b: Slot, dims: MlaDims) -> Result<()>;

    /// `q·kᵀ * scale` over the cache, masked entries 0, `[heads, T, P]`.
    fn scores(&mut self, layer: usize, q: Slot, dims: MlaDims, scale: f64, out: Slot) -> Result<()>;

    /// `softmax · v` over the cached values, `[T, heads * v_head_dim]`.
    fn attention(&mut self, layer: usize, probs: Slot, dims: MlaDims, out: Slot) -> Result<()>;
}
