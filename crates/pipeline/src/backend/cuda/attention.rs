//! The attention family on the device: RoPE, the KV cache (append, read,
//! replace), scores, causal softmax and softmax·V.

use cudarc::driver::{LaunchConfig, PushKernelArg};
use kernels_cuda::kernels::{attention, elementwise};

use super::tensors::DevCache;
use super::{CudaBackend, gpu, threads, warps};

/// Positions per split of a decode step's attention (see attention_f32).
const ATTENTION_SPLIT: usize = 64;
use crate::backend::{AttentionShape, RopeArgs, Slot};
use crate::error::{PipelineError, Result};
use crate::tensor::HostTensor;

impl CudaBackend {
    pub(super) fn rope_on_device(&mut self, input: Slot, args: RopeArgs, out: Slot) -> Result<()> {
        let RopeArgs { col_start, heads, head_dim, theta } = args;
        let x = self.slot(input)?;
        let (rows, in_width) = (x.rows(), x.width());
        if col_start + heads * head_dim > in_width {
            return Err(PipelineError::BadInput(format!("rope reads past the rows of `{input}`")));
        }
        let mut o = self.alloc(rows * heads * head_dim)?;
        let f = self.kernel(attention::ROPE)?;
        let stream = self.stream();
        let a =
            (rows as u32, in_width as u32, col_start as u32, heads as u32, head_dim as u32, self.start_position as u32);
        let mut b = stream.launch_builder(&f);
        b.arg(&mut o).arg(x.f32(input)?).arg(&a.0).arg(&a.1).arg(&a.2).arg(&a.3).arg(&a.4).arg(&theta).arg(&a.5);
        // SAFETY: one thread per (t, head, pair), all within the buffers.
        unsafe { b.launch(threads(rows * heads * head_dim / 2)) }.map_err(gpu("rope"))?;
        self.set(out, vec![rows, heads * head_dim], o)
    }

    pub(super) fn append_kv_on_device(&mut self, layer: usize, k: Slot, v: Slot, v_col: usize) -> Result<()> {
        let (kt, vt) = (self.slot(k)?, self.slot(v)?);
        let (rows, width, v_width) = (kt.rows(), kt.width(), vt.width());
        if vt.rows() != rows || v_col + width > v_width {
            return Err(PipelineError::BadInput(format!("append_kv: `{k}` and `{v}` do not match")));
        }
        if self.caches.len() <= layer {
            self.caches.resize_with(layer + 1, || None);
        }
        let start = self.start_position;
        let len = self.caches[layer].as_ref().map_or(0, |c| c.len);
        if len != start {
            return Err(PipelineError::BadInput(format!(
                "the KV cache of layer {layer} holds {len} positions but this step starts at {start}"
            )));
        }
        let need = start + rows;
        let stream = self.stream();
        if self.caches[layer].as_ref().is_none_or(|c| c.capacity < need || c.width != width) {
            let capacity = need.next_power_of_two().max(64);
            let mut nk = stream.alloc_zeros::<f32>(capacity * width).map_err(gpu("allocating the KV cache"))?;
            let mut nv = stream.alloc_zeros::<f32>(capacity * width).map_err(gpu("allocating the KV cache"))?;
            if let Some(old) = &self.caches[layer] {
                let used = old.len * width;
                stream
                    .memcpy_dtod(&old.k.slice(..used), &mut nk.slice_mut(..used))
                    .map_err(gpu("growing the KV cache"))?;
                stream
                    .memcpy_dtod(&old.v.slice(..used), &mut nv.slice_mut(..used))
                    .map_err(gpu("growing the KV cache"))?;
            }
            self.caches[layer] = Some(DevCache { k: nk, v: nv, width, len: start, capacity });
        }
        let f = self.kernel(elementwise::COPY_COLUMNS)?;
        let cache = self.caches[layer].as_mut().expect("allocated above");
        let kt = self.slots[k.index()].as_ref().expect("checked").f32(k)?;
        let vt = self.slots[v.index()].as_ref().expect("checked").f32(v)?;
        let offset = start * width;
        let (r32, w32, vw32, vc32, zero) = (rows as u32, width as u32, v_width as u32, v_col as u32, 0u32);
        {
            let mut dst = cache.k.slice_mut(offset..);
            let mut b = stream.launch_builder(&f);
            b.arg(&mut dst).arg(kt).arg(&r32).arg(&w32).arg(&zero).arg(&w32).arg(&w32);
            // SAFETY: rows*width values into a cache with capacity >= need rows.
            unsafe { b.launch(threads(rows * width)) }.map_err(gpu("append keys"))?;
        }
        {
            let mut dst = cache.v.slice_mut(offset..);
            let mut b = stream.launch_builder(&f);
            b.arg(&mut dst).arg(vt).arg(&r32).arg(&vw32).arg(&vc32).arg(&w32).arg(&w32);
            // SAFETY: as above, reading columns v_col..v_col+width of v.
            unsafe { b.launch(threads(rows * width)) }.map_err(gpu("append values"))?;
        }
        cache.len = need;
        Ok(())
    }

    pub(super) fn attn_scores_on_device(
        &mut self,
        layer: usize,
        q: Slot,
        shape: AttentionShape,
        out: Slot,
    ) -> Result<()> {
        let qt = self.slot(q)?;
        let t_len = qt.rows();
        let cache = self.cache(layer)?;
        let p_len = cache.len;
        let n = shape.heads * t_len * p_len;
        let mut o = self.alloc(n)?;
        if t_len == 1 && shape.head_dim.is_multiple_of(4) {
            // Decode: one warp per (h, p), 16-byte loads.
            let f = self.kernel(attention::SCORES_ROW)?;
            let stream = self.stream();
            let a = (p_len as u32, shape.heads as u32, shape.kv_heads as u32, shape.head_dim as u32);
            let mut b = stream.launch_builder(&f);
            b.arg(&mut o).arg(qt.f32(q)?).arg(&cache.k).arg(&a.0).arg(&a.1).arg(&a.2).arg(&a.3);
            // SAFETY: one warp per (h, p) of [nh, 1, P]; q holds nh * hd,
            // the key cache P rows of nkv * hd (hd % 4 == 0: aligned loads).
            unsafe { b.launch(warps(n)) }.map_err(gpu("attn_scores"))?;
            return self.set(out, vec![shape.heads, t_len, p_len], o);
        }
        let f = self.kernel(attention::SCORES)?;
        let stream = self.stream();
        let a = (
            t_len as u32,
            p_len as u32,
            shape.heads as u32,
            shape.kv_heads as u32,
            shape.head_dim as u32,
            self.start_position as u32,
        );
        let mut b = stream.launch_builder(&f);
        b.arg(&mut o).arg(qt.f32(q)?).arg(&cache.k).arg(&a.0).arg(&a.1).arg(&a.2).arg(&a.3).arg(&a.4).arg(&a.5);
        let cfg = LaunchConfig {
            grid_dim: (p_len.div_ceil(32) as u32, t_len.div_ceil(32) as u32, shape.heads as u32),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: block (p tile, t tile, h) writes its 32x32 tile of
        // [nh, T, P], bounds-checked per element; reads q [T, nh*hd] and the
        // key cache [P, nkv*hd] within bounds.
        unsafe { b.launch(cfg) }.map_err(gpu("attn_scores"))?;
        self.set(out, vec![shape.heads, t_len, p_len], o)
    }

    pub(super) fn attn_softmax_on_device(&mut self, scores: Slot, out: Slot) -> Result<()> {
        let s = self.slot(scores)?;
        let shape = s.shape.clone();
        if shape.len() != 3 {
            return Err(PipelineError::BadInput(format!("attn_softmax needs [nh,T,P], got {shape:?}")));
        }
        let rows = shape[0] * shape[1];
        let mut o = self.alloc(rows * shape[2])?;
        let f = self.kernel(attention::SOFTMAX)?;
        let stream = self.stream();
        let a = (rows as u32, shape[1] as u32, shape[2] as u32, self.start_position as u32);
        let mut b = stream.launch_builder(&f);
        b.arg(&mut o).arg(s.f32(scores)?).arg(&a.0).arg(&a.1).arg(&a.2).arg(&a.3);
        // SAFETY: one warp per row of P.
        unsafe { b.launch(warps(rows)) }.map_err(gpu("attn_softmax"))?;
        self.set(out, shape, o)
    }

    pub(super) fn attention_on_device(
        &mut self,
        layer: usize,
        probs: Slot,
        shape: AttentionShape,
        out: Slot,
    ) -> Result<()> {
        let pt = self.slot(probs)?;
        let (t_len, p_len) = (pt.shape[1], pt.shape[2]);
        let cache = self.cache(layer)?;
        if cache.len != p_len {
            return Err(PipelineError::BadInput(format!(
                "attention: {p_len} probabilities, {} cached values",
                cache.len
            )));
        }
        let n = t_len * shape.heads * shape.head_dim;
        // Few rows over a long context (decode): split the positions so that
        // more blocks share the work, then add the splits up in order.
        let splits = if t_len <= 16 { p_len.div_ceil(ATTENTION_SPLIT).max(1) } else { 1 };
        let split_len = if splits == 1 { p_len.max(1) } else { ATTENTION_SPLIT };
        let mut partial = self.alloc(n * splits)?;
        let stream = self.stream();
        // Decode (one row, hd % 4 == 0, hd <= 128): block (split, h) of 4
        // warps with 16-byte loads of v. Otherwise block (t tile and split,
        // h, d chunk). Both write partial sums per split when there are
        // several (see attention_f32 and attention_row_f32).
        let row = t_len == 1 && shape.head_dim.is_multiple_of(4) && shape.head_dim <= 128;
        let f = self.kernel(if row { attention::ATTENTION_ROW } else { attention::ATTENTION })?;
        let a = (
            t_len as u32,
            p_len as u32,
            shape.heads as u32,
            shape.kv_heads as u32,
            shape.head_dim as u32,
            split_len as u32,
            splits as u32,
        );
        let mut b = stream.launch_builder(&f);
        b.arg(&mut partial).arg(pt.f32(probs)?).arg(&cache.v);
        if !row {
            b.arg(&a.0);
        }
        b.arg(&a.1).arg(&a.2).arg(&a.3).arg(&a.4).arg(&a.5).arg(&a.6);
        let grid = if row {
            (splits as u32, shape.heads as u32, 1)
        } else {
            ((t_len.div_ceil(16) * splits) as u32, shape.heads as u32, shape.head_dim.div_ceil(128) as u32)
        };
        let cfg = LaunchConfig { grid_dim: grid, block_dim: (128, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: each block writes only its rows t < T and dims d < hd of
        // its head, in its split's part of a buffer of splits * n; it reads
        // probs [nh, T, P] and the value cache [P, nkv*hd] within bounds
        // (the one-row kernel's 16-byte loads are aligned: hd % 4 == 0).
        unsafe { b.launch(cfg) }.map_err(gpu("attention"))?;
        let o = if splits == 1 {
            partial
        } else {
            let mut o = self.alloc(n)?;
            let f = self.kernel(attention::COMBINE)?;
            let (n64, s32) = (n as u64, splits as u32);
            let mut b = stream.launch_builder(&f);
            b.arg(&mut o).arg(&partial).arg(&n64).arg(&s32);
            // SAFETY: one thread per output element; partial holds splits * n.
            unsafe { b.launch(threads(n)) }.map_err(gpu("attention_combine"))?;
            self.activations.recycle_buffer(partial);
            o
        };
        self.set(out, vec![t_len, shape.heads * shape.head_dim], o)
    }

    pub(super) fn kv_cache_on_device(&mut self, layer: usize) -> Result<(HostTensor, HostTensor)> {
        let c = self
            .caches
            .get(layer)
            .and_then(|c| c.as_ref())
            .ok_or_else(|| PipelineError::BadInput(format!("layer {layer} has no KV cache yet")))?;
        let stream = self.stream();
        let used = c.len * c.width;
        let k = stream.clone_dtoh(&c.k.slice(..used)).map_err(gpu("copying the KV cache"))?;
        let v = stream.clone_dtoh(&c.v.slice(..used)).map_err(gpu("copying the KV cache"))?;
        Ok((HostTensor::f32(vec![c.len, c.width], k), HostTensor::f32(vec![c.len, c.width], v)))
    }

    pub(super) fn set_kv_cache_on_device(
        &mut self,
        layer: usize,
        keys: &HostTensor,
        values: &HostTensor,
    ) -> Result<()> {
        let (Some(k), Some(v)) = (keys.as_f32(), values.as_f32()) else {
            return Err(PipelineError::BadInput("a KV cache holds float32".into()));
        };
        if keys.shape.len() != 2 || keys.shape != values.shape {
            return Err(PipelineError::BadInput("KV cache keys and values must both be [len, width]".into()));
        }
        let (len, width) = (keys.shape[0], keys.shape[1]);
        let capacity = len.next_power_of_two().max(64);
        let stream = self.stream();
        let mut padded = k.to_vec();
        padded.resize(capacity * width, 0.0);
        let kd = stream.clone_htod(&padded).map_err(gpu("copying the KV cache"))?;
        padded[..v.len()].copy_from_slice(v);
        let vd = stream.clone_htod(&padded).map_err(gpu("copying the KV cache"))?;
        if self.caches.len() <= layer {
            self.caches.resize_with(layer + 1, || None);
        }
        self.caches[layer] = Some(DevCache { k: kd, v: vd, width, len, capacity });
        Ok(())
    }
}
