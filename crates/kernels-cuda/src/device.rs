//! [`GpuDevice`]: a CUDA context on one device, with its kernel modules
//! compiled by NVRTC once per process to the device's own machine code
//! (a cubin: the driver has nothing left to JIT-compile, so a first run on
//! a fresh machine is as fast as later ones).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};
use cudarc::nvrtc::Ptx;

use crate::error::{KernelError, Result, driver};
use crate::kernels::Kernel;
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
    round_bf16: bool,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    /// Entry points already looked up: a lookup is a driver call, and a
    /// decode step launches thousands of kernels.
    functions: Mutex<HashMap<Kernel, CudaFunction>>,
    /// Time spent compiling and loading kernel modules so far.
    compile_time: Mutex<Duration>,
}

/// How the kernel modules are built.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KernelBuild {
    /// Compile with `ROUND_BF16=1`: every kernel rounds the activations it
    /// stores to bf16 values (`store_act` in common.cuh), exactly as a
    /// separate rounding pass after it would. The Bf16 backend builds so.
    pub round_bf16: bool,
}

impl GpuDevice {
    /// Opens device `ordinal`. A missing driver or NVRTC, or a bad ordinal,
    /// is a clear error, never a panic.
    pub fn open(ordinal: usize) -> Result<Self> {
        Self::open_with(ordinal, KernelBuild::default())
    }

    /// Opens device `ordinal` with kernels built as `build` says.
    pub fn open_with(ordinal: usize, build: KernelBuild) -> Result<Self> {
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
            round_bf16: build.round_bf16,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
            compile_time: Mutex::new(Duration::ZERO),
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

    /// The entry point `kernel` (see [`crate::kernels`]), compiling its
    /// family on first use. Looked up once, then served from a cache.
    pub fn kernel(&self, kernel: Kernel) -> Result<CudaFunction> {
        if let Some(f) = self.functions.lock().unwrap_or_else(|e| e.into_inner()).get(&kernel) {
            return Ok(f.clone());
        }
        let Kernel { family, name } = kernel;
        let module = self.module(family)?;
        let f = module.load_function(name).map_err(driver(format!("loading {family}::{name}")))?;
        self.functions.lock().unwrap_or_else(|e| e.into_inner()).insert(kernel, f.clone());
        Ok(f)
    }

    /// Compiles and loads every kernel family now (a backend does this
    /// before its first step, so no step pays for it), returning the time
    /// it took.
    ///
    /// The families are compiled by NVRTC in parallel (one program a
    /// thread; NVRTC allows concurrent calls on different programs), then
    /// loaded on this thread in the listed order.
    pub fn compile_all(&self) -> Result<Duration> {
        let start = Instant::now();
        let missing: Vec<&'static str> = {
            let modules = self.modules.lock().unwrap_or_else(|e| e.into_inner());
            sources::FAMILIES.iter().map(|(f, _)| *f).filter(|f| !modules.contains_key(f)).collect()
        };
        let options = compile_options(&self.arch, self.round_bf16);
        let jobs: Vec<(&'static str, &[String])> = missing.iter().map(|f| (*f, &options[..])).collect();
        for (family, compiled) in missing.iter().zip(compile_in_parallel(&jobs)) {
            let (cubin, _log) =
                compiled.map_err(|log| KernelError::Compile { family, arch: self.arch.clone(), log })?;
            let module = self
                .ctx
                .load_module(Ptx::from_binary(cubin))
                .map_err(driver(format!("loading the {family} module")))?;
            self.modules.lock().unwrap_or_else(|e| e.into_inner()).insert(family, module);
        }
        // The parallel compile's wall time, not the sum over threads.
        let elapsed = start.elapsed();
        *self.compile_time.lock().unwrap_or_else(|e| e.into_inner()) += elapsed;
        Ok(elapsed)
    }

    /// Total time spent compiling and loading kernel modules.
    pub fn compile_time(&self) -> Duration {
        *self.compile_time.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn module(&self, family: &'static str) -> Result<Arc<CudaModule>> {
        let mut modules = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = modules.get(family) {
            return Ok(m.clone());
        }
        let start = Instant::now();
        let m = self.compile(family)?;
        *self.compile_time.lock().unwrap_or_else(|e| e.into_inner()) += start.elapsed();
        modules.insert(family, m.clone());
        Ok(m)
    }

    fn compile(&self, family: &'static str) -> Result<Arc<CudaModule>> {
        let compile_error = |log: String| KernelError::Compile { family, arch: self.arch.clone(), log };
        let source = sources::source(family).ok_or_else(|| compile_error("no such kernel family".into()))?;
        let (cubin, _log) =
            compile_cubin(&source, &compile_options(&self.arch, self.round_bf16)).map_err(compile_error)?;
        self.ctx.load_module(Ptx::from_binary(cubin)).map_err(driver(format!("loading the {family} module")))
    }
}

/// NVRTC's options for every kernel family: exact IEEE arithmetic and
/// machine code for `arch` (a real architecture such as `sm_90`).
fn compile_options(arch: &str, round_bf16: bool) -> Vec<String> {
    vec![
        // Exact IEEE arithmetic: the kernels are compared bit for bit or
        // at 1e-5 against the CPU reference.
        "--ftz=false".to_string(),
        "--prec-div=true".into(),
        "--prec-sqrt=true".into(),
        "--fmad=false".into(),
        // A real architecture (sm_90, not compute_90): NVRTC emits the
        // device's machine code.
        format!("--gpu-architecture={arch}"),
        // Line info only maps instructions to source lines (for
        // compute-sanitizer and ncu reports); the code is unchanged.
        "-lineinfo".into(),
        format!("-DROUND_BF16={}", u8::from(round_bf16)),
    ]
}

/// What compiling one family without a device said: its name, and ptxas's
/// report of each entry point (registers, spills, shared memory).
#[derive(Debug, Clone)]
pub struct OfflineCompile {
    /// The kernel family (a name of [`sources::FAMILIES`]).
    pub family: &'static str,
    /// ptxas's verbose log: one "Used N registers" line per entry point.
    pub ptxas_log: String,
}

/// Every kernel family compiled by NVRTC for `arch` with the options a
/// device uses (both values of `ROUND_BF16`), with no GPU and no driver:
/// what lets a machine without a GPU catch a kernel that does not compile
/// before device time is spent on it. Err([`KernelError::NvrtcMissing`])
/// where libnvrtc cannot be loaded; a family that fails names itself and
/// carries the compiler's log.
pub fn compile_all_offline(arch: &str) -> Result<Vec<OfflineCompile>> {
    // SAFETY: only tries to dlopen libnvrtc by name.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(KernelError::NvrtcMissing);
    }
    let options: Vec<Vec<String>> = [false, true]
        .map(|round_bf16| {
            let mut options = compile_options(arch, round_bf16);
            options.push("--ptxas-options=-v".into());
            options
        })
        .to_vec();
    let builds: Vec<(&'static str, bool)> =
        sources::FAMILIES.iter().flat_map(|&(family, _)| [(family, false), (family, true)]).collect();
    let jobs: Vec<(&'static str, &[String])> =
        builds.iter().map(|&(family, round_bf16)| (family, &options[usize::from(round_bf16)][..])).collect();
    let mut out = Vec::new();
    for (&(family, round_bf16), compiled) in builds.iter().zip(compile_in_parallel(&jobs)) {
        let (_cubin, log) = compiled.map_err(|log| KernelError::Compile { family, arch: arch.to_string(), log })?;
        // The ROUND_BF16=0 build's report (the other only had to compile).
        if !round_bf16 {
            out.push(OfflineCompile { family, ptxas_log: log });
        }
    }
    Ok(out)
}

/// One NVRTC compile: the cubin and the compiler's log, or the log as the
/// error.
type Compiled = std::result::Result<(Vec<u8>, String), String>;

/// Each `(family, options)` job compiled to a cubin with its log (or the
/// compiler's log as the error), in the jobs' order, by as many threads as
/// the machine has cores (at most one a job): NVRTC compiles different
/// programs concurrently.
fn compile_in_parallel(jobs: &[(&'static str, &[String])]) -> Vec<Compiled> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let next = AtomicUsize::new(0);
    let results: Vec<Mutex<Option<Compiled>>> = jobs.iter().map(|_| Mutex::new(None)).collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(jobs.len()).max(1);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&(family, options)) = jobs.get(i) else { break };
                    let compiled = match sources::source(family) {
                        Some(source) => compile_cubin(&source, options),
                        None => Err("no such kernel family".to_string()),
                    };
                    *results[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(compiled);
                }
            });
        }
    });
    results
        .into_iter()
        .map(|r| r.into_inner().unwrap_or_else(|e| e.into_inner()).unwrap_or_else(|| Err("not compiled".into())))
        .collect()
}

/// NVRTC: `source` compiled with `options` to a cubin (machine code for the
/// real architecture the options name), with the compiler's log. The error
/// is the compiler's log.
fn compile_cubin(source: &str, options: &[String]) -> std::result::Result<(Vec<u8>, String), String> {
    use cudarc::nvrtc::{result, sys};
    let src = std::ffi::CString::new(source).map_err(|_| "the kernel source holds a NUL byte".to_string())?;
    let prog = result::create_program(&src, None).map_err(|e| format!("creating the program: {e:?}"))?;
    // SAFETY: prog is a live program; every call below passes it with
    // buffers of the sizes NVRTC reported; it is destroyed once, last.
    let outcome = unsafe {
        let compiled = result::compile_program(prog, options);
        let log = result::get_program_log(prog)
            .map(|raw| std::ffi::CStr::from_ptr(raw.as_ptr()).to_string_lossy().into_owned())
            .unwrap_or_default();
        match compiled {
            Err(e) => Err(format!("{e:?}\n{log}")),
            Ok(()) => {
                let mut size = 0usize;
                match sys::nvrtcGetCUBINSize(prog, &mut size).result() {
                    Err(e) => Err(format!("reading the cubin size: {e:?}")),
                    Ok(()) if size == 0 => Err("NVRTC made no cubin (is the architecture a real one?)".into()),
                    Ok(()) => {
                        let mut cubin = vec![0u8; size];
                        sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr().cast())
                            .result()
                            .map(|()| (cubin, log))
                            .map_err(|e| format!("reading the cubin: {e:?}"))
                    }
                }
            }
        }
    };
    // SAFETY: prog was created above and is not used after this.
    let _ = unsafe { result::destroy_program(prog) };
    outcome
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

    #[test]
    fn every_family_compiles_for_hopper_without_a_device_and_nothing_spills() {
        match compile_all_offline("sm_90") {
            Err(KernelError::NvrtcMissing) => {
                let why = "libnvrtc.so.13 not found (pip install nvidia-cuda-nvrtc==13.* and add its lib folder to LD_LIBRARY_PATH)";
                assert!(std::env::var_os("MOETRACE_CI").is_none(), "CI must compile the kernels: {why}");
                eprintln!("SKIPPED: {why}; no kernel was compiled");
            }
            Err(e) => panic!("{e}"),
            Ok(reports) => {
                assert_eq!(reports.len(), sources::FAMILIES.len());
                for r in &reports {
                    let entries = r.ptxas_log.matches("Compiling entry function").count();
                    assert!(entries > 0, "{}: no ptxas report\n{}", r.family, r.ptxas_log);
                    // A spill is local memory in the inner loop: the
                    // register budget was overrun (the device-side test of
                    // the grouped kernel checks its own count too).
                    for line in r.ptxas_log.lines().filter(|l| l.contains("spill stores")) {
                        assert!(line.contains(" 0 bytes spill stores, 0 bytes spill loads"), "{}: {line}", r.family);
                    }
                    let used: Vec<&str> =
                        r.ptxas_log.lines().filter_map(|l| l.split_once("Used ").map(|(_, u)| u)).collect();
                    eprintln!("{}: {entries} entry points compiled for sm_90, none spills: {used:?}", r.family);
                }
            }
        }
    }
}
