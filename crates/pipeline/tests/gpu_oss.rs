//! gpt-oss's operations on the CUDA backend against the CPU backend (the
//! reference, held to transformers by the tiny-gpt-oss-oracle fixture):
//! the window, YaRN RoPE of the q and k heads of a qkv row, windowed
//! scores, the softmax with sinks (the sink's share too), the router's and
//! the experts' biases, the clamp (values beyond the limit both ways) and
//! the clamped SwiGLU, a prompt of 70 rows with a window of 16
//! then a decode row at position 70, in F32 and Bf16, the GPU's outputs
//! poisoned. GPU only (MOETRACE_GPU=1).
#![cfg(feature = "cuda")]

mod common;
#[path = "common/parity.rs"]
mod parity;

use std::sync::Arc;

use parity::{Pair, bf16, random, weight, weight_bf16};
use pipeline::backend::cuda::CudaPrecision;
use pipeline::backend::mla::MlaRope;
use pipeline::backend::oss::OssOps;
use pipeline::backend::{AttentionShape, Backend, RopeArgs};
use pipeline::weights::WeightStore;
use pipeline::{CpuBackend, CudaBackend, HostTensor};
use stage_types::SaveTensorStage as S;

const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HD: usize = 16;
const EXPERTS: usize = 6;
const K: usize = 2;
const I: usize = 40;

fn ops(b: &mut dyn Backend) -> &mut dyn OssOps {
    b.oss().expect("both backends have gpt-oss's operations")
}

fn run(precision: CudaPrecision) {
    let is_bf16 = precision == CudaPrecision::Bf16;
    let mut store = WeightStore::default();
    let w = if is_bf16 { weight_bf16 } else { weight };
    let sinks = w(&mut store, "sinks", vec![HEADS], 0.5, 1.0);
    let router_bias = w(&mut store, "router_bias", vec![EXPERTS], 0.0, 0.5);
    let biases: Vec<_> = (0..EXPERTS).map(|e| w(&mut store, &format!("bias{e}"), vec![I], 0.0, 0.5)).collect();
    let store = Arc::new(store);
    let mut gpu = CudaBackend::with_weights(store.clone(), &[], 0, precision, &Default::default()).unwrap();
    gpu.set_poison(true);
    let cpu = CpuBackend::new(store, Some(2)).unwrap();
    let cpu = if is_bf16 { cpu.with_contract(pipeline::backend::contract::NumericContract::BF16) } else { cpu };
    let mut pair = Pair { cpu, gpu, rows: Vec::new(), failures: 0, bf16: is_bf16 };
    let (one, chain) = if is_bf16 { (4e-3, 2e-2) } else { (1e-6, 1e-6) };
    let rope = MlaRope {
        inv_freq: (0..HD / 2).map(|i| 150000f64.powf(-2.0 * i as f64 / HD as f64) / 1.7).collect(),
        attention_factor: 1.35,
        interleave: false,
    };
    let qkv_width = (HEADS + 2 * KV_HEADS) * HD;
    let shape = AttentionShape { heads: HEADS, kv_heads: KV_HEADS, head_dim: HD };
    let layer = 0;
    for (t, start) in [(70usize, 0usize), (1, 70)] {
        let tokens: Vec<u32> = (0..t as u32).collect();
        pair.cpu.begin_step(&tokens, start).unwrap();
        pair.gpu.begin_step(&tokens, start).unwrap();
        let x = |name: &str, n, std: f32| {
            let v = random(&format!("{name}{t}"), n, 0.0, std);
            if is_bf16 { v.into_iter().map(bf16).collect() } else { v }
        };
        let dims = format!("T={t} pos={start}");
        for window in [Some(16), None] {
            pair.case("window", &format!("{dims} w={window:?}"), 0.0, &[S::AttnWindow], |b| {
                ops(b).window(window, S::AttnWindow)
            });
        }
        pair.put(S::QkvBias, HostTensor::f32(vec![t, qkv_width], x("qkv", t * qkv_width, 1.0)));
        pair.case("rope yarn", &format!("{dims} q nh=4 hd=16"), one, &[S::QPostRope], |b| {
            let args = RopeArgs { col_start: 0, heads: HEADS, head_dim: HD, theta: 150000.0 };
            ops(b).rope_scaled(S::QkvBias, args, &rope, S::QPostRope)
        });
        pair.case("rope yarn", &format!("{dims} k nkv=2"), one, &[S::KPostRope], |b| {
            let args = RopeArgs { col_start: HEADS * HD, heads: KV_HEADS, head_dim: HD, theta: 150000.0 };
            ops(b).rope_scaled(S::QkvBias, args, &rope, S::KPostRope)
        });
        pair.case("windowed scores", &format!("{dims} w=16"), chain, &[S::AttnScores], |b| {
            b.append_kv(layer, S::KPostRope, S::QkvBias, (HEADS + KV_HEADS) * HD)?;
            ops(b).windowed_scores(layer, S::QPostRope, shape, Some(16), S::AttnScores)
        });
        for window in [Some(16), None] {
            pair.case("softmax sinks", &format!("{dims} w={window:?}"), chain, &[S::AttnSink, S::AttnSoftmax], |b| {
                ops(b).softmax_with_sinks(S::AttnScores, window, sinks, S::AttnSoftmax, S::AttnSink)
            });
        }
        pair.put(S::MoeRouterLogits, HostTensor::f32(vec![t, EXPERTS], x("logits", t * EXPERTS, 1.0)));
        pair.case("router bias", &dims, one, &[S::MoeRouterLogits], |b| {
            ops(b).router_bias(S::MoeRouterLogits, router_bias, S::MoeRouterLogits)
        });
        let ids: Vec<i32> = (0..t * K).map(|s| ((s * 7 + s / K) % EXPERTS) as i32).collect();
        pair.put(S::MoeRouterIndices, HostTensor::i32(vec![t, K], ids));
        // Gate and up of spread 6: a few percent beyond the limit 7, both ways.
        let gate = x("gate", t * K * I, 6.0);
        let up = x("up", t * K * I, 6.0);
        pair.put(S::MoeExpertGate, HostTensor::f32(vec![t, K, I], gate));
        pair.put(S::MoeExpertUp, HostTensor::f32(vec![t, K, I], up));
        pair.case("expert bias", &format!("{dims} E=6 k=2 I=40"), one, &[S::MoeExpertGate], |b| {
            ops(b).expert_bias(S::MoeExpertGate, S::MoeRouterIndices, &biases, S::MoeExpertGate)
        });
        pair.case("clamp", &format!("{dims} limit 7"), 0.0, &[S::MoeExpertClamp], |b| {
            ops(b).clamp_gate_up(S::MoeExpertGate, S::MoeExpertUp, 7.0, S::MoeExpertClamp)
        });
        pair.case("clamped swiglu", &format!("{dims} alpha 1.702"), one, &[S::MoeExpertSwigl], |b| {
            ops(b).clamped_swiglu(S::MoeExpertClamp, 1.702, S::MoeExpertSwigl)
        });
    }
    pair.finish();
}

#[test]
fn cuda_gpt_oss_operations_match_the_cpu_backend_in_f32() {
    if common::gpu_enabled() {
        run(CudaPrecision::F32);
    }
}

#[test]
fn cuda_gpt_oss_operations_match_the_cpu_backend_in_bf16() {
    if common::gpu_enabled() {
        run(CudaPrecision::Bf16);
    }
}
