//! The elementwise family on the device (kernels/elementwise.cu):
//! embedding rows, the one-thread-per-element operations (add, mul,
//! silu, swiglu) and the greedy choice (argmax).

use cudarc::driver::{LaunchConfig, PushKernelArg};
use kernels_cuda::kernels::{Kernel, elementwise};

use super::weights::push_weight;
use super::{CudaBackend, gpu, threads};

use crate::backend::Slot;
use crate::error::{PipelineError, Result};
use crate::weights::WeightId;

/// Blocks of the greedy choice's first pass (each scans a part of the row).
const ARGMAX_BLOCKS: usize = 132;

/// The greedy choice on the device: where it lands (one u32 of pinned,
/// mapped host memory the final argmax block writes itself), each block's
/// best of the first pass, and which slot contents the last launch was of
/// (a slot and its version), until it is waited for.
pub(super) struct GreedyChoice {
    host: kernels_cuda::gather::MappedHost,
    blocks: cudarc::driver::CudaSlice<u32>,
    of: Option<(Slot, u64)>,
}

impl GreedyChoice {
    /// The host word and the blocks' buffer on `device`.
    pub(super) fn new(device: &kernels_cuda::device::GpuDevice) -> Result<Self> {
        let host = kernels_cuda::gather::MappedHost::new(device.context(), 1).map_err(super::kernel_error)?;
        let blocks =
            device.stream().alloc_zeros::<u32>(2 * ARGMAX_BLOCKS).map_err(gpu("allocating the greedy choice"))?;
        Ok(Self { host, blocks, of: None })
    }

    /// Forgets the launched choice (a new step serves its own).
    pub(super) fn forget(&mut self) {
        self.of = None;
    }
}

impl CudaBackend {
    pub(super) fn embedding_on_device(&mut self, table: WeightId, out: Slot) -> Result<()> {
        // Token ids were checked against the vocabulary by Forward::begin_step.
        let h = self.store.get(table).row_len();
        let n = self.t_len * h;
        let mut o = self.alloc(n)?;
        if matches!(self.weight(table), super::weights::DevWeight::Quant(_)) {
            self.embedding_quantized(table, h, &mut o)?;
            return self.set(out, vec![self.t_len, h], o);
        }
        let f = self.weight_kernel(elementwise::EMBEDDING)?;
        let stream = self.stream();
        let tokens = self.tokens.as_ref().ok_or_else(|| PipelineError::BadInput("no step begun".into()))?;
        let (t32, h32) = (self.t_len as u32, h as u32);
        let mut b = stream.launch_builder(&f);
        b.arg(&mut o);
        push_weight(&mut b, self.weight(table))?;
        b.arg(tokens).arg(&t32).arg(&h32);
        // SAFETY: out holds T*H, table V*H, tokens T ids < V.
        unsafe { b.launch(threads(n)) }.map_err(gpu("embedding"))?;
        self.set(out, vec![self.t_len, h], o)
    }

    pub(super) fn elementwise(&mut self, kernel: Kernel, inputs: &[Slot], out: Slot) -> Result<()> {
        let shape = self.slot(inputs[0])?.shape.clone();
        for s in &inputs[1..] {
            if self.slot(*s)?.shape != shape {
                return Err(PipelineError::BadInput(format!("stages `{}` and `{s}` differ in shape", inputs[0])));
            }
        }
        let n = shape.iter().product::<usize>();
        let mut o = self.alloc(n)?;
        let f = self.kernel(kernel)?;
        let stream = self.stream();
        let n64 = n as u64;
        let mut b = stream.launch_builder(&f);
        b.arg(&mut o);
        for s in inputs {
            b.arg(self.slot(*s)?.f32(*s)?);
        }
        b.arg(&n64);
        // SAFETY: every buffer holds n f32; the kernel touches indices < n.
        unsafe { b.launch(threads(n)) }.map_err(gpu(kernel.name))?;
        self.set(out, shape, o)
    }

    /// The greedy choice of `slot`'s last row on the device, waited for:
    /// launched now unless [`Self::launch_choice`] already did for the
    /// slot's current contents.
    pub(super) fn argmax_on_device(&mut self, slot: Slot) -> Result<u32> {
        if self.choice.of != Some((slot, self.activations.slots.version(slot))) {
            self.launch_choice(slot)?;
        }
        self.choice.of = None;
        self.stream().synchronize().map_err(gpu("waiting for the greedy choice"))?;
        // SAFETY: one word the finished kernel wrote; read once.
        Ok(unsafe { std::ptr::read_volatile(self.choice.host.host_ptr()) })
    }

    /// Launches the greedy choice of `slot`'s last row: each of up to
    /// ARGMAX_BLOCKS blocks finds its part's best, one block the best of
    /// theirs, which it writes to pinned host memory itself (no copy, so
    /// the answer never queues behind capture copies on a copy engine).
    ///
    /// The logits' projection launches it at once (ops.rs), before any
    /// capture copy of the step's last scope is queued: the device's
    /// writes to host memory cross PCIe in order, so a choice launched
    /// after the copy of a prompt's logits ([T, V] f32: 311 MB for 512
    /// tokens of Qwen3) landed only after it, about 6 ms later on an H200
    /// (prefill 10% slower with every stage of one layer captured; the
    /// host polling the word instead of synchronising did not help).
    pub(super) fn launch_choice(&mut self, slot: Slot) -> Result<()> {
        // On the device: only the index comes back, not the row.
        let f = self.kernel(elementwise::ARGMAX)?;
        let stream = self.stream();
        self.slot(slot)?;
        let t = self.activations.slots.get(slot).expect("checked above");
        let (width, numel) = (t.width(), t.numel());
        if numel == 0 || width == 0 {
            return Err(PipelineError::BadInput(format!("stage `{slot}` is empty")));
        }
        let row = t.f32(slot)?.slice(numel - width..numel);
        let blocks = ARGMAX_BLOCKS.min(width.div_ceil(1024)) as u32;
        let w32 = width as u32;
        let mut b = stream.launch_builder(&f);
        b.arg(&mut self.choice.blocks).arg(&row).arg(&w32);
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: block b reads its part of the row's width values and
        // writes the blocks buffer's [2b..2b + 2] (2 * ARGMAX_BLOCKS long).
        unsafe { b.launch(cfg) }.map_err(gpu("argmax"))?;
        let f = self.kernel(elementwise::ARGMAX_FINAL)?;
        let mut b = stream.launch_builder(&f);
        let out = self.choice.host.device_ptr();
        b.arg(&out).arg(&self.choice.blocks).arg(&blocks);
        let one_block = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: one block reads the blocks' 2 * blocks values and writes
        // choice's one word (pinned, mapped host memory).
        unsafe { b.launch(one_block) }.map_err(gpu("argmax"))?;
        self.choice.of = Some((slot, self.activations.slots.version(slot)));
        Ok(())
    }
}
