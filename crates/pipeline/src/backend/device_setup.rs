//! The optional capability of a backend that computes in memory of its
//! own (the CUDA backend): checking a run fits, loading what the first
//! step would otherwise load, pinning capture buffers. A backend computing
//! in the host's memory (the CPU reference) has none of this to do.

use crate::error::Result;

/// Preparation of a device before a run.
pub trait DeviceSetup {
    /// What setting the backend up involved worth telling apart from the
    /// run's own time (the CUDA backend: compiling its kernels), if any.
    fn setup_note(&self) -> Option<String>;

    /// Whether a step of `rows` rows computes attention without keeping
    /// `[nh, T, P]` scores in memory unless they are read (the CUDA
    /// backend's fused attention).
    fn fuses_attention(&self, rows: usize, head_dim: usize) -> bool;

    /// Checks, before a run, that `bytes` of KV caches and activations
    /// (see [`crate::ModelConfig::forward_bytes`]) fit the memory this
    /// backend computes in, failing with the numbers.
    fn check_run_memory(&self, bytes: f64) -> Result<()>;

    /// Prepares for capturing tensors of these element counts in one step
    /// (the CUDA backend pins host buffers for them now, so the first step
    /// does not pay for it).
    fn reserve_capture(&mut self, elements: &[usize]) -> Result<()>;

    /// Loads, before the first step, whatever the backend would otherwise
    /// load inside it for a prompt of `prompt_tokens` (the CUDA backend:
    /// cuBLAS's kernels for each projection shape, which it loads on first
    /// use), so that the prefill's time is the prefill's. Changes no
    /// result.
    fn warm_up(&mut self, prompt_tokens: usize) -> Result<()>;
}
