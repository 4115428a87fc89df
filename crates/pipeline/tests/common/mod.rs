//! Helpers the GPU test targets of this crate share (each target includes
//! this module: `mod common;`).

/// Whether GPU tests run here (MOETRACE_GPU set, on the GPU machine); when
/// not, says plainly that the calling test checked nothing.
pub fn gpu_enabled() -> bool {
    let on = std::env::var_os("MOETRACE_GPU").is_some();
    if !on {
        eprintln!("SKIPPED (GPU test): set MOETRACE_GPU=1 on a machine with an NVIDIA GPU; this test checked nothing");
    }
    on
}
