//! [`KernelError`]: why the GPU could not be used or a kernel failed.

/// Errors of the CUDA layer; each says what to check.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// libcuda (the NVIDIA driver) is not installed or not on the loader path.
    #[error(
        "no NVIDIA driver found: libcuda.so could not be loaded (is this a GPU machine? check LD_LIBRARY_PATH); use backend: Cpu here"
    )]
    DriverMissing,
    /// libnvrtc (the CUDA runtime compiler) is not installed.
    #[error(
        "NVRTC not found: libnvrtc.so could not be loaded; install the CUDA 13 toolkit runtime libraries or add them to LD_LIBRARY_PATH"
    )]
    NvrtcMissing,
    /// libcublas is not installed.
    #[error(
        "cuBLAS not found: libcublas.so could not be loaded; install the CUDA 13 toolkit runtime libraries or add them to LD_LIBRARY_PATH"
    )]
    CublasMissing,
    /// A cuBLAS call failed.
    #[error("cuBLAS error while {action}: {message}")]
    Blas {
        /// What was being done.
        action: String,
        /// cuBLAS's status.
        message: String,
    },
    /// A GEMM whose sizes do not fit cuBLAS's 32-bit arguments.
    #[error("a {m}x{n}x{k} GEMM is too large for cuBLAS's 32-bit sizes")]
    GemmTooLarge {
        /// Rows of the output (weight rows).
        m: usize,
        /// Columns of the output (tokens).
        n: usize,
        /// Inner dimension.
        k: usize,
    },
    /// The device ran out of memory.
    #[error("GPU out of memory while {action}")]
    OutOfMemory {
        /// What was being allocated.
        action: String,
    },
    /// A CUDA driver call failed.
    #[error("CUDA error while {action}: {message}")]
    Driver {
        /// What was being done.
        action: String,
        /// The driver's message.
        message: String,
    },
    /// A device ordinal beyond the number of devices.
    #[error("CUDA device {ordinal} does not exist: this machine has {count} device(s) (valid: 0..{count})")]
    NoSuchDevice {
        /// Asked for.
        ordinal: usize,
        /// Present.
        count: usize,
    },
    /// NVRTC rejected a kernel source.
    #[error("NVRTC failed to compile {family}.cu for {arch}: {log}")]
    Compile {
        /// Kernel family.
        family: &'static str,
        /// Target architecture.
        arch: String,
        /// The compiler log.
        log: String,
    },
}

/// Shorthand for results of this crate.
pub type Result<T, E = KernelError> = std::result::Result<T, E>;

/// Whether a driver error is the device running out of memory.
pub fn is_out_of_memory(e: &cudarc::driver::DriverError) -> bool {
    e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY
}

/// Maps a driver error with what was being done.
pub(crate) fn driver(action: impl Into<String>) -> impl FnOnce(cudarc::driver::DriverError) -> KernelError {
    let action = action.into();
    move |e| {
        if is_out_of_memory(&e) {
            KernelError::OutOfMemory { action }
        } else {
            KernelError::Driver { action, message: e.to_string() }
        }
    }
}
