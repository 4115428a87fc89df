//! gpt-oss on CUDA (kernels/oss.cu): the [`OssOps`] capability, each
//! operation as the CPU's (backend/cpu/oss.rs) computes it, in double
//! where the CPU sums in f64, one thread per output; the window and the
//! stacked biases prepared on the host. Steps stay eager (the window is
//! the host's; graphs are ruled out for such a model).

use cudarc::driver::PushKernelArg;
use kernels_cuda::kernels::oss;

use super::tensors::{DevData, DevTensor};
use super::{CudaBackend, gpu, threads};
use crate::backend::mla::MlaRope;
use crate::backend::oss::OssOps;
use crate::backend::{AttentionShape, RopeArgs, Slot};
use crate::error::{PipelineError, Result};
use crate::oss_config::visible;
use crate::weights::WeightId;

impl CudaBackend {
    /// `[T,k,W]` of `slot`: (slots, W).
    fn slots_of(&self, slot: Slot) -> Result<(usize, usize, usize)> {
        let t = self.slot(slot)?;
        match t.shape[..] {
            [t_len, k, w] => Ok((t_len, k, w)),
            _ => Err(PipelineError::BadInput(format!("`{slot}` is {:?}, not [T,k,W]", t.shape))),
        }
    }
}

impl OssOps for CudaBackend {
    fn window(&mut self, window: Option<usize>, out: Slot) -> Result<()> {
        self.timed(out.name(), &[], |this| {
            this.refuse_in_capture("gpt-oss's window is computed on the host")?;
            let host: Vec<i32> = (0..this.t_len)
                .flat_map(|t| {
                    let (first, last) = visible(this.start_position + t, window);
                    [first as i32, last as i32]
                })
                .collect();
            let ids = this.stream().clone_htod(&host).map_err(gpu("uploading the window"))?;
            this.store(out, DevTensor::new(vec![this.t_len, 2], DevData::I32(ids)))
        })
    }

    fn rope_scaled(&mut self, input: Slot, args: RopeArgs, rope: &MlaRope, out: Slot) -> Result<()> {
        self.timed(out.name(), &[input], |this| {
            this.refuse_in_capture("gpt-oss's rotation table is uploaded from the host")?;
            let RopeArgs { col_start, heads, head_dim, .. } = args;
            let x = this.slot(input)?;
            let (rows, in_width) = (x.rows(), x.width());
            if col_start + heads * head_dim > in_width || rope.inv_freq.len() != head_dim / 2 || rope.interleave {
                return Err(PipelineError::BadInput(format!(
                    "rope reads columns {col_start}..{} of `{input}` (rows of {in_width}) with {} frequencies for head_dim {head_dim}",
                    col_start + heads * head_dim,
                    rope.inv_freq.len()
                )));
            }
            this.upload_rope(rope)?;
            let mut o = this.alloc(rows * heads * head_dim)?;
            let f = this.kernel(oss::ROPE)?;
            let stream = this.stream();
            let a = (rows as u32, heads as u32, head_dim as u32, in_width as u32, col_start as u32);
            let table = &this.rope_table.as_ref().expect("uploaded above").1;
            let mut b = stream.launch_builder(&f);
            b.arg(&mut o).arg(this.slot(input)?.f32(input)?).arg(table).arg(&rope.attention_factor);
            b.arg(&a.0).arg(&a.1).arg(&a.2).arg(&a.3).arg(&a.4).arg(&this.step_start);
            // SAFETY: one thread per (row, head, pair); reads columns
            // col..col + heads * hd of rows of in_width (checked), the table
            // holds hd / 2 frequencies (checked).
            unsafe { b.launch(threads(rows * heads * (head_dim / 2))) }.map_err(gpu("gpt-oss rope"))?;
            this.set(out, vec![rows, heads * head_dim], o)
        })
    }

    fn windowed_scores(
        &mut self,
        layer: usize,
        q: Slot,
        shape: AttentionShape,
        window: Option<usize>,
        out: Slot,
    ) -> Result<()> {
        self.timed(out.name(), &[q], |this| {
            // The softmax with sinks reads the scores: never the fused
            // kernel, which keeps them only inside itself.
            let fuse = std::mem::replace(&mut this.fuse_attention, false);
            let scores = this.attn_scores_on_device(layer, q, shape, out);
            this.fuse_attention = fuse;
            scores?;
            let Some(window) = window else { return Ok(()) };
            let t = this.slot(out)?;
            let [heads, t_len, p_len] = t.shape[..] else {
                return Err(PipelineError::BadInput(format!("scores are {:?}, not [nh,T,P]", t.shape)));
            };
            let mut o = this.alloc(heads * t_len * p_len)?;
            let f = this.kernel(oss::WINDOW_MASK)?;
            let stream = this.stream();
            let a = (heads as u32, t_len as u32, p_len as u32, window as u32);
            let mut b = stream.launch_builder(&f);
            b.arg(&mut o).arg(this.slot(out)?.f32(out)?).arg(&a.0).arg(&a.1).arg(&a.2).arg(&a.3).arg(&this.step_start);
            // SAFETY: one thread per score of [heads, t_len, p_len].
            unsafe { b.launch(threads(heads * t_len * p_len)) }.map_err(gpu("gpt-oss window mask"))?;
            this.set(out, vec![heads, t_len, p_len], o)
        })
    }

    fn softmax_with_sinks(
        &mut self,
        scores: Slot,
        window: Option<usize>,
        sinks: WeightId,
        probs_out: Slot,
        sink_out: Slot,
    ) -> Result<()> {
        self.timed(probs_out.name(), &[scores], |this| {
            let t = this.slot(scores)?;
            let [heads, t_len, p_len] = t.shape[..] else {
                return Err(PipelineError::BadInput(format!("softmax needs [nh,T,P] scores, got {:?}", t.shape)));
            };
            this.bias_buffer(&[sinks])?;
            if this.biases[&[sinks][..]].len() != heads {
                return Err(PipelineError::BadInput(format!("the sinks do not number the {heads} heads")));
            }
            let mut probs = this.alloc(heads * t_len * p_len)?;
            let mut share = this.alloc(heads * t_len)?;
            let f = this.kernel(oss::SOFTMAX_SINKS)?;
            let stream = this.stream();
            let a = (heads as u32, t_len as u32, p_len as u32, window.unwrap_or(0) as u32);
            let mut b = stream.launch_builder(&f);
            b.arg(&mut probs).arg(&mut share).arg(this.slot(scores)?.f32(scores)?).arg(&this.biases[&[sinks][..]]);
            b.arg(&a.0).arg(&a.1).arg(&a.2).arg(&a.3).arg(&this.step_start);
            // SAFETY: one thread per (head, query) row of p_len scores;
            // sinks holds `heads` values (checked).
            unsafe { b.launch(threads(heads * t_len)) }.map_err(gpu("gpt-oss softmax with sinks"))?;
            this.set(probs_out, vec![heads, t_len, p_len], probs)?;
            this.set(sink_out, vec![heads, t_len], share)
        })
    }

    fn router_bias(&mut self, logits: Slot, bias: WeightId, out: Slot) -> Result<()> {
        self.timed(out.name(), &[logits], |this| {
            this.bias_buffer(&[bias])?;
            let x = this.slot(logits)?;
            let (rows, w) = (x.rows(), x.width());
            if this.biases[&[bias][..]].len() != w {
                return Err(PipelineError::BadInput(format!("the router's bias does not fit logits of {w}")));
            }
            let mut o = this.alloc(rows * w)?;
            let f = this.kernel(oss::ROUTER_BIAS)?;
            let stream = this.stream();
            let a = (rows as u32, w as u32);
            let mut b = stream.launch_builder(&f);
            b.arg(&mut o).arg(this.slot(logits)?.f32(logits)?).arg(&this.biases[&[bias][..]]).arg(&a.0).arg(&a.1);
            // SAFETY: one thread per logit of [rows, w]; the bias holds w.
            unsafe { b.launch(threads(rows * w)) }.map_err(gpu("gpt-oss router bias"))?;
            this.set(out, vec![rows, w], o)
        })
    }

    fn expert_bias(&mut self, input: Slot, indices: Slot, biases: &[WeightId], out: Slot) -> Result<()> {
        self.timed(out.name(), &[input, indices], |this| {
            let (t_len, k, w) = this.slots_of(input)?;
            this.bias_buffer(biases)?;
            if this.biases[biases].len() != biases.len() * w {
                return Err(PipelineError::BadInput(format!("the experts' biases are not {} values each", w)));
            }
            let ids = this.slot(indices)?.i32(indices)?;
            if this.slot(indices)?.numel() != t_len * k {
                return Err(PipelineError::BadInput(format!("`{indices}` does not hold [{t_len},{k}] ids")));
            }
            let mut o = this.alloc(t_len * k * w)?;
            let f = this.kernel(oss::EXPERT_BIAS)?;
            let stream = this.stream();
            let a = ((t_len * k) as u32, w as u32);
            let mut b = stream.launch_builder(&f);
            b.arg(&mut o).arg(this.slot(input)?.f32(input)?).arg(ids).arg(&this.biases[biases]).arg(&a.0).arg(&a.1);
            // SAFETY: one thread per value of [slots, w]; the ids were
            // written by this step's router (in range of the stacked biases).
            unsafe { b.launch(threads(t_len * k * w)) }.map_err(gpu("gpt-oss expert bias"))?;
            this.set(out, vec![t_len, k, w], o)
        })
    }

    fn clamp_gate_up(&mut self, gate: Slot, up: Slot, limit: f64, out: Slot) -> Result<()> {
        self.timed(out.name(), &[gate, up], |this| {
            let (t_len, k, i) = this.slots_of(gate)?;
            if this.slots_of(up)? != (t_len, k, i) {
                return Err(PipelineError::BadInput(format!("`{gate}` and `{up}` differ in shape")));
            }
            let mut o = this.alloc(t_len * k * 2 * i)?;
            let f = this.kernel(oss::CLAMP)?;
            let stream = this.stream();
            let a = ((t_len * k) as u32, i as u32, limit as f32);
            let mut b = stream.launch_builder(&f);
            b.arg(&mut o).arg(this.slot(gate)?.f32(gate)?).arg(this.slot(up)?.f32(up)?).arg(&a.0).arg(&a.1).arg(&a.2);
            // SAFETY: one thread per value of gate ([slots, i]), writing two
            // of out ([slots, 2i]).
            unsafe { b.launch(threads(t_len * k * i)) }.map_err(gpu("gpt-oss clamp"))?;
            this.set(out, vec![t_len, k, 2 * i], o)
        })
    }

    fn clamped_swiglu(&mut self, clamped: Slot, alpha: f64, out: Slot) -> Result<()> {
        self.timed(out.name(), &[clamped], |this| {
            let (t_len, k, w) = this.slots_of(clamped)?;
            let i = w / 2;
            let mut o = this.alloc(t_len * k * i)?;
            let f = this.kernel(oss::SWIGLU)?;
            let stream = this.stream();
            let a = ((t_len * k) as u32, i as u32);
            let mut b = stream.launch_builder(&f);
            b.arg(&mut o).arg(this.slot(clamped)?.f32(clamped)?).arg(&a.0).arg(&a.1).arg(&alpha);
            // SAFETY: one thread per value of out ([slots, i]), reading two
            // of the clamped [slots, 2i].
            unsafe { b.launch(threads(t_len * k * i)) }.map_err(gpu("gpt-oss swiglu"))?;
            this.set(out, vec![t_len, k, i], o)
        })
    }
}
