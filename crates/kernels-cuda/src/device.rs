//! [`GpuDevice`]: a CUDA context on one device, with its kernel modules
//! compiled by NVRTC once per process for the device's own architecture.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};
use cudarc::nvrtc::{CompileOptions, compile_ptx_with_opts};

use crate::error::{KernelError, Result, driver};
use crate::sources;

/// A CUDA device ready to run moetrace's kernels.
///
/// Work runs on two streams of its own: `stream` (every kernel and cuBLAS
/// call, in order) and `copy_stream` (device-to-host copies of captured
/// tensors, so they overlap the compute). cudarc's automatic event tracking
/// is off: ordering between the two streams is explicit (see
/// [`GpuDevice::copy_stream`]), and no event is created per allocation.
pub struct GpuDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    copy_stream: Arc<CudaStream>,
    blas: CudaBlas,
    name: String,
    arch: String,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
}

impl GpuDevice {
    /// Opens device `ordinal`. A missing driver or NVRTC, or a bad ordinal,
    /// is a clear error, never a panic.
    pub fn open(ordinal: usize) -> Result<Self> {
        // SAFETY: is_culib_present only tries to dlopen the library by name.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(KernelError::DriverMissing);
        }
        // SAFETY: as above, for libnvrtc.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err(KernelError::NvrtcMissing);
        }
        // SAFETY: as above, for libcublas.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(KernelError::CublasMissing);
        }
        let count = CudaContext::device_count().map_err(driver("counting devices"))? as usize;
        if ordinal >= count {
            return Err(KernelError::NoSuchDevice { ordinal, count });
        }
        let ctx = CudaContext::new(ordinal).map_err(driver(format!("creating a context on device {ordinal}")))?;
        let name = ctx.name().map_err(driver("reading the device name"))?;
        let (major, minor) = ctx.compute_capability().map_err(driver("reading the compute capability"))?;
        // SAFETY: nothing has been allocated or launched in this context yet;
        // from here on the two streams are ordered by explicit events.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(driver("creating the compute stream"))?;
        let copy_stream = ctx.new_stream().map_err(driver("creating the copy stream"))?;
        let blas = CudaBlas::new(stream.clone())
            .map_err(|e| KernelError::Blas { action: "creating the cuBLAS handle".into(), message: e.to_string() })?;
        Ok(Self {
            ctx,
            stream,
            copy_stream,
            blas,
            name,
            arch: format!("sm_{major}{minor}"),
            modules: Mutex::new(HashMap::new()),
        })
    }

    /// The device's name, e.g. `NVIDIA H100 80GB HBM3`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The architecture kernels are compiled for, e.g. `sm_90`.
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// The stream compute runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The stream that copies captured tensors to the host. Work on it is
    /// not ordered with [`GpuDevice::stream`] by itself: record an event on
    /// the compute stream and make this one wait on it before a copy, and
    /// keep the source buffer alive until the copy's own event completes.
    pub fn copy_stream(&self) -> &Arc<CudaStream> {
        &self.copy_stream
    }

    /// The cuBLAS handle, bound to [`GpuDevice::stream`].
    pub fn blas(&self) -> &CudaBlas {
        &self.blas
    }

    /// Free and total device memory in bytes.
    pub fn memory(&self) -> Result<(usize, usize)> {
        self.ctx.mem_get_info().map_err(driver("reading free device memory"))
    }

    /// The context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Entry point `function` of kernel family `family`, compiling the
    /// family on first use.
    pub fn function(&self, family: &'static str, function: &str) -> Result<CudaFunction> {
        let module = {
            let mut modules = self.modules.lock().unwrap_or_else(|e| e.into_inner());
            match modules.get(family) {
                Some(m) => m.clone(),
                None => {
                    let m = self.compile(family)?;
                    modules.insert(family, m.clone());
                    m
                }
            }
        };
        module.load_function(function).map_err(driver(format!("loading {family}::{function}")))
    }

    fn compile(&self, family: &'static str) -> Result<Arc<CudaModule>> {
        let source = sources::source(family).ok_or_else(|| KernelError::Compile {
            family,
            arch: self.arch.clone(),
            log: "no such kernel family".into(),
        })?;
        let options = CompileOptions {
            // Exact IEEE arithmetic: the kernels are compared bit for bit or
            // at 1e-5 against the CPU reference.
            ftz: Some(false),
            prec_div: Some(true),
            prec_sqrt: Some(true),
            fmad: Some(false),
            // Line info only maps instructions to source lines (for
            // compute-sanitizer and ncu reports); the code is unchanged.
            options: vec![format!("--gpu-architecture={}", self.arch), "-lineinfo".into()],
            ..Default::default()
        };
        let ptx = compile_ptx_with_opts(&source, options).map_err(|e| KernelError::Compile {
            family,
            arch: self.arch.clone(),
            log: e.to_string(),
        })?;
        self.ctx.load_module(ptx).map_err(driver(format!("loading the {family} module")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opening_a_device_never_panics_and_names_a_missing_driver() {
        // SAFETY: only tries to dlopen libcuda by name.
        let driver_present = unsafe { cudarc::driver::sys::is_culib_present() };
        match GpuDevice::open(0) {
            Err(KernelError::DriverMissing) => assert!(!driver_present),
            Err(e) => assert!(driver_present, "unexpected error without a driver: {e}"),
            Ok(device) => assert!(device.arch().starts_with("sm_")),
        }
        if !driver_present {
            let msg = GpuDevice::open(0).err().unwrap().to_string();
            assert!(msg.contains("libcuda") && msg.contains("backend: Cpu"), "{msg}");
        }
    }
}
