//! Projections on the device: the dense ones through cuBLAS (Bf16 mode
//! converts the activations to bf16 bits first, exactly), except those of
//! a few rows in Bf16 mode (decode), which one kernel computes from the f32
//! activations directly; and biases.

use cudarc::driver::{CudaSlice, CudaViewMut, PushKernelArg};
use kernels_cuda::blas::ProjectionShape;
use kernels_cuda::kernels::{elementwise, linear};

use super::weights::{DevWeight, push_weight};
use super::{CudaBackend, CudaPrecision, gpu, kernel_error, threads, warps};
use crate::backend::Slot;
use crate::error::{PipelineError, Result};
use crate::weights::WeightId;

/// Projections of at most this many rows take `gemv_bf16w_v8` in Bf16
/// mode (its accumulators are per row, up to 8). The lm_head of a decode
/// step too: cuBLAS read it a little faster (205-217 us against about 240
/// us, ncu on the H100), but a decode step recorded as a CUDA graph
/// (graph.rs) launches only our own kernels.
const GEMV_MAX_ROWS: usize = 8;

impl CudaBackend {
    pub(super) fn linear_on_device(&mut self, input: Slot, weights: &[WeightId], out: Slot) -> Result<()> {
        let (rows, k) = {
            let x = self.slot(input)?;
            (x.rows(), x.width())
        };
        let mut total = 0;
        for &id in weights {
            let w = self.store.get(id);
            if w.row_len() != k {
                return Err(PipelineError::BadInput(format!(
                    "stage `{input}` rows of {k} do not fit `{}`",
                    w.describe()
                )));
            }
            total += w.shape[0];
        }
        let mut o = self.alloc(rows * total)?;
        if self.zero_gemm_outputs {
            self.stream().memset_zeros(&mut o).map_err(gpu("zeroing a projection's output"))?;
        }
        if weights.iter().any(|&id| matches!(self.weight(id), DevWeight::Quant(_))) {
            return self.linear_quantized(input, weights, out, (rows, k, total), o);
        }
        // A few rows (decode) in Bf16 mode: one warp per output feature
        // reads its bf16 weight row once for all rows, from the f32
        // activations directly, and rounds at the store (no conversion or
        // rounding launches).
        if self.precision == CudaPrecision::Bf16 && rows <= GEMV_MAX_ROWS && k.is_multiple_of(8) {
            let f = self.kernel(linear::GEMV_V8)?;
            let stream = self.stream();
            let x = self.slot(input)?.f32(input)?;
            let raw = u32::from(!self.rounds_projection(out));
            let mut col = 0usize;
            // Up to three matrices a launch (q, k and v together).
            for group in weights.chunks(3) {
                let n: Vec<u32> =
                    (0..3).map(|i| group.get(i).map_or(0, |&id| self.store.get(id).shape[0] as u32)).collect();
                let features = n.iter().sum::<u32>() as usize;
                let a = (rows as u32, k as u32, total as u32, col as u32, raw);
                let mut b = stream.launch_builder(&f);
                b.arg(&mut o).arg(x);
                for i in 0..3 {
                    // A missing matrix: any valid pointer, with no rows.
                    push_weight(&mut b, self.weight(*group.get(i).unwrap_or(&group[0])))?;
                }
                b.arg(&n[0]).arg(&n[1]).arg(&n[2]).arg(&a.0).arg(&a.1).arg(&a.2).arg(&a.3).arg(&a.4);
                // SAFETY: one warp per feature n < features writes rows t <
                // rows at columns col + n < total of `o` (rows * total),
                // reading row n of its matrix (each shape[0] rows of k); x
                // holds rows * k; k % 8 == 0 (aligned loads).
                unsafe { b.launch(warps(features)) }.map_err(gpu("gemv"))?;
                col += features;
            }
            return self.set(out, vec![rows, total], o);
        }
        self.refuse_in_capture("a projection through cuBLAS")?;
        // Bf16 mode multiplies bf16 by bf16 (activations are bf16 values
        // already, so the conversion is exact) with f32 accumulation.
        let x_bf16 = match self.precision {
            CudaPrecision::F32 => None,
            CudaPrecision::Bf16 => Some(self.to_bf16(self.slot(input)?.f32(input)?, rows * k)?),
        };
        let x = self.slot(input)?.f32(input)?;
        let mut col = 0usize;
        for &id in weights {
            let n = self.store.get(id).shape[0];
            let shape = ProjectionShape { rows, k, n, out_stride: total };
            self.project_decoded(x, x_bf16.as_ref(), self.weight(id), &mut o.slice_mut(col..), shape)?;
            col += n;
        }
        self.set_projection(out, vec![rows, total], o)
    }

    /// `x` (or, in Bf16 mode, its bf16 bits `x_bf16`) times decoded weight
    /// `w`, through cuBLAS.
    pub(super) fn project_decoded(
        &self,
        x: &CudaSlice<f32>,
        x_bf16: Option<&CudaSlice<u16>>,
        w: &DevWeight,
        out: &mut CudaViewMut<'_, f32>,
        shape: ProjectionShape,
    ) -> Result<()> {
        match (w, x_bf16) {
            (DevWeight::F32(w), _) => self.device.project(x, w, out, shape),
            (DevWeight::Bf16(w), Some(xb)) => self.device.project(xb, w, out, shape),
            (DevWeight::Bf16(_), None) => {
                return Err(PipelineError::Gpu("bf16 weights without bf16 activations".into()));
            }
            (DevWeight::Quant(_), _) => {
                return Err(PipelineError::Gpu("cuBLAS was given quantized blocks (decode them first)".into()));
            }
        }
        .map_err(kernel_error)
    }

    /// One projection of each dense weight shape at the row counts the run
    /// will use with cuBLAS (the prompt's, unless the GEMV takes it; one
    /// row in F32 mode), of zero activations by the resident weight, so
    /// cuBLAS loads its kernels now.
    pub(super) fn warm_up_projections(&mut self, prompt_tokens: usize) -> Result<()> {
        // One weight of each (n, k).
        let mut by_shape: Vec<((usize, usize), WeightId)> = self
            .weights
            .keys()
            .filter_map(|&id| match self.store.get(id).shape[..] {
                [n, k] => Some(((n, k), id)),
                _ => None,
            })
            .collect();
        by_shape.sort_unstable_by_key(|&(shape, id)| (shape, id.0));
        by_shape.dedup_by_key(|(shape, _)| *shape);
        let mut rows = vec![prompt_tokens];
        if self.precision == CudaPrecision::F32 {
            rows.push(1);
        }
        let stream = self.stream();
        for &r in rows.iter().filter(|&&r| r > 0) {
            for &((n, k), id) in &by_shape {
                let gemv = self.precision == CudaPrecision::Bf16 && r <= GEMV_MAX_ROWS && k.is_multiple_of(8);
                if gemv || r * n > (1 << 29) {
                    continue; // no cuBLAS call, or an output too large to warm up cheaply
                }
                let shape = ProjectionShape { rows: r, k, n, out_stride: n };
                let mut out = stream.alloc_zeros::<f32>(r * n).map_err(gpu("warming up cuBLAS"))?;
                let x = stream.alloc_zeros::<f32>(r * k).map_err(gpu("warming up cuBLAS"))?;
                let x_bf16 = stream.alloc_zeros::<u16>(r * k).map_err(gpu("warming up cuBLAS"))?;
                // A quantized weight warms up decoded, as a prompt uses it.
                let decoded = self.decoded(id, n * k)?;
                let w = decoded.as_ref().unwrap_or_else(|| self.weight(id));
                self.project_decoded(&x, Some(&x_bf16), w, &mut out.slice_mut(..), shape)?;
                if decoded.is_some() {
                    self.scratch = decoded;
                }
            }
        }
        stream.synchronize().map_err(gpu("warming up cuBLAS"))
    }

    /// `biases` concatenated in f32 on the device, uploaded once (a
    /// projection's q/k/v biases; gpt-oss's experts' stacked; its sinks).
    pub(super) fn bias_buffer(&mut self, biases: &[WeightId]) -> Result<()> {
        if !self.biases.contains_key(biases) {
            let mut host = Vec::new();
            for &id in biases {
                host.extend(self.store.get(id).to_f32_vec());
            }
            let bias = self.stream().clone_htod(&host).map_err(gpu("uploading biases"))?;
            self.biases.insert(biases.to_vec(), bias);
        }
        Ok(())
    }

    pub(super) fn add_bias_on_device(&mut self, input: Slot, biases: &[WeightId], out: Slot) -> Result<()> {
        self.bias_buffer(biases)?;
        let bias = &self.biases[biases];
        let x = self.slot(input)?;
        let (shape, width) = (x.shape.clone(), x.width());
        if width != bias.len() {
            return Err(PipelineError::BadInput(format!(
                "stage `{input}` rows of {width} do not fit {} biases",
                bias.len()
            )));
        }
        let n = shape.iter().product::<usize>();
        let mut o = self.alloc(n)?;
        let f = self.kernel(elementwise::ADD_BIAS)?;
        let stream = self.stream();
        let (n64, w32) = (n as u64, width as u32);
        let mut b = stream.launch_builder(&f);
        b.arg(&mut o).arg(x.f32(input)?).arg(bias).arg(&n64).arg(&w32);
        // SAFETY: n elements, bias of width.
        unsafe { b.launch(threads(n)) }.map_err(gpu("add_bias"))?;
        self.set(out, shape, o)
    }

    /// `x` (n f32 holding bf16 values) as bf16 bits.
    pub(super) fn to_bf16(&self, x: &CudaSlice<f32>, n: usize) -> Result<CudaSlice<u16>> {
        let stream = self.stream();
        let mut o = stream.alloc_zeros::<u16>(n.max(1)).map_err(gpu("allocating bf16 activations"))?;
        let f = self.kernel(elementwise::TO_BF16_BITS)?;
        let n64 = n as u64;
        let mut b = stream.launch_builder(&f);
        b.arg(&mut o).arg(x).arg(&n64);
        // SAFETY: x and o hold n elements.
        unsafe { b.launch(threads(n)) }.map_err(gpu("converting to bf16"))?;
        Ok(o)
    }
}
