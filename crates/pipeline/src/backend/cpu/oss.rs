//! gpt-oss on the CPU: the [`OssOps`] its stage systems (stages/oss.rs)
//! call, as transformers' `GptOssForCausalLM` computes them, in the
//! reference's arithmetic (f32 storage, f64 sums):
//!
//! - windows as transformers' sliding-window mask: a query at position i
//!   sees keys `i - window + 1 ..= i` (`kv_idx > q_idx - sliding_window`);
//! - the sink: `softmax([scores over the window, sink])` with the sink's
//!   column dropped afterwards (`eager_attention_forward`), so the row's
//!   probabilities sum to 1 minus the sink's share;
//! - the clamped SwiGLU (`GptOssExperts._apply_gate`): gate clamped above
//!   at the limit, up to +-limit, `(up + 1) * gate * sigmoid(alpha *
//!   gate)`.
//!
//! The bugs engines shipped here ([`KnownBug`]'s gpt-oss variants) are
//! reproduced where a CPU target names one.

use super::CpuBackend;
use super::attention::HeadDims;
use super::known_bugs::KnownBug;
use crate::backend::mla::MlaRope;
use crate::backend::oss::OssOps;
use crate::backend::{AttentionShape, RopeArgs, Slot};
use crate::error::{PipelineError, Result};
use crate::oss_config::visible;
use crate::tensor::HostTensor;
use crate::weights::WeightId;

impl CpuBackend {
    /// The window this backend applies where the model says `window`: the
    /// model's, or a bug's.
    fn applied_window(&self, window: Option<usize>) -> Option<usize> {
        match (self.bug, window) {
            (Some(KnownBug::WindowOffByOne), Some(w)) => Some(w + 1),
            (Some(KnownBug::FullLayerWindowed(w)), None) => Some(w),
            _ => window,
        }
    }

    /// Query row `t`'s visible key positions (first, last) under `window`.
    fn row_window(&self, t: usize, window: Option<usize>) -> (usize, usize) {
        visible(self.start_position + t, self.applied_window(window))
    }

    /// `[T,k,W]` rows of `slot` as (T, k, W, values).
    fn per_slot(&self, slot: Slot) -> Result<(usize, usize, usize, &[f32])> {
        let t = self.slot(slot)?;
        let [t_len, k, w] = t.shape[..] else {
            return Err(PipelineError::BadInput(format!("`{slot}` is {:?}, not [T,k,W]", t.shape)));
        };
        let values = t.as_f32().ok_or_else(|| PipelineError::BadInput(format!("`{slot}` is not float")))?;
        Ok((t_len, k, w, values))
    }
}

impl OssOps for CpuBackend {
    fn window(&mut self, window: Option<usize>, out: Slot) -> Result<()> {
        let t_len = self.tokens.len();
        let data = (0..t_len)
            .flat_map(|t| {
                let (first, last) = self.row_window(t, window);
                [first as i32, last as i32]
            })
            .collect();
        self.set(out, HostTensor::i32(vec![t_len, 2], data));
        Ok(())
    }

    fn rope_scaled(&mut self, input: Slot, args: RopeArgs, rope: &MlaRope, out: Slot) -> Result<()> {
        let RopeArgs { col_start, heads, head_dim, .. } = args;
        let (rows, width, x) = self.rows(input)?;
        let out_width = heads * head_dim;
        if col_start + out_width > width || rope.inv_freq.len() != head_dim / 2 {
            return Err(PipelineError::BadInput(format!(
                "rope reads columns {col_start}..{} of `{input}` (rows of {width}) with {} frequencies for head_dim {head_dim}",
                col_start + out_width,
                rope.inv_freq.len()
            )));
        }
        let mut data = vec![0.0f32; rows * out_width];
        for (t, (o, xr)) in data.chunks_mut(out_width).zip(x.chunks(width)).enumerate() {
            let xr = &xr[col_start..col_start + out_width];
            for (oh, xh) in o.chunks_mut(head_dim).zip(xr.chunks(head_dim)) {
                rope.rotate(xh, self.start_position + t, oh);
            }
        }
        self.set(out, HostTensor::f32(vec![rows, out_width], data));
        Ok(())
    }

    fn windowed_scores(
        &mut self,
        layer: usize,
        q: Slot,
        shape: AttentionShape,
        window: Option<usize>,
        out: Slot,
    ) -> Result<()> {
        let AttentionShape { heads, kv_heads, head_dim } = shape;
        let dims = HeadDims { heads, kv_heads, qk: head_dim, v: head_dim };
        let t_len = self.rows(q)?.0;
        let firsts: Vec<usize> = (0..t_len).map(|t| self.row_window(t, window).0).collect();
        self.scores_with(layer, q, dims, 1.0 / (head_dim as f64).sqrt(), Some(&firsts), out)
    }

    fn softmax_with_sinks(
        &mut self,
        scores: Slot,
        window: Option<usize>,
        sinks: WeightId,
        probs_out: Slot,
        sink_out: Slot,
    ) -> Result<()> {
        let t = self.slot(scores)?;
        let [heads, t_len, p_len] = t.shape[..] else {
            return Err(PipelineError::BadInput(format!("softmax needs [nh,T,P] scores, got {:?}", t.shape)));
        };
        let sink = self.weight(sinks);
        if sink.len() != heads {
            return Err(PipelineError::BadInput(format!("{} sinks for {heads} heads", sink.len())));
        }
        let dropped = self.bug == Some(KnownBug::SinksDropped);
        let rows: Vec<(usize, usize)> = (0..t_len).map(|r| self.row_window(r, window)).collect();
        let mut data = t.as_f32().expect("scores are float").to_vec();
        let mut shares = vec![0.0f32; heads * t_len];
        for (r, row) in data.chunks_mut(p_len).enumerate() {
            let (first, last) = rows[r % t_len];
            let last = last.min(p_len.saturating_sub(1));
            let s = (!dropped).then(|| f64::from(sink[r / t_len]));
            let seen = &row[first..=last];
            let max = seen.iter().fold(s.unwrap_or(f64::NEG_INFINITY), |m, &x| m.max(f64::from(x)));
            let exps: Vec<f64> = seen.iter().map(|&x| (f64::from(x) - max).exp()).collect();
            let sink_exp = s.map_or(0.0, |s| (s - max).exp());
            let total: f64 = exps.iter().sum::<f64>() + sink_exp;
            let nan = max.is_nan() || seen.iter().any(|x| x.is_nan());
            row.fill(0.0);
            for (o, e) in row[first..=last].iter_mut().zip(&exps) {
                *o = if nan { f32::NAN } else { (e / total) as f32 };
            }
            shares[r] = if nan { f32::NAN } else { (sink_exp / total) as f32 };
        }
        self.set(probs_out, HostTensor::f32(vec![heads, t_len, p_len], data));
        self.set(sink_out, HostTensor::f32(vec![heads, t_len], shares));
        Ok(())
    }

    fn router_bias(&mut self, logits: Slot, bias: WeightId, out: Slot) -> Result<()> {
        if self.bug == Some(KnownBug::RouterBiasDropped) {
            let t = self.slot(logits)?.clone();
            self.set(out, t);
            return Ok(());
        }
        crate::backend::Backend::add_bias(self, logits, &[bias], out)
    }

    fn expert_bias(&mut self, input: Slot, indices: Slot, biases: &[WeightId], out: Slot) -> Result<()> {
        let ids = self
            .slot(indices)?
            .as_i32()
            .map(<[i32]>::to_vec)
            .ok_or_else(|| PipelineError::BadInput(format!("stage `{indices}` must hold int32 expert ids")))?;
        let (t_len, k, w, x) = self.per_slot(input)?;
        if ids.len() != t_len * k {
            return Err(PipelineError::BadInput(format!("{} expert ids for [{t_len},{k}] slots", ids.len())));
        }
        let mut data = x.to_vec();
        for (s, row) in data.chunks_mut(w).enumerate() {
            let e = usize::try_from(ids[s]).ok().filter(|&e| e < biases.len()).ok_or_else(|| {
                PipelineError::BadInput(format!(
                    "expert id {} in `{indices}` is out of range 0..{}",
                    ids[s],
                    biases.len()
                ))
            })?;
            let b = self.weight(biases[e]);
            if b.len() != w {
                return Err(PipelineError::BadInput(format!(
                    "expert {e}'s bias has {} values for rows of {w}",
                    b.len()
                )));
            }
            for (o, &bv) in row.iter_mut().zip(&b) {
                *o = (f64::from(*o) + f64::from(bv)) as f32;
            }
        }
        self.set(out, HostTensor::f32(vec![t_len, k, w], data));
        Ok(())
    }

    fn clamp_gate_up(&mut self, gate: Slot, up: Slot, limit: f64, out: Slot) -> Result<()> {
        let (t_len, k, i, g) = self.per_slot(gate)?;
        let (ut, uk, ui, u) = self.per_slot(up)?;
        if (ut, uk, ui) != (t_len, k, i) {
            return Err(PipelineError::BadInput(format!("gate [{t_len},{k},{i}] and up [{ut},{uk},{ui}] differ")));
        }
        let kept = self.bug == Some(KnownBug::ClampDropped);
        let limit = limit as f32;
        // Comparisons keep NaN (f32::min would turn it into the limit).
        let above = |x: f32| if !kept && x > limit { limit } else { x };
        let both = |x: f32| {
            if kept {
                x
            } else if x > limit {
                limit
            } else if x < -limit {
                -limit
            } else {
                x
            }
        };
        let mut data = Vec::with_capacity(2 * g.len());
        for (gr, ur) in g.chunks(i).zip(u.chunks(i)) {
            data.extend(gr.iter().map(|&x| above(x)));
            data.extend(ur.iter().map(|&x| both(x)));
        }
        self.set(out, HostTensor::f32(vec![t_len, k, 2 * i], data));
        Ok(())
    }

    fn clamped_swiglu(&mut self, clamped: Slot, alpha: f64, out: Slot) -> Result<()> {
        let (t_len, k, w, x) = self.per_slot(clamped)?;
        let i = w / 2;
        let alpha = if self.bug == Some(KnownBug::AlphaOne) { 1.0 } else { alpha };
        let mut data = Vec::with_capacity(t_len * k * i);
        for row in x.chunks(w) {
            let (gate, up) = row.split_at(i);
            data.extend(gate.iter().zip(up).map(|(&g, &u)| {
                let g = f64::from(g);
                ((f64::from(u) + 1.0) * g / (1.0 + (-alpha * g).exp())) as f32
            }));
        }
        self.set(out, HostTensor::f32(vec![t_len, k, i], data));
        Ok(())
    }
}
