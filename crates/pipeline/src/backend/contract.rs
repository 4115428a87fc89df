//! [`NumericContract`]: what an implementation promises about its
//! arithmetic, stated so that the CPU reference can keep the same promise
//! (`CpuBackend::with_contract`). A correct implementation of a contract
//! differs from the float64 reference by what that contract's rounding
//! explains; the CPU emulating the contract, run on the same inputs, makes
//! that error too, row by row, and so gives each (step, layer, stage) its
//! expected error (bisect's `expected` side).
//!
//! The contract lists the rounding points that dominate the error: where
//! weights are rounded, and the precision each stage's output is stored in.
//! Accumulation is f32 on the devices and f64 in the emulation; the
//! difference is orders of magnitude below a bf16 rounding and is what a
//! row's error floor ([`Precision::error_floor`]) covers.

use half::bf16;
use stage_types::SaveTensorStage;

use crate::tensor::{HostTensor, TensorData};

/// A storage precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// IEEE single precision (what the CPU reference stores).
    F32,
    /// bfloat16, rounded to nearest even.
    Bf16,
}

impl Precision {
    /// Rounds `values` in place to this precision (f32 values are kept).
    pub fn round(self, values: &mut [f32]) {
        if self == Precision::Bf16 {
            values.iter_mut().for_each(|v| *v = bf16::from_f32(*v).to_f32());
        }
    }

    /// The smallest expected error of a row stored in this precision,
    /// relative to the tensor's RMS row norm: where the emulation is exact
    /// (a stage of exact arithmetic, or an f32 contract, whose emulation
    /// is the reference itself), the target may still differ by f32
    /// accumulation in another order, about 1e-7 to 1e-6 of a row.
    pub fn error_floor(self) -> f64 {
        match self {
            Precision::F32 => 1e-5,
            Precision::Bf16 => 1e-4,
        }
    }

    /// `f32` or `bf16`.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }
}

/// Which of llama.cpp's backends converts projection inputs (ggml's
/// activation types differ by backend).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlPath {
    /// The CPU: each weight type's `vec_dot_type` (Q8_K for K-quants,
    /// Q8_0 for Q8_0, f16, bf16).
    Cpu,
    /// CUDA: q8_1 (blocks of 32, one scale each) for every block-quantized
    /// type, bf16 and f16 for those weights; in steps of more than 8
    /// tokens its tensor-core kernels (Q4_K/Q5_K MMQ with f16 sub-block
    /// products, TF32 for f32 weights, f16 GEMMs in attention:
    /// cpu/ggml_cuda.rs).
    Cuda,
}

/// The rounding points of an implementation's arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NumericContract {
    /// The precision weights are multiplied in (after decoding, for
    /// block-quantized weights).
    pub weights: Precision,
    /// The precision every stage output is stored in, except routing's.
    pub activations: Precision,
    /// The precision of the router logits and routing weights (DESIGN:
    /// routing in f32 or better).
    pub routing: Precision,
    /// Projection inputs are converted as one of llama.cpp's backends
    /// converts them for the weight's type before each dot product (None:
    /// used as they are).
    pub ggml_activations: Option<GgmlPath>,
    /// The attention's two products take f16 operands: keys and values are
    /// kept in an f16 cache, and the query rows and the probabilities are
    /// converted to f16 before the dot products (llama.cpp with its default
    /// f16 KV cache, whose CPU path converts the f32 operand to the cache's
    /// type).
    pub attention_f16: bool,
}

impl NumericContract {
    /// The CPU reference's own: f32 storage, weights as the checkpoint
    /// holds them (converted exactly), f64 accumulation.
    pub const REFERENCE: Self = Self {
        weights: Precision::F32,
        activations: Precision::F32,
        routing: Precision::F32,
        ggml_activations: None,
        attention_f16: false,
    };

    /// bf16 weights and activations, f32 routing and accumulation (the
    /// CUDA backend in Bf16 mode).
    pub const BF16: Self = Self {
        weights: Precision::Bf16,
        activations: Precision::Bf16,
        routing: Precision::F32,
        ggml_activations: None,
        attention_f16: false,
    };

    /// What llama.cpp's CPU backend promises: weights decoded exactly,
    /// every projection's input converted to its weight type's
    /// `vec_dot_type`, f32 storage, and with an f16 KV cache
    /// (`kv_f16`) the attention products on f16 operands.
    pub fn llama_cpp_cpu(kv_f16: bool) -> Self {
        Self { ggml_activations: Some(GgmlPath::Cpu), attention_f16: kv_f16, ..Self::REFERENCE }
    }

    /// What llama.cpp's CUDA backend promises: weights decoded exactly,
    /// each projection's input converted as its kernels convert it (q8_1
    /// blocks of 32 for block-quantized weights, bf16 and f16 for those),
    /// f32 storage, the attention products on f16 operands with an f16
    /// cache; steps of more than 8 tokens as its batched kernels compute
    /// them (cpu/ggml_cuda.rs). Its sums run in other orders than the
    /// CPU's (and Q6_K's MMQ and the f16 GEMMs are modelled, not
    /// replayed), so the emulation bounds its error rather than replaying
    /// it.
    pub fn llama_cpp_cuda(kv_f16: bool) -> Self {
        Self { ggml_activations: Some(GgmlPath::Cuda), attention_f16: kv_f16, ..Self::REFERENCE }
    }

    /// What the CUDA backend promises with activations of `precision`: the
    /// reference's rounding points in F32 mode, [`Self::BF16`] in Bf16 mode.
    pub fn cuda(precision: Precision) -> Self {
        match precision {
            Precision::F32 => Self::REFERENCE,
            Precision::Bf16 => Self::BF16,
        }
    }

    /// The precision `stage`'s output is stored in, None for integer
    /// stages (expert ids are compared as sets, never rounded).
    pub fn output(&self, stage: SaveTensorStage) -> Option<Precision> {
        match stage {
            s if s.is_integer() => None,
            SaveTensorStage::MoeRouterLogits | SaveTensorStage::MoeRouter | SaveTensorStage::MoeRouterGroupScores => {
                Some(self.routing)
            }
            _ => Some(self.activations),
        }
    }

    /// Rounds a stage's output as this contract stores it: what a correct
    /// implementation holds in that slot. Integer tensors are unchanged.
    pub fn round_output(&self, stage: SaveTensorStage, tensor: &mut HostTensor) {
        if let (Some(p), TensorData::F32(values)) = (self.output(stage), &mut tensor.data) {
            p.round(values);
        }
    }

    /// Rounds one row of decoded weight values as this contract
    /// multiplies them.
    pub fn round_weights(&self, row: &mut [f32]) {
        self.weights.round(row);
    }

    /// Whether the CPU keeping this contract replicates an implementation's
    /// arithmetic, not only bounds its error: true for llama.cpp's CPU
    /// numerics, whose rounding points (each projection input quantized
    /// block by block, f16 attention operands, f32 storage, weights
    /// decoded exactly) are all determined by the inputs both sides share,
    /// so a correct implementation differs from the emulation by f32
    /// accumulation order only. bf16 contracts bound: an f32 sum summed in
    /// another order rounds to the neighbouring bf16 value.
    pub fn emulation_replicates(&self) -> bool {
        self.ggml_activations == Some(GgmlPath::Cpu)
            && self.weights == Precision::F32
            && self.activations == Precision::F32
    }

    /// Whether the contract is the reference's own (nothing rounded beyond
    /// f32 storage).
    pub fn is_reference(&self) -> bool {
        *self == Self::REFERENCE
    }

    /// One line for reports: `weights bf16, activations bf16, routing f32`.
    pub fn describe(&self) -> String {
        format!(
            "weights {}, activations {}, routing {}{}{}",
            self.weights.name(),
            self.activations.name(),
            self.routing.name(),
            match self.ggml_activations {
                Some(GgmlPath::Cpu) => ", projection inputs as llama.cpp's CPU converts them",
                Some(GgmlPath::Cuda) =>
                    ", projection inputs as llama.cpp's CUDA kernels convert them (q8_1; above 8 tokens MMQ's f16 sub-block products, TF32 for f32 weights, f16 attention GEMMs)",
                None => "",
            },
            if self.attention_f16 { ", attention on f16 keys, values, queries and probabilities" } else { "" }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_contract_rounds_activations_but_not_routing_or_ids() {
        let c = NumericContract::BF16;
        let mut x = HostTensor::f32(vec![1, 2], vec![1.0 + 1.0 / 256.0 + 1e-6, 3.0]);
        c.round_output(SaveTensorStage::AttnOut, &mut x);
        assert_eq!(x.as_f32().unwrap(), &[1.0 + 1.0 / 128.0, 3.0]);
        let mut logits = HostTensor::f32(vec![1, 1], vec![1.0 + 1e-6]);
        c.round_output(SaveTensorStage::MoeRouterLogits, &mut logits);
        assert_eq!(logits.as_f32().unwrap(), &[1.0 + 1e-6]);
        let mut ids = HostTensor::i32(vec![1, 1], vec![7]);
        c.round_output(SaveTensorStage::MoeRouterIndices, &mut ids);
        assert_eq!(ids.as_i32().unwrap(), &[7]);
        assert!(NumericContract::REFERENCE.is_reference() && !c.is_reference());
    }
}
