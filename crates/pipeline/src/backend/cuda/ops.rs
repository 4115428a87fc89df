//! The [`Backend`] methods of the CUDA backend: set-up, steps and graphs,
//! and each operation dispatched to its family's module, timed when
//! profiling (`timed`; a launch held back for the next operation is
//! flushed first, see deferred.rs).

use kernels_cuda::kernels as handles;

use super::tensors::{DevData, DevTensor};
use super::{CudaBackend, CudaPrecision, gpu};
use crate::backend::{
    AttentionShape, Backend, DeviceSetup, QkNormArgs, RopeArgs, SharedTerm, Slot, StepGraph, StepRecorder,
};
use crate::error::{PipelineError, Result};
use crate::tensor::{HostTensor, TensorData};
use crate::weights::WeightId;

impl Backend for CudaBackend {
    fn name(&self) -> &'static str {
        "cuda"
    }

    /// F32 mode: the reference's rounding points (f32 weights and
    /// activations). Bf16 mode: bf16 weights (after decoding) and stage
    /// outputs, f32 routing (`rounds_projection`, `store_act`).
    fn numeric_contract(&self) -> crate::backend::contract::NumericContract {
        crate::backend::contract::NumericContract::cuda(self.precision)
    }

    fn dtype(&self) -> &'static str {
        match self.precision {
            CudaPrecision::F32 => "f32",
            CudaPrecision::Bf16 => "bf16",
        }
    }

    fn begin_step(&mut self, tokens: &[u32], start_position: usize) -> Result<()> {
        self.flush_deferred()?;
        // A greedy choice launched ahead serves only its own step (replays
        // leave slot versions as they are).
        self.choice.forget();
        self.plan_step(tokens.len(), start_position);
        for (layer, cache) in self.caches.iter_mut().enumerate() {
            if let Some(c) = cache {
                if c.len < start_position {
                    return Err(PipelineError::BadInput(format!(
                        "step starts at position {start_position} but the KV cache of layer {layer} holds only {}",
                        c.len
                    )));
                }
                c.len = start_position;
            }
        }
        if start_position > 0 && self.caches.iter().all(|c| c.is_none()) {
            return Err(PipelineError::BadInput(format!(
                "step starts at position {start_position} but the KV cache is empty"
            )));
        }
        if let Some(p) = self.launcher.profiler() {
            p.begin_step(tokens.len());
        }
        let stream = self.stream();
        match self.tokens.as_mut().filter(|t| t.len() >= tokens.len()) {
            Some(buffer) => stream.memcpy_htod(tokens, &mut buffer.slice_mut(..tokens.len())),
            None => stream.clone_htod(tokens).map(|t| self.tokens = Some(t)),
        }
        .map_err(gpu("uploading tokens"))?;
        stream.memcpy_htod(&[start_position as u32], &mut self.step_start).map_err(gpu("uploading the position"))?;
        self.t_len = tokens.len();
        self.start_position = start_position;
        // A replay fills the buffers the recorded step left in the slots.
        if self.graphs.plan != StepGraph::Replay {
            self.recycle_slots();
        }
        Ok(())
    }

    fn recorder(&mut self) -> Option<&mut dyn StepRecorder> {
        Some(self)
    }

    fn device_setup(&mut self) -> Option<&mut dyn DeviceSetup> {
        Some(self)
    }

    fn mla(&mut self) -> Option<&mut dyn crate::backend::mla::MlaOps> {
        Some(self)
    }

    fn grouped_router(&mut self) -> Option<&mut dyn crate::backend::grouped_router::GroupedRouting> {
        Some(self)
    }

    fn oss(&mut self) -> Option<&mut dyn crate::backend::oss::OssOps> {
        Some(self)
    }

    fn expert_parallel(&mut self) -> Option<&mut dyn crate::backend::expert_parallel::ExpertParallelOps> {
        Some(self)
    }

    fn embedding(&mut self, table: WeightId, out: Slot) -> Result<()> {
        self.timed(out.name(), &[], |this| this.embedding_on_device(table, out))
    }

    fn rms_norm(&mut self, input: Slot, weight: WeightId, eps: f64, out: Slot) -> Result<()> {
        self.timed(out.name(), &[input], |this| this.rms_norm_on_device(input, weight, eps, out))
    }

    fn linear(&mut self, input: Slot, weights: &[WeightId], out: Slot) -> Result<()> {
        self.timed(out.name(), &[input], |this| this.linear_on_device(input, weights, out))?;
        if out == Slot::LmHead && !self.graphs.capturing {
            // The greedy choice goes ahead of the capture copies of the
            // logits (see `launch_choice`); a recorded step's is launched
            // after each replay.
            self.launch_choice(out)?;
        }
        Ok(())
    }

    fn add_bias(&mut self, input: Slot, biases: &[WeightId], out: Slot) -> Result<()> {
        self.timed(out.name(), &[input], |this| this.add_bias_on_device(input, biases, out))
    }

    fn qk_norm(&mut self, input: Slot, args: QkNormArgs, out: Slot) -> Result<()> {
        self.timed(out.name(), &[input], |this| this.qk_norm_on_device(input, args, out))
    }

    fn rope(&mut self, input: Slot, args: RopeArgs, out: Slot) -> Result<()> {
        self.timed_deferring(out.name(), &[input], |this| this.rope_on_device(input, args, out))
    }

    fn append_kv(&mut self, layer: usize, k: Slot, v: Slot, v_col: usize) -> Result<()> {
        self.timed("append_kv", &[k, v], |this| this.append_kv_on_device(layer, k, v, v_col))
    }

    fn attn_scores(&mut self, layer: usize, q: Slot, shape: AttentionShape, out: Slot) -> Result<()> {
        self.timed(out.name(), &[q], |this| this.attn_scores_on_device(layer, q, shape, out))
    }

    fn attn_softmax(&mut self, scores: Slot, out: Slot) -> Result<()> {
        self.timed(out.name(), &[], |this| this.attn_softmax_on_device(scores, out))
    }

    fn attention(&mut self, layer: usize, probs: Slot, shape: AttentionShape, out: Slot) -> Result<()> {
        self.timed(out.name(), &[], |this| this.attention_on_device(layer, probs, shape, out))
    }

    fn add(&mut self, a: Slot, b: Slot, out: Slot) -> Result<()> {
        self.timed(out.name(), &[a, b], |this| this.elementwise(handles::elementwise::ADD, &[a, b], out))
    }

    fn silu(&mut self, input: Slot, out: Slot) -> Result<()> {
        self.timed(out.name(), &[input], |this| this.elementwise(handles::elementwise::SILU, &[input], out))
    }

    fn sigmoid(&mut self, input: Slot, out: Slot) -> Result<()> {
        self.timed(out.name(), &[input], |this| this.elementwise(handles::elementwise::SIGMOID, &[input], out))
    }

    fn mul(&mut self, a: Slot, b: Slot, out: Slot) -> Result<()> {
        self.timed(out.name(), &[a, b], |this| this.elementwise(handles::elementwise::MUL, &[a, b], out))
    }

    fn swiglu(&mut self, gate: Slot, up: Slot, out: Slot) -> Result<()> {
        self.timed(out.name(), &[gate, up], |this| this.elementwise(handles::elementwise::SWIGLU, &[gate, up], out))
    }

    fn router_top_k(
        &mut self,
        logits: Slot,
        k: usize,
        normalise: bool,
        weights_out: Slot,
        indices_out: Slot,
    ) -> Result<()> {
        self.timed(weights_out.name(), &[logits], |this| {
            this.router_top_k_on_device(logits, k, normalise, weights_out, indices_out)
        })
    }

    fn expert_linear(&mut self, input: Slot, indices: Slot, experts: &[WeightId], out: Slot) -> Result<()> {
        self.timed_deferring(out.name(), &[input, indices], |this| {
            this.expert_linear_on_device(input, indices, experts, out)
        })
    }

    fn moe_combine(&mut self, expert_out: Slot, weights: Slot, shared: Option<SharedTerm>, out: Slot) -> Result<()> {
        let mut inputs = vec![expert_out, weights];
        inputs.extend(shared.iter().flat_map(|s| std::iter::once(s.out).chain(s.weight)));
        self.timed(out.name(), &inputs, |this| this.moe_combine_on_device(expert_out, weights, shared, out))
    }

    fn read(&mut self, slot: Slot) -> Result<HostTensor> {
        self.flush_deferred()?;
        self.materialise(&[slot])?;
        let t = self.slot(slot)?;
        let stream = self.stream();
        // A buffer sized for the KV capacity holds more than the shape.
        let numel = t.numel();
        Ok(match &t.data {
            DevData::F32(d) => HostTensor::f32(
                t.shape.clone(),
                stream.clone_dtoh(&d.slice(..numel)).map_err(gpu("copying to the host"))?,
            ),
            DevData::I32(d) => HostTensor::i32(
                t.shape.clone(),
                stream.clone_dtoh(&d.slice(..numel)).map_err(gpu("copying to the host"))?,
            ),
        })
    }

    fn read_async(&mut self, slot: Slot) -> Result<crate::tensor::PendingTensor> {
        if self.taps.observing {
            return self.read_copied(slot);
        }
        self.timed("(capture copy)", &[slot], |this| this.read_async_on_device(slot))
    }

    fn write(&mut self, slot: Slot, tensor: &HostTensor) -> Result<()> {
        self.flush_deferred()?;
        let stream = self.stream();
        let data = match &tensor.data {
            TensorData::F32(v) => DevData::F32(stream.clone_htod(v).map_err(gpu("copying to the device"))?),
            TensorData::I32(v) => DevData::I32(stream.clone_htod(v).map_err(gpu("copying to the device"))?),
        };
        self.store(slot, DevTensor::new(tensor.shape.clone(), data))?;
        Ok(())
    }

    fn kv_cache(&mut self, layer: usize) -> Result<(HostTensor, HostTensor)> {
        self.flush_deferred()?;
        self.kv_cache_on_device(layer)
    }

    fn set_kv_cache(&mut self, layer: usize, keys: &HostTensor, values: &HostTensor) -> Result<()> {
        self.flush_deferred()?;
        self.before_cache_write(layer);
        self.set_kv_cache_on_device(layer, keys, values)
    }

    fn argmax_last_row(&mut self, slot: Slot) -> Result<u32> {
        self.flush_deferred()?;
        self.materialise(&[slot])?;
        self.argmax_on_device(slot)
    }
}
