//! Multi-head latent attention (MLA: DeepSeek-V2/V3, Kimi K2, Moonlight)
//! on the CPU: the [`MlaOps`] the MLA stage systems (stages/mla.rs) call,
//! as transformers' `DeepseekV3Attention` computes them, in the
//! reference's arithmetic (f32 storage, f64 sums):
//!
//! - the latent's RMSNorm over kv_a_proj_with_mqa's first `kv_lora_rank`
//!   columns (the rest are the shared key's rope columns);
//! - rotation as DeepSeek lays it out with `rope_interleave`: pairs
//!   `(x0, x1), (x2, x3), ...` each rotated by one frequency, written back
//!   as evens then odds (transformers' `apply_rotary_pos_emb_interleave`),
//!   of each query head's rope columns and, once for every head, of the
//!   key's;
//! - each head's key: its k_nope columns of kv_b_proj, then the shared
//!   rotated columns; its values kv_b_proj's columns after them (the cache
//!   keeps keys and values expanded: kv_b_proj is per row, so expanding a
//!   position once gives what transformers' expansion of its latent cache
//!   gives at every step);
//! - scores with the softmax scale given (YaRN's `mscale_all_dim` folded
//!   in twice: `MlaConfig::softmax_scale`).
//!
//! tests/deepseek_mla.rs holds these to transformers' float64 on
//! tests/data/deepseek-v3-mla.json; the DeepSeek oracle fixtures hold the
//! whole family.

use super::CpuBackend;
use super::attention::HeadDims;
use super::math::rms_norm_row;
use crate::backend::Slot;
use crate::backend::mla::{MlaDims, MlaOps, MlaRope};
use crate::error::{PipelineError, Result};
use crate::tensor::HostTensor;
use crate::weights::WeightId;

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
        self.scores_with(layer, q, head_dims(dims), scale, None, out)
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
