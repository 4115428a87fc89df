//! Attention of many rows in one kernel (`attention_fused_f32`, or
//! `attention_fused_mma` on tensor cores in Bf16 mode), with no
//! `[nh, T, P]` tensor in memory unless a stage of it is read.
//!
//! When a step has more than [`FUSED_MIN_ROWS`] rows, the attn_scores and
//! attn_softmax stages only note what they would compute (an
//! [`AttentionPlan`]; their slots stay empty, *lazy*), and the attention
//! stage launches one kernel that computes scores, softmax and softmax·V.
//! A lazy stage that is read (a capture, a hook, another operation's
//! input) is materialised by the same kernel with that stage's store
//! switched on: it holds exactly the values the fused output was computed
//! from, and the output's bits do not depend on what was read.
//!
//! A plan ends when its q is replaced (the next layer's RoPE), when the
//! layer's KV cache is replaced, or at the next step: its lazy stages are
//! then gone (a read names the stage and why). Writing a stage of the plan
//! (a fault, teacher forcing) first materialises the plan's other lazy
//! stages, then ends the fusion: the stages after it read the written
//! tensor through the unfused kernels.

use cudarc::driver::{LaunchConfig, PushKernelArg};
use kernels_cuda::kernels::attention;

use super::{CudaBackend, CudaPrecision, gpu};
use crate::backend::{AttentionShape, Slot};
use crate::error::{PipelineError, Result};

/// Steps of more rows than this fuse attention (fewer rows over a long
/// context split the positions instead: attention.rs).
pub(super) const FUSED_MIN_ROWS: usize = 16;

/// Rows per block of the fused kernel (FA_ROWS in attention.cu), and of
/// its tensor-core form (FM_ROWS).
const FUSED_ROWS: usize = 16;
const FUSED_MMA_ROWS: usize = 64;

/// The largest head dimension the fused kernel takes (FA_MAX_HD).
const FUSED_MAX_HEAD_DIM: usize = 128;

/// What the fused kernel stores (FA_SCORES, FA_PROBS, FA_OUT).
#[derive(Clone, Copy)]
enum Store {
    Scores = 1,
    Probs = 2,
    Out = 4,
}

/// The attention of one layer of a step, computed when it is needed.
pub(super) struct AttentionPlan {
    layer: usize,
    q: Slot,
    shape: AttentionShape,
    /// The attn_scores stage's slot.
    scores: Slot,
    /// The attn_softmax stage's slot, once that stage has run.
    probs: Option<Slot>,
    /// Stages of the plan not computed yet.
    lazy: Vec<Slot>,
    /// Whether the attention stage may still fuse (no stage was written).
    fusable: bool,
}

impl AttentionPlan {
    fn holds(&self, slot: Slot) -> bool {
        slot == self.scores || self.probs == Some(slot)
    }
}

impl CudaBackend {
    /// Whether attention of a step of `rows` rows fuses.
    pub(super) fn fuses_attention_of(&self, rows: usize, head_dim: usize) -> bool {
        self.fuse_attention && rows > FUSED_MIN_ROWS && head_dim <= FUSED_MAX_HEAD_DIM
    }

    /// attn_scores of a fused step: checks what the kernel will read and
    /// notes the stage.
    pub(super) fn plan_attention(&mut self, layer: usize, q: Slot, shape: AttentionShape, out: Slot) -> Result<()> {
        let qt = self.slot(q)?;
        if qt.shape != [self.t_len, shape.heads * shape.head_dim] {
            return Err(PipelineError::BadInput(format!(
                "attn_scores: q holds {:?}, expected [{}, {}]",
                qt.shape,
                self.t_len,
                shape.heads * shape.head_dim
            )));
        }
        self.cache(layer)?;
        self.end_attention_plan();
        self.drop_slot(out);
        self.attention_plan =
            Some(AttentionPlan { layer, q, shape, scores: out, probs: None, lazy: vec![out], fusable: true });
        Ok(())
    }

    /// attn_softmax: joins the plan when `scores` is its lazy or
    /// materialised scores; false when the unfused kernel must run.
    pub(super) fn plan_softmax(&mut self, scores: Slot, out: Slot) -> bool {
        let Some(plan) = self.attention_plan.as_mut().filter(|p| p.fusable && p.scores == scores) else {
            return false;
        };
        if plan.probs.is_some() || out == plan.q || out == scores {
            return false;
        }
        plan.probs = Some(out);
        plan.lazy.push(out);
        self.drop_slot(out);
        true
    }

    /// attention: the fused kernel's output when `probs` is the plan's
    /// softmax; false when the unfused kernel must run.
    pub(super) fn fused_attention(
        &mut self,
        layer: usize,
        probs: Slot,
        shape: AttentionShape,
        out: Slot,
    ) -> Result<bool> {
        let Some(plan) = self.attention_plan.as_ref() else { return Ok(false) };
        let same = plan.layer == layer && plan.shape == shape && plan.probs == Some(probs);
        if !plan.fusable || !same || plan.q == out || plan.holds(out) {
            return Ok(false);
        }
        let n = self.t_len * plan.shape.heads * plan.shape.head_dim;
        let mut o = self.alloc(n)?;
        self.launch_fused(&mut o, Store::Out)?;
        let width = plan.shape.heads * plan.shape.head_dim;
        self.set(out, vec![self.t_len, width], o)?;
        Ok(true)
    }

    /// Computes the lazy stages among `slots` (operation inputs, reads).
    pub(super) fn materialise(&mut self, slots: &[Slot]) -> Result<()> {
        for &slot in slots {
            let lazy = self.attention_plan.as_ref().is_some_and(|p| p.lazy.contains(&slot));
            if !lazy {
                continue;
            }
            let plan = self.attention_plan.as_ref().expect("checked");
            let store = if slot == plan.scores { Store::Scores } else { Store::Probs };
            let shape = vec![plan.shape.heads, self.t_len, self.start_position + self.t_len];
            let mut o = self.alloc(shape.iter().product())?;
            self.launch_fused(&mut o, store)?;
            let plan = self.attention_plan.as_mut().expect("checked");
            plan.lazy.retain(|&s| s != slot);
            self.put(slot, super::tensors::DevTensor::new(shape, super::tensors::DevData::F32(o)));
        }
        Ok(())
    }

    /// Before `slot` is written or replaced: a written stage of the plan
    /// materialises the plan's other lazy stages and ends the fusion; a
    /// replaced q ends the plan.
    pub(super) fn before_slot_write(&mut self, slot: Slot) -> Result<()> {
        let Some(plan) = self.attention_plan.as_ref() else { return Ok(()) };
        if slot == plan.q {
            self.end_attention_plan();
        } else if plan.holds(slot) {
            let others: Vec<Slot> = plan.lazy.iter().copied().filter(|&s| s != slot).collect();
            self.materialise(&others)?;
            let plan = self.attention_plan.as_mut().expect("checked");
            plan.lazy.retain(|&s| s != slot);
            plan.fusable = false;
        }
        Ok(())
    }

    /// Before the KV cache of `layer` is replaced.
    pub(super) fn before_cache_write(&mut self, layer: usize) {
        if self.attention_plan.as_ref().is_some_and(|p| p.layer == layer) {
            self.end_attention_plan();
        }
    }

    /// Ends the plan; its lazy stages are gone.
    pub(super) fn end_attention_plan(&mut self) {
        if let Some(plan) = self.attention_plan.take() {
            self.gone = plan.lazy;
        }
    }

    /// The error for reading a stage that is not in its slot.
    pub(super) fn missing_slot(&self, slot: Slot) -> PipelineError {
        let lazy = self.attention_plan.as_ref().is_some_and(|p| p.lazy.contains(&slot));
        if lazy || self.gone.contains(&slot) {
            return PipelineError::BadInput(format!(
                "stage `{slot}` was computed inside the fused attention kernel and is kept only while its layer's \
                 q and KV cache are: read it before the next layer's RoPE (scope observers do)"
            ));
        }
        PipelineError::BadInput(format!("stage `{slot}` has not been computed in this step"))
    }

    /// Launches `attention_fused_f32` for the plan, storing into `o`.
    fn launch_fused(&self, o: &mut cudarc::driver::CudaSlice<f32>, store: Store) -> Result<()> {
        let plan = self.attention_plan.as_ref().expect("a plan to launch");
        let qt = self.slot(plan.q)?;
        let cache = self.cache(plan.layer)?;
        let (t_len, p_len) = (self.t_len, cache.len);
        // Tensor cores where the inputs are bf16 values (exact as bf16).
        let mma = self.precision == CudaPrecision::Bf16 && plan.shape.head_dim.is_multiple_of(16);
        let (kernel, rows) = if mma { (attention::FUSED_MMA, FUSED_MMA_ROWS) } else { (attention::FUSED, FUSED_ROWS) };
        let f = self.kernel(kernel)?;
        let stream = self.stream();
        let s = plan.shape;
        let a = (
            t_len as u32,
            p_len as u32,
            s.heads as u32,
            s.kv_heads as u32,
            s.head_dim as u32,
            self.start_position as u32,
            store as u32,
        );
        let mut b = stream.launch_builder(&f);
        // The pointers the kernel does not store through are `o` too.
        b.arg(&*o).arg(&*o).arg(&*o).arg(qt.f32(plan.q)?).arg(&cache.k).arg(&cache.v);
        b.arg(&a.0).arg(&a.1).arg(&a.2).arg(&a.3).arg(&a.4).arg(&a.5).arg(&a.6);
        let cfg = LaunchConfig {
            grid_dim: (t_len.div_ceil(rows) as u32, s.heads as u32, 1),
            block_dim: (if mma { 256 } else { 128 }, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the kernel stores only what `store` names: scores or
        // probabilities [nh, T, P] or the output [T, nh*hd], each the
        // size `o` was allocated with, bounds-checked per element; it reads
        // q [T, >= nh*hd], and the caches' first P rows of nkv*hd; hd <=
        // FA_MAX_HD = FM_HD (fuses_attention_of), and for the tensor-core
        // form hd % 16 == 0 (16-byte loads of q and the caches).
        unsafe { b.launch(cfg) }.map_err(gpu("fused attention"))?;
        Ok(())
    }
}
