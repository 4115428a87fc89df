//! The attention family on the device: RoPE, the KV cache (append, read,
//! replace), scores, causal softmax and softmax·V.

use cudarc::driver::{LaunchConfig, PushKernelArg};
use kernels_cuda::kernels::attention;

use super::deferred::{Deferred, RopeLaunch};
use super::tensors::DevCache;
use super::{CudaBackend, gpu, threads, warps};

/// Positions per split of attention over few rows (attention_f32), and of
/// the one-row kernel (ROW_SPLIT in attention.cu).
const ATTENTION_SPLIT: usize = 64;

/// Blocks per head of the one-row scores kernel (8 warps each; each warp
/// computes every (8 * this)-th position).
const SCORES_ROW_BLOCKS: u32 = 64;

/// The KV caches' capacity: a power of two, at least this (so a capacity
/// is a whole number of ATTENTION_SPLIT splits).
const MIN_CACHE_CAPACITY: usize = 64;
use crate::backend::{AttentionShape, RopeArgs, Slot};
use crate::error::{PipelineError, Result};
use crate::tensor::HostTensor;

impl CudaBackend {
    pub(super) fn rope_on_device(&mut self, input: Slot, args: RopeArgs, out: Slot) -> Result<()> {
        let RopeArgs { col_start, heads, head_dim, .. } = args;
        let x = self.slot(input)?;
        let (rows, in_width) = (x.rows(), x.width());
        if col_start + heads * head_dim > in_width {
            return Err(PipelineError::BadInput(format!("rope reads past the rows of `{input}`")));
        }
        if out == input {
            return Err(PipelineError::BadInput(format!("rope cannot write its input `{input}` in place")));
        }
        let o = self.alloc(rows * heads * head_dim)?;
        self.set(out, vec![rows, heads * head_dim], o)?;
        // q and k of a step rotate in one launch (deferred.rs).
        self.defer(Deferred::Rope(RopeLaunch { input, args, out, rows, in_width }))
    }

    pub(super) fn append_kv_on_device(&mut self, layer: usize, k: Slot, v: Slot, v_col: usize) -> Result<()> {
        let (kt, vt) = (self.slot(k)?, self.slot(v)?);
        let (rows, width, v_width) = (kt.rows(), kt.width(), vt.width());
        if vt.rows() != rows || v_col + width > v_width {
            return Err(PipelineError::BadInput(format!("append_kv: `{k}` and `{v}` do not match")));
        }
        self.ensure_cache(layer, rows, width, width)?;
        let start = self.start_position;
        let stream = self.stream();
        let f = self.kernel(attention::APPEND_KV)?;
        let cache = self.caches[layer].as_mut().expect("allocated above");
        let kt = self.activations.slots.get(k).expect("checked").f32(k)?;
        let vt = self.activations.slots.get(v).expect("checked").f32(v)?;
        let a = (rows as u32, width as u32, v_width as u32, v_col as u32);
        let mut b = stream.launch_builder(&f);
        b.arg(&mut cache.k).arg(&mut cache.v).arg(kt).arg(vt).arg(&self.step_start);
        b.arg(&a.0).arg(&a.1).arg(&a.2).arg(&a.3).arg(&a.1);
        // SAFETY: rows * width keys and values at rows start.. of caches
        // with capacity >= start + rows rows (step_start holds start);
        // columns v_col..v_col + width of v are within its rows.
        unsafe { b.launch(threads(2 * rows * width)) }.map_err(gpu("appending to the KV cache"))?;
        cache.len = start + rows;
        Ok(())
    }

    /// Makes layer `layer`'s caches (key rows of `width`, value rows of
    /// `v_width`) hold the positions before this step and room for `rows`
    /// more, growing them (a power of two, at least MIN_CACHE_CAPACITY)
    /// with what they hold copied over. The caller appends, then sets the
    /// length.
    pub(super) fn ensure_cache(&mut self, layer: usize, rows: usize, width: usize, v_width: usize) -> Result<()> {
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
        let fits = |c: &DevCache| c.capacity >= need && c.width == width && c.v_width == v_width;
        if self.caches[layer].as_ref().is_some_and(fits) {
            return Ok(());
        }
        self.refuse_in_capture("growing a KV cache")?;
        let stream = self.stream();
        let capacity = need.next_power_of_two().max(MIN_CACHE_CAPACITY);
        let mut nk = stream.alloc_zeros::<f32>(capacity * width).map_err(gpu("allocating the KV cache"))?;
        let mut nv = stream.alloc_zeros::<f32>(capacity * v_width).map_err(gpu("allocating the KV cache"))?;
        if let Some(old) = self.caches[layer].as_ref().filter(|c| c.width == width && c.v_width == v_width) {
            let (used, v_used) = (old.len * width, old.len * v_width);
            stream.memcpy_dtod(&old.k.slice(..used), &mut nk.slice_mut(..used)).map_err(gpu("growing the KV cache"))?;
            stream
                .memcpy_dtod(&old.v.slice(..v_used), &mut nv.slice_mut(..v_used))
                .map_err(gpu("growing the KV cache"))?;
        }
        self.caches[layer] = Some(DevCache { k: nk, v: nv, width, v_width, len: start, capacity });
        Ok(())
    }

    pub(super) fn attn_scores_on_device(
        &mut self,
        layer: usize,
        q: Slot,
        shape: AttentionShape,
        out: Slot,
    ) -> Result<()> {
        if self.fuses_attention_of(self.t_len, shape.head_dim) {
            return self.plan_attention(layer, q, shape, out);
        }
        let qt = self.slot(q)?;
        let t_len = qt.rows();
        let cache = self.cache(layer)?;
        let p_len = cache.len;
        let n = shape.heads * t_len * p_len;
        if t_len == 1 && shape.head_dim.is_multiple_of(4) {
            // Decode: a fixed grid of warps over (h, p), 16-byte loads; the
            // buffer is sized for the cache's capacity (graph.rs).
            let mut o = self.alloc(shape.heads * cache.capacity)?;
            let f = self.kernel(attention::SCORES_ROW)?;
            let stream = self.stream();
            let a = (shape.heads as u32, shape.kv_heads as u32, shape.head_dim as u32);
            let mut b = stream.launch_builder(&f);
            b.arg(&mut o).arg(qt.f32(q)?).arg(&cache.k).arg(&self.step_start).arg(&a.0).arg(&a.1).arg(&a.2);
            let cfg = LaunchConfig {
                grid_dim: (SCORES_ROW_BLOCKS, shape.heads as u32, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: scores [nh, 1, P] with P = start + 1 <= capacity fit
            // o; q holds nh * hd, the key cache P rows of nkv * hd (hd % 4
            // == 0: aligned loads).
            unsafe { b.launch(cfg) }.map_err(gpu("attn_scores"))?;
            return self.set(out, vec![shape.heads, t_len, p_len], o);
        }
        self.refuse_in_capture("attention scores of several rows take the position from the host")?;
        let mut o = self.alloc(n)?;
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
        if self.plan_softmax(scores, out) {
            return Ok(());
        }
        self.materialise(&[scores])?;
        let s = self.slot(scores)?;
        let shape = s.shape.clone();
        if shape.len() != 3 {
            return Err(PipelineError::BadInput(format!("attn_softmax needs [nh,T,P], got {shape:?}")));
        }
        if shape[2] != self.start_position + shape[1] {
            return Err(PipelineError::BadInput(format!(
                "attn_softmax: {} positions, but a step of {} rows at {} sees {}",
                shape[2],
                shape[1],
                self.start_position,
                self.start_position + shape[1]
            )));
        }
        let rows = shape[0] * shape[1];
        // As long as the scores' buffer (sized for the KV capacity in decode).
        let mut o = self.alloc(s.buffer_len())?;
        let f = self.kernel(attention::SOFTMAX)?;
        let stream = self.stream();
        let a = (rows as u32, shape[1] as u32);
        let mut b = stream.launch_builder(&f);
        b.arg(&mut o).arg(s.f32(scores)?).arg(&a.0).arg(&a.1).arg(&self.step_start);
        // SAFETY: one warp per row of P = start + T (checked above).
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
        if self.fused_attention(layer, probs, shape, out)? {
            return Ok(());
        }
        self.materialise(&[probs])?;
        let pt = self.slot(probs)?;
        let (t_len, p_len) = (pt.shape[1], pt.shape[2]);
        let cache = self.cache(layer)?;
        if cache.len != p_len || cache.v_width != cache.width {
            return Err(PipelineError::BadInput(format!(
                "attention: {p_len} probabilities, {} cached values (of width {}, keys {})",
                cache.len, cache.v_width, cache.width
            )));
        }
        let n = t_len * shape.heads * shape.head_dim;
        let stream = self.stream();
        if t_len == 1 && shape.head_dim.is_multiple_of(4) && shape.head_dim <= 128 {
            // Decode: block (split, h) of 4 warps with 16-byte loads of v
            // over ATTENTION_SPLIT positions; a fixed grid for the cache's
            // capacity (blocks past the last split exit), then the splits'
            // partial sums added in order (graph.rs).
            let max_splits = cache.capacity.div_ceil(ATTENTION_SPLIT);
            let mut partial = self.alloc(n * max_splits)?;
            let f = self.kernel(attention::ATTENTION_ROW)?;
            let a = (shape.heads as u32, shape.kv_heads as u32, shape.head_dim as u32);
            let mut b = stream.launch_builder(&f);
            b.arg(&mut partial).arg(pt.f32(probs)?).arg(&cache.v).arg(&self.step_start);
            b.arg(&a.0).arg(&a.1).arg(&a.2);
            let cfg = LaunchConfig {
                grid_dim: (max_splits as u32, shape.heads as u32, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: block (s, h) writes dims < hd of head h at split s <
            // max_splits of partial (max_splits * n); it reads probs [nh, P]
            // and the value cache's first P <= capacity rows (aligned
            // 16-byte loads: hd % 4 == 0).
            unsafe { b.launch(cfg) }.map_err(gpu("attention"))?;
            let o = self.combine_splits(&partial, n, 1)?;
            self.activations.pool.recycle_buffer(partial);
            return self.set(out, vec![t_len, shape.heads * shape.head_dim], o);
        }
        self.refuse_in_capture("attention over several rows takes the position from the host")?;
        // Few rows over a long context: split the positions so that more
        // blocks share the work, then add the splits up in order.
        let splits = if t_len <= 16 { p_len.div_ceil(ATTENTION_SPLIT).max(1) } else { 1 };
        let split_len = if splits == 1 { p_len.max(1) } else { ATTENTION_SPLIT };
        let mut partial = self.alloc(n * splits)?;
        // Block (t tile and split, h, d chunk): see attention_f32.
        let f = self.kernel(attention::ATTENTION)?;
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
        b.arg(&a.0).arg(&a.1).arg(&a.2).arg(&a.3).arg(&a.4).arg(&a.5).arg(&a.6);
        let grid = ((t_len.div_ceil(16) * splits) as u32, shape.heads as u32, shape.head_dim.div_ceil(128) as u32);
        let cfg = LaunchConfig { grid_dim: grid, block_dim: (128, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: each block writes only its rows t < T and dims d < hd of
        // its head, in its split's part of a buffer of splits * n; it reads
        // probs [nh, T, P] and the value cache [P, nkv*hd] within bounds.
        unsafe { b.launch(cfg) }.map_err(gpu("attention"))?;
        let o = if splits == 1 {
            partial
        } else {
            let o = self.combine_splits(&partial, n, t_len)?;
            self.activations.pool.recycle_buffer(partial);
            o
        };
        self.set(out, vec![t_len, shape.heads * shape.head_dim], o)
    }

    /// Adds the partial sums of the ATTENTION_SPLIT-position splits that a
    /// step of `t_len` rows has (their count follows the position in device
    /// memory), in order, into a new output of `n`.
    fn combine_splits(
        &self,
        partial: &cudarc::driver::CudaSlice<f32>,
        n: usize,
        t_len: usize,
    ) -> Result<cudarc::driver::CudaSlice<f32>> {
        let mut o = self.alloc(n)?;
        let f = self.kernel(attention::COMBINE)?;
        let stream = self.stream();
        let (n64, t32, s32) = (n as u64, t_len as u32, ATTENTION_SPLIT as u32);
        let mut b = stream.launch_builder(&f);
        b.arg(&mut o).arg(partial).arg(&n64).arg(&self.step_start).arg(&t32).arg(&s32);
        // SAFETY: one thread per output element; partial holds a part of n
        // for every split of P = start + t_len positions.
        unsafe { b.launch(threads(n)) }.map_err(gpu("attention_combine"))?;
        Ok(o)
    }

    pub(super) fn kv_cache_on_device(&mut self, layer: usize) -> Result<(HostTensor, HostTensor)> {
        let c = self
            .caches
            .get(layer)
            .and_then(|c| c.as_ref())
            .ok_or_else(|| PipelineError::BadInput(format!("layer {layer} has no KV cache yet")))?;
        let stream = self.stream();
        let k = stream.clone_dtoh(&c.k.slice(..c.len * c.width)).map_err(gpu("copying the KV cache"))?;
        let v = stream.clone_dtoh(&c.v.slice(..c.len * c.v_width)).map_err(gpu("copying the KV cache"))?;
        Ok((HostTensor::f32(vec![c.len, c.width], k), HostTensor::f32(vec![c.len, c.v_width], v)))
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
        if keys.shape.len() != 2 || values.shape.len() != 2 || keys.shape[0] != values.shape[0] {
            return Err(PipelineError::BadInput(
                "KV cache keys and values must be [len, width] and [len, value width]".into(),
            ));
        }
        let (len, width, v_width) = (keys.shape[0], keys.shape[1], values.shape[1]);
        let capacity = len.next_power_of_two().max(MIN_CACHE_CAPACITY);
        let stream = self.stream();
        let padded = |x: &[f32], w: usize| {
            let mut p = x.to_vec();
            p.resize(capacity * w, 0.0);
            p
        };
        let kd = stream.clone_htod(&padded(k, width)).map_err(gpu("copying the KV cache"))?;
        let vd = stream.clone_htod(&padded(v, v_width)).map_err(gpu("copying the KV cache"))?;
        if self.caches.len() <= layer {
            self.caches.resize_with(layer + 1, || None);
        }
        self.caches[layer] = Some(DevCache { k: kd, v: vd, width, v_width, len, capacity });
        Ok(())
    }
}
