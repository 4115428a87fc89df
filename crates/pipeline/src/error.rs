//! [`PipelineError`]: everything that can go wrong loading a model or running
//! a forward step.

use std::path::PathBuf;

/// Errors of the pipeline crate. Messages name the file, the tensor, the
/// expected and actual values, so they can be shown to the user as they are.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The model folder does not exist or is not a folder.
    #[error("model folder {path} does not exist or is not a folder")]
    MissingModelDir {
        /// The path as given.
        path: PathBuf,
    },
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// config.json is not valid JSON or has a value of the wrong type.
    #[error("{path}: invalid config: {message}")]
    BadConfig {
        /// The config file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// config.json lacks a key the model needs.
    #[error("{path}: missing required key `{key}`{hint}")]
    MissingConfigKey {
        /// The config file.
        path: PathBuf,
        /// The key (first spelling if several are accepted).
        key: &'static str,
        /// Extra words, e.g. the other accepted spelling.
        hint: String,
    },
    /// A safetensors file is malformed (bad header, truncated data).
    #[error("{path}: malformed safetensors file: {message}")]
    BadSafetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A valid input moetrace does not run: a model family it does not
    /// know, a weight type it does not read. The message names it and what
    /// is supported.
    #[error("{path}: {message}")]
    Unsupported {
        /// The file or folder.
        path: PathBuf,
        /// What is not supported, and what is.
        message: String,
    },
    /// A GGUF file is malformed (bad header, truncated data, a count or
    /// offset the file cannot hold, an unknown type).
    #[error("{path}: malformed GGUF file: {message}")]
    BadGguf {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A tensor the model needs is absent from the checkpoint.
    #[error("checkpoint {path} has no tensor `{name}`")]
    MissingTensor {
        /// The checkpoint folder.
        path: PathBuf,
        /// The tensor name.
        name: String,
    },
    /// config.json says `attention_bias: true` and a q/k/v bias is absent.
    #[error(
        "{path}: attention bias `{name}` is missing: config.json says attention_bias: true (set it to false if the model has no q/k/v bias)"
    )]
    MissingAttentionBias {
        /// The checkpoint folder.
        path: PathBuf,
        /// The bias tensor's name.
        name: String,
    },
    /// A tensor has another shape than the config implies.
    #[error("tensor `{name}` has shape {actual:?} but the config implies {expected:?}")]
    WrongShape {
        /// The tensor name.
        name: String,
        /// The shape config.json implies.
        expected: Vec<usize>,
        /// The shape in the file.
        actual: Vec<usize>,
    },
    /// A tensor dtype the loader does not read.
    #[error("tensor `{name}` has dtype {dtype}; supported: BF16, F16, F32")]
    UnsupportedDtype {
        /// The tensor name.
        name: String,
        /// The dtype as written in the header.
        dtype: String,
    },
    /// An unknown synthetic preset.
    #[error("unknown synthetic preset `{name}`; valid presets: {valid}")]
    UnknownPreset {
        /// The preset as written.
        name: String,
        /// The valid names, comma-separated.
        valid: String,
    },
    /// A synthetic model that does not fit in this machine's memory.
    #[error(
        "synthetic model `{preset}` with {layers} layers needs {need_gb:.1} GB of bf16 weights but only {available_gb:.1} GB of memory is available; build fewer layers, e.g. Synthetic(preset: \"{preset}\", seed: 7, layers: 2)"
    )]
    SyntheticTooLarge {
        /// The preset.
        preset: String,
        /// Layers asked for.
        layers: usize,
        /// Bytes needed, in GB.
        need_gb: f64,
        /// Memory available, in GB.
        available_gb: f64,
    },
    /// A bad request to the forward pass (token out of range, empty prompt...).
    #[error("{0}")]
    BadInput(String),
    /// A CUDA call failed (out of memory, launch failure...).
    #[error("GPU error while {0}")]
    Gpu(String),
    /// The GPU ran out of memory.
    #[error(
        "GPU out of memory while {action}{detail}; use dtype: Bf16 (half the weight memory), a model with fewer layers (synthetic: `layers: N`), a shorter prompt, or a larger GPU"
    )]
    GpuOutOfMemory {
        /// What was being allocated.
        action: String,
        /// What was needed and free, when known (`: need 122.3 GB, 79.1 GB free on ...`).
        detail: String,
    },
    /// A backend that is not available in this build or on this machine.
    #[error("backend unavailable: {0}")]
    BackendUnavailable(String),
}

/// Shorthand for results of this crate.
pub type Result<T, E = PipelineError> = std::result::Result<T, E>;
