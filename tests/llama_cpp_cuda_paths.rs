//! llama.cpp's CUDA kernels at a 64-token prompt, as recorded on an H100
//! (2026-12-07, docs/gpu-runs/2026-12-07-h100-regression-families-llamacpp.md),
//! against the CPU's emulation of them (pipeline's cpu/ggml_cuda.rs): the
//! contract `check` holds llama.cpp's CUDA captures to. The fixture
//! (tests/fixtures/llamacpp-cuda-h100, 0.5 MB) is a slice of one recording
//! of a random-weight Qwen3-30B-A3B-sized layer (the GGUF of
//! ../shared/tools/llamacpp/make_gguf.py --type q4_k_m --layers 2): 13 of
//! the prompt's tokens, 32 rows of the Q4_K attn_q weight and 16 of the
//! f32 router, one head's probabilities, values and attention output.
//!
//! Each product is reproduced to within 1e-4 of a row (TF32 to 4e-7),
//! where the exact product is 5e-4 to 6e-2 away: the test fails if the
//! emulation stops being llama.cpp's arithmetic.

use std::path::PathBuf;

use compare::npy::read_npy;
use moetrace_tests::{rel_l2, workspace_root};
use pipeline::backend::cpu::ggml_cuda::{F16_GEMM_CHUNK, f16_accumulate, matmul_mmq, matmul_tf32};
use pipeline::backend::cpu::math::matmul_t;
use pipeline::weights::gguf::GgmlType;
use pipeline::weights::{WeightDtype, WeightTensor};

fn fixture() -> PathBuf {
    workspace_root().join("tests/fixtures/llamacpp-cuda-h100")
}

/// (shape, values) of a fixture .npy.
fn load(name: &str) -> (Vec<usize>, Vec<f32>) {
    let a = read_npy(&fixture().join(name)).unwrap();
    (a.shape.clone(), a.values().iter().map(|&v| v as f32).collect())
}

fn rows(values: &[f32], width: usize) -> Vec<&[f32]> {
    values.chunks(width).collect()
}

fn as_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| f64::from(x)).collect()
}

/// The worst row's rel_l2 of `got` against `want`, rows of `width`.
fn worst_row(want: &[f32], got: &[f32], width: usize) -> f64 {
    want.chunks(width).zip(got.chunks(width)).map(|(w, g)| rel_l2(&as_f64(w), &as_f64(g))).fold(0.0, f64::max)
}

#[test]
fn q4_k_projections_of_a_prompt_are_mmq_with_f16_sub_block_products() {
    let (shape, x) = load("attn_norm.npy");
    let k = shape[1];
    let bytes = std::fs::read(fixture().join("attn_q-rows0-31.q4_k")).unwrap();
    let w = WeightTensor::owned("blk.0.attn_q.weight".into(), WeightDtype::Quant(GgmlType::Q4_K), vec![32, k], bytes);
    let (_, recorded) = load("qkv_matmul-cols0-31.npy");
    let inputs = rows(&x, k);
    let emulated = matmul_mmq(&inputs, &w).expect("Q4_K takes MMQ");
    let exact = matmul_t(&inputs, &w);
    let (mmq, off) = (worst_row(&recorded, &emulated, 32), worst_row(&recorded, &exact, 32));
    eprintln!("Q4_K at 64 tokens: llama.cpp vs MMQ emulation worst row {mmq:.2e}, vs the exact product {off:.2e}");
    // Not to the bit: a few f16 block sums round the other way after
    // llama.cpp's warp-order sum (1e-4 of a row at most here).
    assert!(mmq < 2e-4, "MMQ's emulation is {mmq:.2e} from llama.cpp's");
    assert!(off > 100.0 * mmq, "the exact product should be far further off ({off:.2e})");
}

#[test]
fn f32_router_logits_of_a_prompt_are_tf32_products() {
    let (shape, x) = load("ffn_norm.npy");
    let k = shape[1];
    let (_, router) = load("router-rows0-15.npy");
    let bytes: Vec<u8> = router.iter().flat_map(|v| v.to_le_bytes()).collect();
    let w = WeightTensor::owned("blk.0.ffn_gate_inp.weight".into(), WeightDtype::F32, vec![16, k], bytes);
    let (_, recorded) = load("moe_router_logits-cols0-15.npy");
    let inputs = rows(&x, k);
    let (tf32, exact) = (matmul_tf32(&inputs, &w), matmul_t(&inputs, &w));
    let (near, off) = (worst_row(&recorded, &tf32, 16), worst_row(&recorded, &exact, 16));
    eprintln!("router logits at 64 tokens: llama.cpp vs TF32 emulation worst row {near:.2e}, vs f32 {off:.2e}");
    assert!(near < 1e-6, "TF32's emulation is {near:.2e} from llama.cpp's");
    assert!(off > 1e-4, "the f32 product should be visibly off ({off:.2e})");
    assert!(matmul_mmq(&inputs, &w).is_none(), "f32 weights take no MMQ");
}

#[test]
fn prompt_attention_sums_sixteen_positions_at_a_time_into_f16() {
    let (shape, probs) = load("attn_softmax-head5.npy");
    let (t_len, p_len) = (shape[0], shape[1]);
    let (vshape, values) = load("v-kvhead0.npy");
    let hd = vshape[1];
    let (_, recorded) = load("attention-head5.npy");
    let f16 = |v: f32| f64::from(half::f16::from_f32(v).to_f32());
    let product = |chunk: usize, accumulate: &dyn Fn(f64, f64) -> f64| -> Vec<f32> {
        let mut out = vec![0.0f32; t_len * hd];
        for t in 0..t_len {
            for d in 0..hd {
                let mut acc = 0.0;
                for start in (0..p_len).step_by(chunk) {
                    let part: f64 = (start..(start + chunk).min(p_len))
                        .map(|p| f16(probs[t * p_len + p]) * f16(values[p * hd + d]))
                        .sum();
                    acc = accumulate(acc, part);
                }
                out[t * hd + d] = acc as f32;
            }
        }
        out
    };
    let gemm16 = product(F16_GEMM_CHUNK, &f16_accumulate);
    let f32_sums = product(p_len, &|a, b| a + b);
    let (near, off) = (worst_row(&recorded, &gemm16, hd), worst_row(&recorded, &f32_sums, hd));
    eprintln!(
        "attention at 64 tokens: llama.cpp vs the f16 GEMM's emulation worst row {near:.2e}, vs f32 sums {off:.2e}"
    );
    assert!(near < 1e-4, "the f16 GEMM's emulation is {near:.2e} from llama.cpp's");
    assert!(off > 1e-4 && off > 3.0 * near, "f32 sums should be further off ({off:.2e} against {near:.2e})");
}
