//! The CPU's KV cache and attention products, for any head geometry: the
//! Backend operations (keys and values of one head width) and MLA's
//! (keys of `qk_nope + qk_rope`, values of `v_head_dim`, its own softmax
//! scale) share them.

use rayon::prelude::*;

use super::{CpuBackend, ggml_activations, ggml_cuda, math};
use crate::backend::Slot;
use crate::error::{PipelineError, Result};
use crate::tensor::HostTensor;

/// Keys and values of one layer for every position seen so far.
#[derive(Debug, Default, Clone)]
pub(super) struct KvCache {
    /// `[len, k_width]`.
    pub(super) k: Vec<f32>,
    /// `[len, v_width]`.
    pub(super) v: Vec<f32>,
    /// Key columns a position.
    pub(super) k_width: usize,
    /// Value columns a position.
    pub(super) v_width: usize,
    /// Positions held.
    pub(super) len: usize,
}

/// Head geometry of one attention product: `heads` query heads, `kv_heads`
/// key/value heads (query head h reads h / (heads / kv_heads)), key width
/// `qk` and value width `v` per head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct HeadDims {
    pub(super) heads: usize,
    pub(super) kv_heads: usize,
    pub(super) qk: usize,
    pub(super) v: usize,
}

impl CpuBackend {
    /// Appends `rows` positions (`keys` `[rows, k_width]`, `values`
    /// `[rows, v_width]`) to layer `layer`'s cache, f16 when the contract
    /// says so; the cache must end where this step starts.
    pub(super) fn append_cache(
        &mut self,
        layer: usize,
        mut keys: Vec<f32>,
        mut values: Vec<f32>,
        k_width: usize,
        v_width: usize,
    ) -> Result<()> {
        if self.contract.attention_f16 {
            // An f16 cache.
            (keys, values) = (ggml_activations::f16_operand(&keys), ggml_activations::f16_operand(&values));
        }
        if self.caches.len() <= layer {
            self.caches.resize_with(layer + 1, KvCache::default);
        }
        let start = self.start_position;
        let cache = &mut self.caches[layer];
        if cache.len != start {
            return Err(PipelineError::BadInput(format!(
                "the KV cache of layer {layer} holds {} positions but this step starts at {start}",
                cache.len
            )));
        }
        (cache.k_width, cache.v_width) = (k_width, v_width);
        cache.len += keys.len() / k_width.max(1);
        cache.k.extend_from_slice(&keys);
        cache.v.extend_from_slice(&values);
        Ok(())
    }

    /// `q·kᵀ * scale` over the cached positions, masked entries 0,
    /// `[heads, T, P]`; with `window`, query t sees only positions from
    /// `first(t)` on (the others 0 as well).
    pub(super) fn scores_with(
        &mut self,
        layer: usize,
        q: Slot,
        dims: HeadDims,
        scale: f64,
        window: Option<&[usize]>,
        out: Slot,
    ) -> Result<()> {
        let (t_len, qw, mut qd) = self.rows(q)?;
        let HeadDims { heads, kv_heads, qk: hd, .. } = dims;
        self.check_width(q, qw, heads * hd, "attention")?;
        let rounded_q;
        if self.contract.attention_f16 {
            rounded_q = ggml_activations::f16_operand(qd);
            qd = &rounded_q;
        }
        let cache = self.cache(layer)?;
        self.check_width(q, cache.k_width, kv_heads * hd, "the key cache width")?;
        let (p_len, start, group) = (cache.len, self.start_position, heads / kv_heads);
        let mut data = vec![0.0f32; heads * t_len * p_len];
        self.pool.install(|| {
            data.par_chunks_mut(t_len * p_len).enumerate().for_each(|(h, out_h)| {
                let kvh = h / group;
                for t in 0..t_len {
                    let qv = &qd[t * qw + h * hd..t * qw + (h + 1) * hd];
                    let first = window.map_or(0, |w| w[t]);
                    for p in first..=(start + t).min(p_len - 1) {
                        let kv = &cache.k[p * cache.k_width + kvh * hd..p * cache.k_width + (kvh + 1) * hd];
                        out_h[t * p_len + p] = (math::dot(qv, kv) * scale) as f32;
                    }
                }
            });
        });
        self.set(out, HostTensor::f32(vec![heads, t_len, p_len], data));
        Ok(())
    }

    /// `softmax · v` over the cached values, `[T, heads * v]`.
    pub(super) fn attention_with(&mut self, layer: usize, probs: Slot, dims: HeadDims, out: Slot) -> Result<()> {
        let pt = self.slot(probs)?;
        let HeadDims { heads, kv_heads, v: hd, .. } = dims;
        if pt.shape.len() != 3 || pt.shape[0] != heads {
            return Err(PipelineError::BadInput(format!(
                "attention needs [{heads},T,P] probabilities, got {:?}",
                pt.shape
            )));
        }
        let (t_len, p_len) = (pt.shape[1], pt.shape[2]);
        let rounded_probs;
        let mut pd = self.rows(probs)?.2;
        if self.contract.attention_f16 {
            rounded_probs = ggml_activations::f16_operand(pd);
            pd = &rounded_probs;
        }
        let cache = self.cache(layer)?;
        if cache.len != p_len || cache.v_width != kv_heads * hd {
            return Err(PipelineError::BadInput(format!(
                "attention: probabilities cover {p_len} positions of {kv_heads} heads of {hd}, the value cache of layer {layer} {} of width {}",
                cache.len, cache.v_width
            )));
        }
        let group = heads / kv_heads;
        let width = heads * hd;
        // llama.cpp's batched cuBLAS in f16 for probabilities · values
        // (its scores are asked for in f32): 16 positions summed at a time
        // into an f16 accumulator (ggml_cuda.rs).
        let f16_gemm = self.ggml_cuda_batched() && self.contract.attention_f16;
        let chunk = if f16_gemm { ggml_cuda::F16_GEMM_CHUNK } else { p_len.max(1) };
        let vw = cache.v_width;
        let mut data = vec![0.0f32; t_len * width];
        self.pool.install(|| {
            data.par_chunks_mut(width).enumerate().for_each(|(t, row)| {
                let (mut acc, mut part) = (vec![0.0f64; hd], vec![0.0f64; hd]);
                for h in 0..heads {
                    let kvh = h / group;
                    acc.fill(0.0);
                    for start in (0..p_len).step_by(chunk) {
                        part.fill(0.0);
                        for p in start..(start + chunk).min(p_len) {
                            let w = pd[(h * t_len + t) * p_len + p] as f64;
                            let v = &cache.v[p * vw + kvh * hd..p * vw + (kvh + 1) * hd];
                            for (a, &x) in part.iter_mut().zip(v) {
                                *a += w * x as f64;
                            }
                        }
                        for (a, &x) in acc.iter_mut().zip(&part) {
                            *a = if f16_gemm { ggml_cuda::f16_accumulate(*a, x) } else { *a + x };
                        }
                    }
                    for (o, a) in row[h * hd..(h + 1) * hd].iter_mut().zip(&acc) {
                        *o = *a as f32;
                    }
                }
            });
        });
        self.set(out, HostTensor::f32(vec![t_len, width], data));
        Ok(())
    }
}
