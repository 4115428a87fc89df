//! [`GpuDevice`]: a CUDA context on one device, with its kernel modules
//! compiled by NVRTC once per process for the device's own architecture.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};
use cudarc::nvrtc::{CompileOptions, compile_ptx_with_opts};

use crate::error::{KernelError, Result, driver};
use crate::sources;

/// A CUDA device ready to run moetrace's kernels.
pub struct GpuDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
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
        let count = CudaContext::device_count().map_err(driver("counting devices"))? as usize;
        if ordinal >= count {
            return Err(KernelError::NoSuchDevice { ordinal, count });
        }
        let ctx = CudaContext::new(ordinal).map_err(driver(format!("creating a context on device {ordinal}")))?;
        let name = ctx.name().map_err(driver("reading the device name"))?;
        let (major, minor) = ctx.compute_capability().map_err(driver("reading the compute capability"))?;
        let stream = ctx.default_stream();
        Ok(Self { ctx, stream, name, arch: format!("sm_{major}{minor}"), modules: Mutex::new(HashMap::new()) })
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
            options: vec![format!("--gpu-architecture={}", self.arch)],
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
