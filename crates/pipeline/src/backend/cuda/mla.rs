//! Multi-head latent attention and DeepSeek's grouped router on the device
//! (kernels/mla.cu): the [`MlaOps`] and [`GroupedRouting`] capabilities, as
//! the CPU backend computes them (cpu/mla.rs, cpu/grouped_routing.rs), one
//! thread per output element. Written for correctness, not speed: the
//! kernels take the step's length from the host, so a model with MLA runs
//! its decode steps eagerly (no recorded graphs; `new_metered` turns them
//! off).

use cudarc::driver::{CudaSlice, PushKernelArg};
use kernels_cuda::kernels::{mla, norm};

use super::tensors::{DevData, DevTensor};
use super::weights::push_weight;
use super::{CudaBackend, gpu, threads};
use crate::backend::Slot;
use crate::backend::grouped_router::{GroupedRouting, GroupedSlots, GroupedTopK};
use crate::backend::mla::{MlaDims, MlaOps, MlaRope};
use crate::error::{PipelineError, Result};
use crate::weights::WeightId;

/// The grouped router kernel's limits (GROUPED_MAX_* in mla.cu; the top-k
/// weights wait in a 64-entry array).
const MAX_GROUPS: usize = 64;
const MAX_EXPERTS: usize = 1024;
const MAX_TOP_K: usize = 64;

/// The rotation's inverse frequencies on the device, uploaded once per
/// distinct rotation (a model has one).
pub(super) type RopeTable = Option<(MlaRope, CudaSlice<f64>)>;

impl CudaBackend {
    /// The device copy of `rope`'s inverse frequencies.
    pub(super) fn upload_rope(&mut self, rope: &MlaRope) -> Result<()> {
        if self.rope_table.as_ref().is_some_and(|(r, _)| r == rope) {
            return Ok(());
        }
        self.refuse_in_capture("uploading the rotation table")?;
        let table = self.stream().clone_htod(&rope.inv_freq).map_err(gpu("uploading the rotation table"))?;
        self.rope_table = Some((rope.clone(), table));
        Ok(())
    }

    /// The rows of `slot`, checking that they are `expected` wide.
    fn mla_rows(&self, slot: Slot, expected: usize, what: &str) -> Result<usize> {
        let t = self.slot(slot)?;
        if t.width() != expected {
            return Err(PipelineError::BadInput(format!(
                "stage `{slot}` has rows of {} but {what} needs {expected}",
                t.width()
            )));
        }
        Ok(t.rows())
    }
}

/// The rotation's scalar arguments: attention factor and interleaving.
fn rope_args(rope: &MlaRope, dims: MlaDims) -> Result<(f64, u32)> {
    if !dims.qk_rope.is_multiple_of(2) || rope.inv_freq.len() < dims.qk_rope / 2 {
        return Err(PipelineError::BadInput(format!(
            "MLA's rope part of {} columns needs {} frequencies, the rotation has {}",
            dims.qk_rope,
            dims.qk_rope / 2,
            rope.inv_freq.len()
        )));
    }
    Ok((rope.attention_factor, u32::from(rope.interleave)))
}

impl MlaOps for CudaBackend {
    fn latent_norm(&mut self, kv_a: Slot, weight: WeightId, eps: f64, out: Slot) -> Result<()> {
        self.timed(out.name(), &[kv_a], |this| {
            let x = this.slot(kv_a)?;
            let (rows, in_width, width) = (x.rows(), x.width(), this.store.get(weight).numel());
            if width > in_width {
                return Err(PipelineError::BadInput(format!(
                    "the latent norm covers {width} columns but `{kv_a}` has {in_width}"
                )));
            }
            let mut o = this.alloc(rows * width)?;
            let f = this.weight_kernel(norm::RMS_NORM_COLS)?;
            let stream = this.stream();
            let (iw, w32, e32) = (in_width as u32, width as u32, eps as f32);
            let mut b = stream.launch_builder(&f);
            b.arg(&mut o).arg(x.f32(kv_a)?);
            push_weight(&mut b, this.weight(weight))?;
            b.arg(&iw).arg(&w32).arg(&e32);
            // SAFETY: one block per row; reads `width` <= in_width columns of
            // each input row, writes rows * width.
            unsafe { b.launch(super::norm::row_blocks(rows, width)) }.map_err(gpu("mla latent norm"))?;
            this.set(out, vec![rows, width], o)
        })
    }

    fn query_rope(&mut self, q: Slot, dims: MlaDims, rope: &MlaRope, out: Slot) -> Result<()> {
        self.timed(out.name(), &[q], |this| {
            this.refuse_in_capture("MLA's rotation takes the step's length from the host")?;
            let (factor, interleave) = rope_args(rope, dims)?;
            let rows = this.mla_rows(q, dims.heads * dims.qk_head(), "MLA's query")?;
            this.upload_rope(rope)?;
            let n = rows * dims.heads * dims.qk_head();
            let mut o = this.alloc(n)?;
            let f = this.kernel(mla::QUERY_ROPE)?;
            let stream = this.stream();
            let a = (rows as u32, dims.heads as u32, dims.qk_nope as u32, dims.qk_rope as u32);
            let table = &this.rope_table.as_ref().expect("uploaded above").1;
            let mut b = stream.launch_builder(&f);
            b.arg(&mut o).arg(this.slot(q)?.f32(q)?).arg(table).arg(&factor).arg(&interleave);
            b.arg(&a.0).arg(&a.1).arg(&a.2).arg(&a.3).arg(&this.step_start);
            // SAFETY: one thread per (row, head, nope column or rope pair):
            // reads and writes within rows of heads * (nope + rope); the
            // table holds rope / 2 frequencies (checked).
            unsafe { b.launch(threads(rows * dims.heads * (dims.qk_nope + dims.qk_rope / 2))) }
                .map_err(gpu("mla query rope"))?;
            this.set(out, vec![rows, dims.heads * dims.qk_head()], o)
        })
    }

    fn keys(&mut self, kv_a: Slot, kv_b: Slot, dims: MlaDims, rope: &MlaRope, out: Slot) -> Result<()> {
        self.timed(out.name(), &[kv_a, kv_b], |this| {
            this.refuse_in_capture("MLA's keys take the step's length from the host")?;
            let (factor, interleave) = rope_args(rope, dims)?;
            let rows = this.mla_rows(kv_a, dims.kv_lora_rank + dims.qk_rope, "MLA's latent and rope key")?;
            let b_rows = this.mla_rows(kv_b, dims.heads * (dims.qk_nope + dims.v_head_dim), "MLA's kv_b")?;
            if b_rows != rows {
                return Err(PipelineError::BadInput(format!("`{kv_a}` has {rows} rows but `{kv_b}` {b_rows}")));
            }
            this.upload_rope(rope)?;
            let mut o = this.alloc(rows * dims.heads * dims.qk_head())?;
            let f = this.kernel(mla::KEYS)?;
            let stream = this.stream();
            let a = (
                rows as u32,
                dims.heads as u32,
                dims.kv_lora_rank as u32,
                dims.qk_nope as u32,
                dims.qk_rope as u32,
                dims.v_head_dim as u32,
            );
            let table = &this.rope_table.as_ref().expect("uploaded above").1;
            let mut b = stream.launch_builder(&f);
            b.arg(&mut o).arg(this.slot(kv_a)?.f32(kv_a)?).arg(this.slot(kv_b)?.f32(kv_b)?);
            b.arg(table).arg(&factor).arg(&interleave);
            b.arg(&a.0).arg(&a.1).arg(&a.2).arg(&a.3).arg(&a.4).arg(&a.5).arg(&this.step_start);
            // SAFETY: one thread per (row, head, nope column or rope pair);
            // kv_a rows of latent + rope, kv_b rows of heads * (nope + v),
            // both with `rows` rows (checked).
            unsafe { b.launch(threads(rows * dims.heads * (dims.qk_nope + dims.qk_rope / 2))) }
                .map_err(gpu("mla keys"))?;
            this.set(out, vec![rows, dims.heads * dims.qk_head()], o)
        })
    }

    fn append_kv(&mut self, layer: usize, keys: Slot, kv_b: Slot, dims: MlaDims) -> Result<()> {
        self.timed("append_kv", &[keys, kv_b], |this| {
            let (kw, vw) = (dims.heads * dims.qk_head(), dims.heads * dims.v_head_dim);
            let rows = this.mla_rows(keys, kw, "MLA's keys")?;
            let b_rows = this.mla_rows(kv_b, dims.heads * (dims.qk_nope + dims.v_head_dim), "MLA's kv_b")?;
            if b_rows != rows {
                return Err(PipelineError::BadInput(format!("`{keys}` has {rows} rows but `{kv_b}` {b_rows}")));
            }
            this.ensure_cache(layer, rows, kw, vw)?;
            let f = this.kernel(mla::APPEND_KV)?;
            let stream = this.stream();
            let cache = this.caches[layer].as_mut().expect("ensured above");
            let kt = this.activations.slots.get(keys).expect("checked").f32(keys)?;
            let bt = this.activations.slots.get(kv_b).expect("checked").f32(kv_b)?;
            let a =
                (rows as u32, dims.heads as u32, dims.qk_head() as u32, dims.qk_nope as u32, dims.v_head_dim as u32);
            let mut b = stream.launch_builder(&f);
            b.arg(&mut cache.k).arg(&mut cache.v).arg(kt).arg(bt).arg(&this.step_start);
            b.arg(&a.0).arg(&a.1).arg(&a.2).arg(&a.3).arg(&a.4);
            // SAFETY: rows key rows of kw and value rows of vw written at
            // rows start.. of caches holding >= start + rows rows.
            unsafe { b.launch(threads(rows * (kw + vw))) }.map_err(gpu("appending to MLA's KV cache"))?;
            cache.len = this.start_position + rows;
            Ok(())
        })
    }

    fn scores(&mut self, layer: usize, q: Slot, dims: MlaDims, scale: f64, out: Slot) -> Result<()> {
        self.timed(out.name(), &[q], |this| {
            this.refuse_in_capture("MLA's scores take the step's length from the host")?;
            let qk = dims.qk_head();
            let t_len = this.mla_rows(q, dims.heads * qk, "MLA's scores")?;
            let cache = this.cache(layer)?;
            if cache.width != dims.heads * qk {
                return Err(PipelineError::BadInput(format!(
                    "layer {layer}'s key cache has rows of {}, MLA's scores need {}",
                    cache.width,
                    dims.heads * qk
                )));
            }
            let p_len = cache.len;
            let n = dims.heads * t_len * p_len;
            let mut o = this.alloc(n)?;
            let f = this.kernel(mla::SCORES)?;
            let stream = this.stream();
            let a =
                (t_len as u32, p_len as u32, dims.heads as u32, qk as u32, scale as f32, this.start_position as u32);
            let mut b = stream.launch_builder(&f);
            b.arg(&mut o).arg(this.slot(q)?.f32(q)?).arg(&cache.k);
            b.arg(&a.0).arg(&a.1).arg(&a.2).arg(&a.3).arg(&a.4).arg(&a.5);
            // SAFETY: one thread per score of [nh, T, P]; q rows and cache
            // rows of nh * qk (checked), P cached positions.
            unsafe { b.launch(threads(n)) }.map_err(gpu("mla scores"))?;
            this.set(out, vec![dims.heads, t_len, p_len], o)
        })
    }

    fn attention(&mut self, layer: usize, probs: Slot, dims: MlaDims, out: Slot) -> Result<()> {
        self.timed(out.name(), &[probs], |this| {
            this.refuse_in_capture("MLA's attention takes the step's length from the host")?;
            let pt = this.slot(probs)?;
            if pt.shape.len() != 3 || pt.shape[0] != dims.heads {
                return Err(PipelineError::BadInput(format!(
                    "attention needs [{},T,P] probabilities, got {:?}",
                    dims.heads, pt.shape
                )));
            }
            let (t_len, p_len) = (pt.shape[1], pt.shape[2]);
            let cache = this.cache(layer)?;
            if cache.len != p_len || cache.v_width != dims.heads * dims.v_head_dim {
                return Err(PipelineError::BadInput(format!(
                    "attention: {p_len} probabilities over {} cached values of width {} (MLA needs {})",
                    cache.len,
                    cache.v_width,
                    dims.heads * dims.v_head_dim
                )));
            }
            let n = t_len * dims.heads * dims.v_head_dim;
            let mut o = this.alloc(n)?;
            let f = this.kernel(mla::ATTENTION)?;
            let stream = this.stream();
            let a = (t_len as u32, p_len as u32, dims.heads as u32, dims.v_head_dim as u32, this.start_position as u32);
            let mut b = stream.launch_builder(&f);
            b.arg(&mut o).arg(pt.f32(probs)?).arg(&cache.v);
            b.arg(&a.0).arg(&a.1).arg(&a.2).arg(&a.3).arg(&a.4);
            // SAFETY: one thread per output of [T, nh * v]; probs [nh, T, P]
            // and P cached value rows of nh * v (checked).
            unsafe { b.launch(threads(n)) }.map_err(gpu("mla attention"))?;
            this.set(out, vec![t_len, dims.heads * dims.v_head_dim], o)
        })
    }
}

impl GroupedRouting for CudaBackend {
    fn route_grouped(&mut self, logits: Slot, bias: WeightId, router: &GroupedTopK, out: GroupedSlots) -> Result<()> {
        self.timed(out.group_scores.name(), &[logits], |this| {
            let l = this.slot(logits)?;
            let (rows, experts) = (l.rows(), l.width());
            router.check(experts).map_err(PipelineError::BadInput)?;
            if this.store.get(bias).numel() != experts {
                return Err(PipelineError::BadInput(format!(
                    "the router's correction bias has {} entries for {experts} experts",
                    this.store.get(bias).numel()
                )));
            }
            let k = router.top_k;
            if router.n_group > MAX_GROUPS || experts > MAX_EXPERTS || k > MAX_TOP_K {
                return Err(PipelineError::BadInput(format!(
                    "the CUDA grouped router takes at most {MAX_GROUPS} groups, {MAX_EXPERTS} experts and top-{MAX_TOP_K} \
                     (this model: {} groups, {experts} experts, top-{k}); run it with backend: Cpu",
                    router.n_group
                )));
            }
            let (n_group, kept) = (router.n_group, router.topk_group);
            let mut w = this.alloc(rows * k)?;
            let mut ids = this.alloc_ids(rows * k)?;
            let mut scores = this.alloc(rows * n_group)?;
            let mut groups = this.alloc_ids(rows * kept)?;
            let f = this.weight_kernel(mla::ROUTER_GROUPED)?;
            let stream = this.stream();
            let a = (
                rows as u32,
                experts as u32,
                router.n_group as u32,
                router.topk_group as u32,
                k as u32,
                u32::from(router.normalise),
                router.scaling,
            );
            let mut b = stream.launch_builder(&f);
            b.arg(&mut w).arg(&mut ids).arg(&mut scores).arg(&mut groups).arg(l.f32(logits)?);
            push_weight(&mut b, this.weight(bias))?;
            b.arg(&a.0).arg(&a.1).arg(&a.2).arg(&a.3).arg(&a.4).arg(&a.5).arg(&a.6);
            // SAFETY: one thread per token writing its k weights and ids,
            // its n_group group scores and topk_group groups; the limits of
            // the kernel's arrays are checked above.
            unsafe { b.launch(threads(rows)) }.map_err(gpu("router_grouped"))?;
            this.set(out.group_scores, vec![rows, n_group], scores)?;
            this.store(out.groups, DevTensor::new(vec![rows, kept], DevData::I32(groups)))?;
            this.set(out.weights, vec![rows, k], w)?;
            this.store(out.indices, DevTensor::new(vec![rows, k], DevData::I32(ids)))
        })
    }
}
