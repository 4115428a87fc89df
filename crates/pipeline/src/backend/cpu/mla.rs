//! Multi-head latent attention (MLA: DeepSeek-V2/V3, Kimi K2, Moonlight) on
//! the CPU, as transformers' `DeepseekV3Attention` computes it, in the
//! reference's arithmetic (f32 storage, f64 sums):
//!
//! - the query: `q_b_proj(rmsnorm(q_a_proj(x)))` (or a plain `q_proj` when
//!   `q_lora_rank` is null), per head `qk_nope_head_dim` columns passed
//!   through and `qk_rope_head_dim` rotated;
//! - keys and values from a compressed latent: `kv_a_proj_with_mqa(x)` is
//!   `kv_lora_rank` latent columns (RMS-normed by `kv_a_layernorm`) and
//!   `qk_rope_head_dim` columns rotated once and shared by every head; the
//!   cache keeps the normed latent and the rotated key part, and
//!   `kv_b_proj` expands the whole cache each step into per-head `k_nope`
//!   and values of `v_head_dim`;
//! - rotation as DeepSeek lays it out with `rope_interleave`: pairs
//!   `(x0, x1), (x2, x3), ...` each rotated by one frequency, written back
//!   as evens then odds (transformers' `apply_rotary_pos_emb_interleave`);
//! - the softmax scale given (YaRN's `mscale_all_dim` folded in twice:
//!   `rope_scaling::Yarn::softmax_scale`).
//!
//! The family's stage systems come next (issue 24); tests/deepseek_mla.rs
//! holds this to transformers' float64 on tests/data/deepseek-v3-mla.json.

use super::CpuBackend;
use super::attention::HeadDims;
use super::math::{dot, matmul_t, rms_norm_row, softmax_prefix};
use crate::backend::Slot;
pub use crate::backend::mla::{MlaDims, MlaOps, MlaRope};
use crate::error::{PipelineError, Result};
use crate::tensor::HostTensor;
use crate::weights::{WeightId, WeightTensor};

/// Where the query comes from.
#[derive(Debug, Clone, Copy)]
pub enum QueryWeights<'a> {
    /// `q_a_proj` `[q_lora_rank, H]`, `q_a_layernorm` `[q_lora_rank]`,
    /// `q_b_proj` `[heads * qk_head, q_lora_rank]`.
    Lora {
        /// `q_a_proj`.
        a: &'a WeightTensor,
        /// `q_a_layernorm`'s weight.
        norm: &'a [f32],
        /// `q_b_proj`.
        b: &'a WeightTensor,
    },
    /// `q_proj` `[heads * qk_head, H]`.
    Plain(&'a WeightTensor),
}

/// One layer's MLA weights.
#[derive(Debug, Clone, Copy)]
pub struct MlaWeights<'a> {
    /// The query's projections.
    pub query: QueryWeights<'a>,
    /// `kv_a_proj_with_mqa` `[kv_lora_rank + qk_rope, H]`.
    pub kv_a: &'a WeightTensor,
    /// `kv_a_layernorm` `[kv_lora_rank]`.
    pub kv_a_norm: &'a [f32],
    /// `kv_b_proj` `[heads * (qk_nope + v_head_dim), kv_lora_rank]`.
    pub kv_b: &'a WeightTensor,
    /// `o_proj` `[H, heads * v_head_dim]`.
    pub o: &'a WeightTensor,
}

/// A layer's MLA cache: the normed latent and the rotated shared key
/// columns of every position so far (what transformers caches).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MlaCache {
    /// `[len, kv_lora_rank]`.
    pub latent: Vec<f32>,
    /// `[len, qk_rope]`.
    pub k_rope: Vec<f32>,
    /// Positions held.
    pub len: usize,
}

/// Everything one step of MLA computes, rows of tokens unless said.
#[derive(Debug, Clone, PartialEq)]
pub struct MlaStep {
    /// `q_a_proj`'s output `[T, q_lora_rank]` (None for a plain query).
    pub q_a: Option<Vec<f32>>,
    /// `q_a_layernorm`'s output `[T, q_lora_rank]`.
    pub q_a_norm: Option<Vec<f32>>,
    /// The query before rotation `[T, heads * qk_head]`.
    pub q: Vec<f32>,
    /// `kv_a_proj_with_mqa`'s output `[T, kv_lora_rank + qk_rope]`.
    pub kv_a: Vec<f32>,
    /// The normed latent `[T, kv_lora_rank]`.
    pub kv_a_norm: Vec<f32>,
    /// The rotated shared key columns `[T, qk_rope]`.
    pub k_rope: Vec<f32>,
    /// The query after rotation `[T, heads * qk_head]`.
    pub q_rope: Vec<f32>,
    /// `kv_b_proj` over the whole cache `[P, heads * (qk_nope + v_head_dim)]`.
    pub kv_b: Vec<f32>,
    /// The heads' attention outputs `[T, heads * v_head_dim]`.
    pub attention: Vec<f32>,
    /// `o_proj`'s output `[T, H]`.
    pub out: Vec<f32>,
}

/// Rows of `width` of `data`.
fn rows(data: &[f32], width: usize) -> Vec<&[f32]> {
    data.chunks(width).collect()
}

/// RMSNorm of each row of `data` (rows of `w.len()`).
fn rms_norm(data: &[f32], w: &[f32], eps: f64) -> Vec<f32> {
    let mut out = vec![0.0f32; data.len()];
    for (o, x) in out.chunks_mut(w.len()).zip(data.chunks(w.len())) {
        rms_norm_row(x, w, eps, o);
    }
    out
}

/// One MLA step over `x` (`[T, H]`, tokens at positions `cache.len..`):
/// appends to `cache` and returns every intermediate. Causal: token t sees
/// positions up to its own.
pub fn mla_step(
    x: &[f32],
    dims: MlaDims,
    weights: &MlaWeights,
    rope: &MlaRope,
    softmax_scale: f64,
    eps: f64,
    cache: &mut MlaCache,
) -> MlaStep {
    let hidden = weights.kv_a.row_len();
    let inputs = rows(x, hidden);
    let t_len = inputs.len();
    let (qk, heads) = (dims.qk_head(), dims.heads);
    let (q_a, q_a_norm, q) = match weights.query {
        QueryWeights::Lora { a, norm, b } => {
            let q_a = matmul_t(&inputs, a);
            let normed = rms_norm(&q_a, norm, eps);
            let q = matmul_t(&rows(&normed, norm.len()), b);
            (Some(q_a), Some(normed), q)
        }
        QueryWeights::Plain(w) => (None, None, matmul_t(&inputs, w)),
    };
    let kv_width = dims.kv_lora_rank + dims.qk_rope;
    let kv_a = matmul_t(&inputs, weights.kv_a);
    let latent: Vec<f32> = kv_a.chunks(kv_width).flat_map(|r| r[..dims.kv_lora_rank].iter().copied()).collect();
    let kv_a_norm = rms_norm(&latent, weights.kv_a_norm, eps);
    let start = cache.len;
    let mut k_rope = vec![0.0f32; t_len * dims.qk_rope];
    let mut q_rope = q.clone();
    for t in 0..t_len {
        let at = start + t;
        let k_in = &kv_a[t * kv_width + dims.kv_lora_rank..(t + 1) * kv_width];
        rope.rotate(k_in, at, &mut k_rope[t * dims.qk_rope..(t + 1) * dims.qk_rope]);
        for h in 0..heads {
            let base = t * heads * qk + h * qk + dims.qk_nope;
            rope.rotate(&q[base..base + dims.qk_rope], at, &mut q_rope[base..base + dims.qk_rope]);
        }
    }
    cache.latent.extend_from_slice(&kv_a_norm);
    cache.k_rope.extend_from_slice(&k_rope);
    cache.len += t_len;
    let p_len = cache.len;
    let kv_b = matmul_t(&rows(&cache.latent, dims.kv_lora_rank), weights.kv_b);
    let kvb_width = heads * (dims.qk_nope + dims.v_head_dim);
    let mut attention = vec![0.0f32; t_len * heads * dims.v_head_dim];
    let mut key = vec![0.0f32; qk];
    let mut scores = vec![0.0f32; p_len];
    for t in 0..t_len {
        let visible = start + t + 1;
        for h in 0..heads {
            let query = &q_rope[t * heads * qk + h * qk..t * heads * qk + (h + 1) * qk];
            for (p, s) in scores.iter_mut().enumerate().take(visible) {
                let head = &kv_b[p * kvb_width + h * (dims.qk_nope + dims.v_head_dim)..];
                key[..dims.qk_nope].copy_from_slice(&head[..dims.qk_nope]);
                key[dims.qk_nope..].copy_from_slice(&cache.k_rope[p * dims.qk_rope..(p + 1) * dims.qk_rope]);
                *s = (dot(query, &key) * softmax_scale) as f32;
            }
            softmax_prefix(&mut scores, visible);
            let out = &mut attention[(t * heads + h) * dims.v_head_dim..(t * heads + h + 1) * dims.v_head_dim];
            for (d, o) in out.iter_mut().enumerate() {
                let sum: f64 = (0..visible)
                    .map(|p| {
                        let v = kv_b[p * kvb_width + h * (dims.qk_nope + dims.v_head_dim) + dims.qk_nope + d];
                        f64::from(scores[p]) * f64::from(v)
                    })
                    .sum();
                *o = sum as f32;
            }
        }
    }
    let out = matmul_t(&rows(&attention, heads * dims.v_head_dim), weights.o);
    MlaStep { q_a, q_a_norm, q, kv_a, kv_a_norm, k_rope, q_rope, kv_b, attention, out }
}

impl MlaOps for CpuBackend {
    fn latent_norm(&mut self, kv_a: Slot, weight: WeightId, eps: f64, out: Slot) -> Result<()> {
        let w = self.weight(weight);
        let (rows, width, x) = self.rows(kv_a)?;
        if w.len() > width {
            return Err(PipelineError::BadInput(format!(
                "the latent norm covers {} columns but `{kv_a}` has {width}",
                w.len()
            )));
        }
        let mut data = vec![0.0f32; rows * w.len()];
        for (o, r) in data.chunks_mut(w.len()).zip(x.chunks(width)) {
            rms_norm_row(&r[..w.len()], &w, eps, o);
        }
        self.set(out, HostTensor::f32(vec![rows, w.len()], data));
        Ok(())
    }

    fn query_rope(&mut self, q: Slot, dims: MlaDims, rope: &MlaRope, out: Slot) -> Result<()> {
        let (rows, width, x) = self.rows(q)?;
        let qk = dims.qk_head();
        self.check_width(q, width, dims.heads * qk, "MLA's query")?;
        let mut data = x.to_vec();
        for t in 0..rows {
            for h in 0..dims.heads {
                let at = t * width + h * qk + dims.qk_nope;
                rope.rotate(&x[at..at + dims.qk_rope], self.start_position + t, &mut data[at..at + dims.qk_rope]);
            }
        }
        self.set(out, HostTensor::f32(vec![rows, width], data));
        Ok(())
    }

    fn keys(&mut self, kv_a: Slot, kv_b: Slot, dims: MlaDims, rope: &MlaRope, out: Slot) -> Result<()> {
        let (rows, aw, a) = self.rows(kv_a)?;
        let (b_rows, bw, b) = self.rows(kv_b)?;
        let per_head = dims.qk_nope + dims.v_head_dim;
        self.check_width(kv_a, aw, dims.kv_lora_rank + dims.qk_rope, "MLA's latent and rope key")?;
        self.check_width(kv_b, bw, dims.heads * per_head, "MLA's kv_b")?;
        if b_rows != rows {
            return Err(PipelineError::BadInput(format!("`{kv_a}` has {rows} rows but `{kv_b}` {b_rows}")));
        }
        let qk = dims.qk_head();
        let mut data = vec![0.0f32; rows * dims.heads * qk];
        let mut shared = vec![0.0f32; dims.qk_rope];
        for t in 0..rows {
            rope.rotate(&a[t * aw + dims.kv_lora_rank..(t + 1) * aw], self.start_position + t, &mut shared);
            for h in 0..dims.heads {
                let key = &mut data[(t * dims.heads + h) * qk..(t * dims.heads + h + 1) * qk];
                key[..dims.qk_nope].copy_from_slice(&b[t * bw + h * per_head..t * bw + h * per_head + dims.qk_nope]);
                key[dims.qk_nope..].copy_from_slice(&shared);
            }
        }
        self.set(out, HostTensor::f32(vec![rows, dims.heads * qk], data));
        Ok(())
    }

    fn append_kv(&mut self, layer: usize, keys: Slot, kv_b: Slot, dims: MlaDims) -> Result<()> {
        let (rows, kw, k) = self.rows(keys)?;
        let (b_rows, bw, b) = self.rows(kv_b)?;
        let per_head = dims.qk_nope + dims.v_head_dim;
        self.check_width(keys, kw, dims.heads * dims.qk_head(), "MLA's keys")?;
        self.check_width(kv_b, bw, dims.heads * per_head, "MLA's kv_b")?;
        if b_rows != rows {
            return Err(PipelineError::BadInput(format!("`{keys}` has {rows} rows but `{kv_b}` {b_rows}")));
        }
        let values: Vec<f32> = b
            .chunks(bw)
            .flat_map(|r| {
                (0..dims.heads).flat_map(move |h| r[h * per_head + dims.qk_nope..(h + 1) * per_head].iter().copied())
            })
            .collect();
        let keys = k.to_vec();
        self.append_cache(layer, keys, values, kw, dims.heads * dims.v_head_dim)
    }

    fn scores(&mut self, layer: usize, q: Slot, dims: MlaDims, scale: f64, out: Slot) -> Result<()> {
        self.scores_with(layer, q, head_dims(dims), scale, out)
    }

    fn attention(&mut self, layer: usize, probs: Slot, dims: MlaDims, out: Slot) -> Result<()> {
        self.attention_with(layer, probs, head_dims(dims), out)
    }
}

/// MLA's heads as the attention products see them: as many key/value
/// heads as query heads.
fn head_dims(dims: MlaDims) -> HeadDims {
    HeadDims { heads: dims.heads, kv_heads: dims.heads, qk: dims.qk_head(), v: dims.v_head_dim }
}
