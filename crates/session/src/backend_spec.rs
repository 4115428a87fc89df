//! [`BackendSpec`]: which backend computes a forward pass, as a config
//! names it (`backend:`, bisect's `reference:` and `target:`), and the
//! numeric contract each keeps.

use std::fmt;
use std::path::PathBuf;

use pipeline::backend::contract::{NumericContract, Precision};
use pipeline::backend::cpu::known_bugs::KnownBug;
use serde::Deserialize;

/// Activation precision of the CUDA backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum CudaDtype {
    /// f32 everywhere, no TF32.
    F32,
    /// bf16 weights and activations, f32 accumulation.
    Bf16,
    /// The CPU reference (f64 accumulation, f32 storage) with its matrix
    /// products on the device, to the bit: a reference, not a fast path
    /// (bisect's and check's `reference:`).
    F64,
}

/// Which backend computes the forward pass (or, as bisect's target only,
/// which capture another engine computed it in).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
pub enum BackendSpec {
    /// The CPU reference.
    #[default]
    Cpu,
    /// The CPU reference with llama.cpp's CPU numerics: each projection's
    /// input rows are first converted as ggml's CPU path converts them for
    /// the weight's type (Q8_K for K-quant weights, Q8_0 for Q8_0, f16 and
    /// bf16 for those; f32 weights as they are), to tell a GPU kernel's own
    /// error from the activation quantization of a llama.cpp CPU result.
    CpuLlamaCpp,
    /// The CPU reference keeping a device precision's numeric contract
    /// (`CpuEmulating(Bf16)`: weights and every stage output but routing's
    /// rounded to bf16, as the CUDA backend's Bf16 mode stores them;
    /// accumulation stays f64): what a correct implementation of that
    /// precision computes, to capture or to compare another engine with.
    CpuEmulating(CudaDtype),
    /// The CPU reference reproducing one bug that engines shipped in
    /// DeepSeek's MoE block (`CpuWithBug(MaskedGroupsAtZero)`; the others:
    /// `BiasInCombineWeights`, `RoutedScalingDropped`,
    /// `SharedExpertDropped`): a bisect target that stands for a broken
    /// engine, to see moetrace find and place the bug.
    CpuWithBug(KnownBug),
    /// A CUDA device.
    Cuda {
        /// Device ordinal.
        device: usize,
        /// Precision.
        dtype: CudaDtype,
        /// Record each decode step once as a CUDA graph and replay it (the
        /// default; Bf16 only). `graphs: false` launches every kernel from
        /// the host at every step: the same bits, slower; to rule graphs
        /// out when hunting a bug.
        #[serde(default = "graphs_on")]
        graphs: bool,
    },
    /// bisect's target only: another engine's capture (a folder with
    /// manifest.json). Each stage is checked by re-running the reference
    /// on the capture's own inputs of that stage (check.rs).
    Capture(PathBuf),
}

fn graphs_on() -> bool {
    true
}

impl CudaDtype {
    /// The precision this names (the one mapping from config to pipeline).
    pub fn precision(self) -> Precision {
        match self {
            CudaDtype::F32 | CudaDtype::F64 => Precision::F32,
            CudaDtype::Bf16 => Precision::Bf16,
        }
    }

    /// The numeric contract of the CUDA backend at this precision.
    pub fn contract(self) -> NumericContract {
        NumericContract::cuda(self.precision())
    }
}

impl BackendSpec {
    /// Whether this backend keeps its weights and activations on a CUDA
    /// device (`Cuda(dtype: F64)` keeps them on the host: it is the CPU
    /// reference with its products on the device).
    pub fn is_cuda(&self) -> bool {
        matches!(self, BackendSpec::Cuda { dtype, .. } if *dtype != CudaDtype::F64)
    }

    /// Whether this is the `Cuda(dtype: F64)` reference: the CPU
    /// reference with its matrix products on the device.
    pub fn is_f64_reference(&self) -> bool {
        matches!(self, BackendSpec::Cuda { dtype: CudaDtype::F64, .. })
    }

    /// The capture folder, for a `Capture` target.
    pub fn capture(&self) -> Option<&std::path::Path> {
        match self {
            BackendSpec::Capture(dir) => Some(dir),
            _ => None,
        }
    }

    /// The activation dtype this backend computes in, as tolerances name
    /// it (`f32`, `bf16`).
    pub fn activation_dtype(&self) -> &'static str {
        match self {
            BackendSpec::Cpu | BackendSpec::CpuLlamaCpp | BackendSpec::CpuWithBug(_) | BackendSpec::Capture(_) => "f32",
            BackendSpec::Cuda { dtype, .. } | BackendSpec::CpuEmulating(dtype) => dtype.precision().name(),
        }
    }
}

impl fmt::Display for BackendSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendSpec::Cpu => f.write_str("Cpu"),
            BackendSpec::CpuLlamaCpp => f.write_str("CpuLlamaCpp"),
            BackendSpec::CpuWithBug(bug) => write!(f, "CpuWithBug({bug:?})"),
            BackendSpec::CpuEmulating(dtype) => write!(f, "CpuEmulating({dtype:?})"),
            BackendSpec::Cuda { device, dtype, graphs } => {
                write!(f, "Cuda(device: {device}, dtype: {dtype:?}")?;
                if !graphs {
                    f.write_str(", graphs: false")?;
                }
                f.write_str(")")
            }
            BackendSpec::Capture(dir) => write!(f, "Capture({:?})", dir.display().to_string()),
        }
    }
}
