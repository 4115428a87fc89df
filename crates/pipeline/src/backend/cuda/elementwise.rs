//! The elementwise family on the device (kernels/elementwise.cu):
//! embedding rows and the one-thread-per-element operations (add, mul,
//! silu, swiglu).

use cudarc::driver::PushKernelArg;
use kernels_cuda::kernels::{Kernel, elementwise};

use super::weights::push_weight;
use super::{CudaBackend, gpu, threads};
use crate::backend::Slot;
use crate::error::{PipelineError, Result};
use crate::weights::WeightId;

impl CudaBackend {
    pub(super) fn embedding_on_device(&mut self, table: WeightId, out: Slot) -> Result<()> {
        // Token ids were checked against the vocabulary by Forward::begin_step.
        let h = self.store.get(table).row_len();
        let n = self.t_len * h;
        let mut o = self.alloc(n)?;
        let f = self.weight_kernel(elementwise::EMBEDDING)?;
        let stream = self.stream();
        let tokens = self.tokens.as_ref().ok_or_else(|| PipelineError::BadInput("no step begun".into()))?;
        let (t32, h32) = (self.t_len as u32, h as u32);
        let mut b = stream.launch_builder(&f);
        b.arg(&mut o);
        push_weight(&mut b, self.weight(table));
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
}
