//! The MoE family on the device: routing (softmax over all experts, top-k,
//! renormalise) writing weights and expert ids, the per-expert projections
//! over the stacked expert weights, and the weighted combination.

use cudarc::driver::PushKernelArg;

use super::tensors::{DevData, DevTensor};
use super::weights::{Stacked, push_weight};
use super::{CudaBackend, CudaPrecision, gpu, threads, warps};
use crate::backend::Slot;
use crate::error::{PipelineError, Result};
use crate::weights::WeightId;

impl CudaBackend {
    pub(super) fn router_top_k_on_device(
        &mut self,
        logits: Slot,
        k: usize,
        normalise: bool,
        weights_out: Slot,
        indices_out: Slot,
    ) -> Result<()> {
        let l = self.slot(logits)?;
        let (rows, experts) = (l.rows(), l.width());
        if k == 0 || k > experts || k > 64 || experts > 4096 {
            return Err(PipelineError::BadInput(format!(
                "top-{k} of {experts} experts is not supported (k 1..=64, at most 4096 experts)"
            )));
        }
        let stream = self.stream();
        let mut w = self.alloc(rows * k)?;
        let mut ids = stream.alloc_zeros::<i32>(rows * k).map_err(gpu("allocating expert ids"))?;
        let f = self.function("moe", "router_top_k_f32")?;
        let a = (rows as u32, experts as u32, k as u32, u32::from(normalise));
        let mut b = stream.launch_builder(&f);
        b.arg(&mut w).arg(&mut ids).arg(l.f32(logits)?).arg(&a.0).arg(&a.1).arg(&a.2).arg(&a.3);
        // SAFETY: one warp per token writing k weights and ids.
        unsafe { b.launch(warps(rows)) }.map_err(gpu("router_top_k"))?;
        self.set(weights_out, vec![rows, k], w)?;
        self.store(indices_out, DevTensor::new(vec![rows, k], DevData::I32(ids)));
        Ok(())
    }

    pub(super) fn expert_linear_on_device(
        &mut self,
        input: Slot,
        indices: Slot,
        experts: &[WeightId],
        out: Slot,
    ) -> Result<()> {
        let (t_len, top_k) = {
            let it = self.slot(indices)?;
            (it.shape[0], it.shape[1])
        };
        let (per_slot, width) = {
            let xt = self.slot(input)?;
            (xt.shape.len() == 3, xt.width())
        };
        let (n_out, k_in, count) = {
            let s = self.stacked(experts)?;
            (s.n_out, s.k, s.experts)
        };
        if width != k_in {
            return Err(PipelineError::BadInput(format!(
                "expert input `{input}` rows of {width}, experts expect {k_in}"
            )));
        }
        let n = t_len * top_k * n_out;
        let mut o = self.alloc(n)?;
        // bf16 weights with rows of a multiple of 8: 16-byte loads.
        let f = if self.precision == CudaPrecision::Bf16 && k_in % 8 == 0 {
            self.function("linear", "expert_linear_bf16w_v8")?
        } else {
            self.weight_function("linear", "expert_linear")?
        };
        let stream = self.stream();
        let DevData::I32(ids) = &self.slot(indices)?.data else {
            return Err(PipelineError::BadInput(format!("stage `{indices}` must hold int32 expert ids")));
        };
        let x = self.slot(input)?.f32(input)?;
        let w = &self.stacked[&experts[0]].data;
        let a = (t_len as u32, top_k as u32, k_in as u32, n_out as u32, count as u32, u32::from(per_slot));
        let mut b = stream.launch_builder(&f);
        b.arg(&mut o).arg(x).arg(ids);
        push_weight(&mut b, w);
        b.arg(&a.0).arg(&a.1).arg(&a.2).arg(&a.3).arg(&a.4).arg(&a.5);
        // SAFETY: one warp per (t, j, n); ids are range-checked in the kernel.
        unsafe { b.launch(warps(n)) }.map_err(gpu("expert_linear"))?;
        self.set(out, vec![t_len, top_k, n_out], o)
    }

    pub(super) fn moe_combine_on_device(&mut self, expert_out: Slot, weights: Slot, out: Slot) -> Result<()> {
        let (et, wt) = (self.slot(expert_out)?, self.slot(weights)?);
        if et.shape.len() != 3 || wt.shape != et.shape[..2] {
            return Err(PipelineError::BadInput("moe_combine needs [T,k,H] outputs and [T,k] weights".into()));
        }
        let (t_len, k, h) = (et.shape[0], et.shape[1], et.shape[2]);
        let mut o = self.alloc(t_len * h)?;
        let f = self.function("moe", "moe_combine_f32")?;
        let stream = self.stream();
        let a = (t_len as u32, k as u32, h as u32);
        let mut b = stream.launch_builder(&f);
        b.arg(&mut o).arg(et.f32(expert_out)?).arg(wt.f32(weights)?).arg(&a.0).arg(&a.1).arg(&a.2);
        // SAFETY: one thread per output element.
        unsafe { b.launch(threads(t_len * h)) }.map_err(gpu("moe_combine"))?;
        self.set(out, vec![t_len, h], o)
    }

    /// The stacked weights whose first expert is `experts[0]`.
    fn stacked(&self, experts: &[WeightId]) -> Result<&Stacked> {
        self.stacked
            .get(&experts[0])
            .filter(|s| s.experts == experts.len())
            .ok_or_else(|| PipelineError::BadInput("expert weights that are not a MoE layer's experts".into()))
    }
}
