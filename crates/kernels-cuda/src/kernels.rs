//! Typed handles for every kernel entry point, one module per kernel
//! family (`kernels/<family>.cu`), so callers name kernels by constants
//! instead of strings. A test holds this list and the sources equal: every
//! handle names an entry point of its family, and every entry point has a
//! handle.

/// One entry point of one kernel family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Kernel {
    /// The family (`kernels/<family>.cu`).
    pub family: &'static str,
    /// The `extern "C"` name.
    pub name: &'static str,
}

/// A kernel with one entry point per weight type, from one template body
/// (`WEIGHT_VARIANTS` in common.cuh): `<base>_f32` and `<base>_bf16w`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WeightKernel {
    /// For f32 weights.
    pub f32: Kernel,
    /// For bf16 weights.
    pub bf16w: Kernel,
}

const fn k(family: &'static str, name: &'static str) -> Kernel {
    Kernel { family, name }
}

const fn w(family: &'static str, f32: &'static str, bf16w: &'static str) -> WeightKernel {
    WeightKernel { f32: k(family, f32), bf16w: k(family, bf16w) }
}

/// kernels/attention.cu.
pub mod attention {
    use super::{Kernel, k};
    /// NeoX RoPE.
    pub const ROPE: Kernel = k("attention", "rope_f32");
    /// A step's keys and values appended to a KV cache at its position.
    pub const APPEND_KV: Kernel = k("attention", "append_kv_f32");
    /// Tiled attention scores (many rows).
    pub const SCORES: Kernel = k("attention", "attn_scores_f32");
    /// Attention scores of one row (decode).
    pub const SCORES_ROW: Kernel = k("attention", "attn_scores_row_f32");
    /// Causal softmax, one warp per row.
    pub const SOFTMAX: Kernel = k("attention", "attn_softmax_f32");
    /// softmax·V, tiled, optionally split over positions.
    pub const ATTENTION: Kernel = k("attention", "attention_f32");
    /// softmax·V of one row (decode), split over positions.
    pub const ATTENTION_ROW: Kernel = k("attention", "attention_row_f32");
    /// Adds the splits' partial sums in order.
    pub const COMBINE: Kernel = k("attention", "attention_combine_f32");
    /// Scores, causal softmax and softmax·V of many rows in one kernel,
    /// each intermediate stored only when asked for.
    pub const FUSED: Kernel = k("attention", "attention_fused_f32");
    /// The same on tensor cores (Bf16 mode, hd % 16 == 0, hd <= 128).
    pub const FUSED_MMA: Kernel = k("attention", "attention_fused_mma");
}

/// kernels/elementwise.cu.
pub mod elementwise {
    use super::{Kernel, WeightKernel, k, w};
    /// Embedding rows.
    pub const EMBEDDING: WeightKernel = w("elementwise", "embedding_f32", "embedding_bf16w");
    /// Rounds f32 values to bf16 values in place.
    pub const ROUND_BF16: Kernel = k("elementwise", "round_bf16_f32");
    /// f32 (holding bf16 values) to bf16 bits.
    pub const TO_BF16_BITS: Kernel = k("elementwise", "to_bf16_bits_f32");
    /// Row-wise bias.
    pub const ADD_BIAS: Kernel = k("elementwise", "add_bias_f32");
    /// a + b.
    pub const ADD: Kernel = k("elementwise", "add_f32");
    /// a * b.
    pub const MUL: Kernel = k("elementwise", "mul_f32");
    /// The ranks' gathered values of each element added in rank order
    /// (f64), rounded once to f32.
    pub const RANK_SUM: Kernel = k("elementwise", "rank_sum_f32");
    /// silu(x).
    pub const SILU: Kernel = k("elementwise", "silu_f32");
    /// 1 / (1 + exp(-x)).
    pub const SIGMOID: Kernel = k("elementwise", "sigmoid_f32");
    /// silu(gate) * up.
    pub const SWIGLU: Kernel = k("elementwise", "swiglu_f32");
    /// The greedy choice of a row: each block's best...
    pub const ARGMAX: Kernel = k("elementwise", "argmax_f32");
    /// ... and the best of the blocks'.
    pub const ARGMAX_FINAL: Kernel = k("elementwise", "argmax_final_f32");
    /// Slots copied to pinned host memory by a table ([`crate::gather`]).
    pub const GATHER_WORDS: Kernel = k("elementwise", "gather_words");
}

/// kernels/linear.cu.
pub mod linear {
    use super::{Kernel, WeightKernel, k, w};
    /// Per-expert projection, one warp per output.
    pub const EXPERT_LINEAR: WeightKernel = w("linear", "expert_linear_f32", "expert_linear_bf16w");
    /// Per-expert projection with 16-byte bf16 loads (k % 8 == 0).
    pub const EXPERT_LINEAR_V8: Kernel = k("linear", "expert_linear_bf16w_v8");
    /// Dense projection of up to 8 rows, bf16 weights (k % 8 == 0).
    pub const GEMV_V8: Kernel = k("linear", "gemv_bf16w_v8");
}

/// kernels/moe.cu.
pub mod moe {
    use super::{Kernel, k};
    /// Softmax, top-k and renormalisation, one warp per token.
    pub const ROUTER_TOP_K: Kernel = k("moe", "router_top_k_f32");
    /// Weighted sum of the chosen experts' outputs.
    pub const COMBINE: Kernel = k("moe", "moe_combine_f32");
    /// The same sum plus a shared expert's (optionally gated) output.
    pub const COMBINE_SHARED: Kernel = k("moe", "moe_combine_shared_f32");
    /// Slots per expert.
    pub const COUNT_SLOTS: Kernel = k("moe", "moe_count_slots");
    /// Slot lists per expert, in ascending order.
    pub const SORT_SLOTS: Kernel = k("moe", "moe_sort_slots");
    /// NaN rows for slots whose id is no expert.
    pub const INVALID_ROWS: Kernel = k("moe", "moe_invalid_rows");
    /// The grouped tensor-core expert projection.
    pub const EXPERT_LINEAR_GROUPED: Kernel = k("moe", "expert_linear_grouped_bf16w");
    /// The grouped per-expert projection over experts kept as ggml blocks
    /// (decoded to bf16 inside its weight tiles).
    pub const EXPERT_LINEAR_GROUPED_QUANT: Kernel = k("moe", "expert_linear_grouped_quant");
    /// Virtual expert-parallel ranks: each rank's receive rows.
    pub const EP_DISPATCH: Kernel = k("moe", "ep_dispatch");
    /// Each rank's partial sum of its received slots.
    pub const EP_COMBINE_PARTIALS: Kernel = k("moe", "ep_combine_partials");
    /// moe_ffn_out of ranks, slot or rank order, with the shared term.
    pub const EP_REDUCE: Kernel = k("moe", "ep_reduce");
}

/// kernels/norm.cu.
pub mod norm {
    use super::{WeightKernel, w};
    /// RMSNorm of rows.
    pub const RMS_NORM: WeightKernel = w("norm", "rms_norm_f32", "rms_norm_bf16w");
    /// Qwen3's per-head QK-norm.
    pub const QK_NORM: WeightKernel = w("norm", "qk_norm_f32", "qk_norm_bf16w");
    /// RMSNorm of each row's first columns (MLA's latent).
    pub const RMS_NORM_COLS: WeightKernel = w("norm", "rms_norm_cols_f32", "rms_norm_cols_bf16w");
}

/// kernels/mla.cu.
pub mod mla {
    use super::{Kernel, WeightKernel, k, w};
    /// MLA's query with each head's rope columns rotated.
    pub const QUERY_ROPE: Kernel = k("mla", "mla_query_rope_f32");
    /// MLA's keys: each head's k_nope, then the shared rotated columns.
    pub const KEYS: Kernel = k("mla", "mla_keys_f32");
    /// MLA's keys and values appended to a layer's caches.
    pub const APPEND_KV: Kernel = k("mla", "mla_append_kv_f32");
    /// MLA's scores (query and key widths qk, any scale).
    pub const SCORES: Kernel = k("mla", "mla_scores_f32");
    /// MLA's softmax · V (value width v_dim).
    pub const ATTENTION: Kernel = k("mla", "mla_attention_f32");
    /// DeepSeek's grouped router (sigmoid, correction bias, groups).
    pub const ROUTER_GROUPED: WeightKernel = w("mla", "router_grouped_f32", "router_grouped_bf16w");
}

/// kernels/oss.cu: gpt-oss's operations.
pub mod oss {
    use super::{Kernel, k};
    /// NeoX RoPE from a frequency table with YaRN's factor.
    pub const ROPE: Kernel = k("oss", "oss_rope_f32");
    /// Scores outside a window set to 0.
    pub const WINDOW_MASK: Kernel = k("oss", "oss_window_mask_f32");
    /// The softmax over a window with the head's sink.
    pub const SOFTMAX_SINKS: Kernel = k("oss", "oss_softmax_sinks_f32");
    /// The router's bias added to its logits, unrounded.
    pub const ROUTER_BIAS: Kernel = k("oss", "oss_router_bias_f32");
    /// Each chosen expert's bias added to its slot.
    pub const EXPERT_BIAS: Kernel = k("oss", "oss_expert_bias_f32");
    /// gate and up clamped, side by side.
    pub const CLAMP: Kernel = k("oss", "oss_clamp_f32");
    /// The clamped SwiGLU.
    pub const SWIGLU: Kernel = k("oss", "oss_swiglu_f32");
}

/// kernels/quant.cu.
pub mod quant {
    use super::{Kernel, k};
    /// ggml blocks (Q8_0, Q4_K, Q5_K, Q6_K) decoded to f32.
    pub const DEQUANT_F32: Kernel = k("quant", "dequant_f32");
    /// The same as bf16 bits.
    pub const DEQUANT_BF16: Kernel = k("quant", "dequant_bf16");
    /// Dense projection of a few rows over quantized weights.
    pub const GEMV_QUANT: Kernel = k("quant", "gemv_quant");
    /// Per-expert projection over quantized stacked experts.
    pub const EXPERT_LINEAR_QUANT: Kernel = k("quant", "expert_linear_quant");
    /// Embedding rows from a quantized table.
    pub const EMBEDDING_QUANT: Kernel = k("quant", "embedding_quant");
}

/// kernels/reference.cu: the CPU reference's product, to the bit.
pub mod reference {
    use super::{Kernel, k};
    /// `out[i][r] = (f32) dot(x[i], w[r])` in math.rs's summation order.
    pub const MATMUL_T: Kernel = k("reference", "ref_matmul_t");
}

/// kernels/synthetic.cu.
pub mod synthetic {
    use super::{Kernel, k};
    /// Synthetic weights as bf16 bits.
    pub const FILL_BF16: Kernel = k("synthetic", "synthetic_fill_bf16");
    /// Synthetic weights as f32 (bf16 values widened).
    pub const FILL_F32: Kernel = k("synthetic", "synthetic_fill_f32");
    /// Synthetic weights in a ggml block format.
    pub const BLOCKS: Kernel = k("synthetic", "synthetic_blocks");
}

/// Every entry point, weight variants included.
pub const ALL: &[Kernel] = &[
    moe::EP_DISPATCH,
    moe::EP_COMBINE_PARTIALS,
    moe::EP_REDUCE,
    reference::MATMUL_T,
    attention::ROPE,
    attention::APPEND_KV,
    attention::SCORES,
    attention::SCORES_ROW,
    attention::SOFTMAX,
    attention::ATTENTION,
    attention::ATTENTION_ROW,
    attention::COMBINE,
    attention::FUSED,
    attention::FUSED_MMA,
    elementwise::EMBEDDING.f32,
    elementwise::EMBEDDING.bf16w,
    elementwise::ROUND_BF16,
    elementwise::TO_BF16_BITS,
    elementwise::ADD_BIAS,
    elementwise::ADD,
    elementwise::MUL,
    elementwise::RANK_SUM,
    elementwise::SILU,
    elementwise::SIGMOID,
    elementwise::SWIGLU,
    elementwise::ARGMAX,
    elementwise::ARGMAX_FINAL,
    elementwise::GATHER_WORDS,
    linear::EXPERT_LINEAR.f32,
    linear::EXPERT_LINEAR.bf16w,
    linear::EXPERT_LINEAR_V8,
    linear::GEMV_V8,
    moe::ROUTER_TOP_K,
    moe::COMBINE,
    moe::COMBINE_SHARED,
    moe::COUNT_SLOTS,
    moe::SORT_SLOTS,
    moe::INVALID_ROWS,
    moe::EXPERT_LINEAR_GROUPED,
    moe::EXPERT_LINEAR_GROUPED_QUANT,
    norm::RMS_NORM.f32,
    norm::RMS_NORM.bf16w,
    norm::QK_NORM.f32,
    norm::QK_NORM.bf16w,
    quant::DEQUANT_F32,
    quant::DEQUANT_BF16,
    quant::GEMV_QUANT,
    quant::EXPERT_LINEAR_QUANT,
    quant::EMBEDDING_QUANT,
    synthetic::FILL_BF16,
    synthetic::FILL_F32,
    synthetic::BLOCKS,
    norm::RMS_NORM_COLS.f32,
    norm::RMS_NORM_COLS.bf16w,
    mla::QUERY_ROPE,
    mla::KEYS,
    mla::APPEND_KV,
    mla::SCORES,
    mla::ATTENTION,
    mla::ROUTER_GROUPED.f32,
    mla::ROUTER_GROUPED.bf16w,
    oss::ROPE,
    oss::WINDOW_MASK,
    oss::SOFTMAX_SINKS,
    oss::ROUTER_BIAS,
    oss::EXPERT_BIAS,
    oss::CLAMP,
    oss::SWIGLU,
];

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::sources::FAMILIES;

    /// Entry points a family's source defines: `extern "C" __global__ void
    /// [__launch_bounds__(n)] NAME(` and the two of each `WEIGHT_VARIANTS(NAME, ...)`.
    fn entry_points(source: &str) -> BTreeSet<String> {
        let mut names = BTreeSet::new();
        for line in source.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("extern \"C\" __global__ void ") {
                let rest = rest.trim_start();
                let rest = match rest.strip_prefix("__launch_bounds__(") {
                    Some(r) => r.split_once(')').map(|(_, r)| r.trim_start()).unwrap_or(r),
                    None => rest,
                };
                names.insert(rest.split('(').next().unwrap_or("").trim().to_string());
            } else if let Some(rest) = line.strip_prefix("WEIGHT_VARIANTS(") {
                let base = rest.split(',').next().unwrap_or("").trim();
                names.insert(format!("{base}_f32"));
                names.insert(format!("{base}_bf16w"));
            }
        }
        names
    }

    /// A recorded decode step launches each kernel while the one before it
    /// may still run (programmatic dependent launch), so an entry point
    /// that touched memory before `PDL_ENTRY()` would race. The
    /// reference's kernel is never recorded (it is launched and waited for
    /// by the host, one product at a time) and uses nothing of common.cuh.
    #[test]
    fn every_entry_point_waits_for_its_predecessors_first() {
        for (family, source) in FAMILIES.iter().filter(|(family, _)| *family != "reference") {
            let lines: Vec<&str> = source.lines().collect();
            for (i, line) in lines.iter().enumerate() {
                if !line.trim_start().starts_with("extern \"C\" __global__") {
                    continue;
                }
                let open = (i..lines.len()).find(|&j| lines[j].trim_end().ends_with('{')).unwrap();
                let first = lines[open + 1..].iter().map(|l| l.trim()).find(|l| !l.is_empty()).unwrap_or("");
                assert_eq!(first, "PDL_ENTRY();", "{family}: `{}` must start with PDL_ENTRY();", line.trim());
            }
        }
        let common = include_str!("../kernels/common.cuh");
        assert_eq!(
            common.matches("PARAMS { PDL_ENTRY(); NAME##_impl<W> ARGS; }").count(),
            2,
            "WEIGHT_VARIANTS entry points"
        );
    }

    #[test]
    fn every_handle_names_an_entry_point_and_every_entry_point_has_a_handle() {
        let mut defined = BTreeSet::new();
        for (family, source) in FAMILIES {
            for name in entry_points(source) {
                defined.insert((family.to_string(), name));
            }
        }
        let handles: BTreeSet<(String, String)> =
            ALL.iter().map(|k| (k.family.to_string(), k.name.to_string())).collect();
        assert_eq!(handles.len(), ALL.len(), "a handle is listed twice");
        let missing: Vec<_> = handles.difference(&defined).collect();
        assert!(missing.is_empty(), "handles with no entry point in their family: {missing:?}");
        let unlisted: Vec<_> = defined.difference(&handles).collect();
        assert!(unlisted.is_empty(), "entry points with no handle: {unlisted:?}");
    }
}

#[cfg(test)]
mod gpu_tests {
    use super::*;
    use cudarc::driver::sys::{CUfunction_attribute as A, cuFuncGetAttribute};

    /// Registers and local memory (spilled registers, stack) of every
    /// kernel in the Bf16 build, printed as a table; the tensor-core
    /// kernels, which keep whole fragments in registers, must not spill.
    #[test]
    fn kernels_report_registers_and_the_tensor_core_ones_do_not_spill() {
        let Some(_) = crate::test_gpu() else { return };
        let device = crate::GpuDevice::open_with(0, crate::KernelBuild { round_bf16: true }).unwrap();
        let mut spills = Vec::new();
        for &kernel in ALL {
            let f = device.kernel(kernel).unwrap();
            let attribute = |a: A| {
                let mut v = 0i32;
                // SAFETY: a loaded function and an out pointer to an i32.
                let r = unsafe { cuFuncGetAttribute(&mut v, a, f.cu_function()) };
                assert_eq!(r, cudarc::driver::sys::CUresult::CUDA_SUCCESS, "{}", kernel.name);
                v
            };
            let (regs, local) =
                (attribute(A::CU_FUNC_ATTRIBUTE_NUM_REGS), attribute(A::CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES));
            let shared = attribute(A::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES);
            eprintln!("{:<36} regs {regs:>3}  local {local:>5} B  shared {shared:>6} B", kernel.name);
            if [attention::FUSED_MMA, moe::EXPERT_LINEAR_GROUPED, moe::EXPERT_LINEAR_GROUPED_QUANT].contains(&kernel)
                && local > 0
            {
                spills.push(kernel.name);
            }
        }
        assert!(spills.is_empty(), "tensor-core kernels spill to local memory: {spills:?}");
    }
}
