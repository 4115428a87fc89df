//! DeepSeek's operations on the CUDA backend against the CPU backend
//! (the reference, held to transformers by tests/deepseek_mla.rs and
//! tests/deepseek_router.rs): every MLA operation (the latent's norm, the
//! query's and the keys' rotation, interleaved and rotate-half, with a
//! YaRN-style attention factor; the cache append of keys and values of
//! different widths; scores with MLA's scale; softmax · V) and the grouped
//! router (ties, every biased score negative, NaN logits), at awkward
//! sizes, a prompt of 70 rows then a decode row at position 70, in F32 and
//! Bf16, with the GPU's outputs poisoned. GPU only (MOETRACE_GPU=1).
#![cfg(feature = "cuda")]

mod common;
#[path = "common/parity.rs"]
mod parity;

use std::sync::Arc;

use parity::{Pair, bf16, random, weight, weight_bf16};
use pipeline::backend::Backend;
use pipeline::backend::cuda::CudaPrecision;
use pipeline::backend::grouped_router::{GroupedSlots, GroupedTopK};
use pipeline::backend::mla::{MlaDims, MlaRope};
use pipeline::weights::{WeightDtype, WeightStore, WeightTensor};
use pipeline::{CpuBackend, CudaBackend, HostTensor};
use stage_types::SaveTensorStage as S;

const DIMS: MlaDims = MlaDims { heads: 3, q_lora_rank: None, kv_lora_rank: 20, qk_nope: 6, qk_rope: 4, v_head_dim: 5 };
const EXPERTS: usize = 24;

fn rope(interleave: bool) -> MlaRope {
    MlaRope { inv_freq: vec![1.0, 0.031], attention_factor: 1.13, interleave }
}

fn rel_l2(a: &[f64], b: &[f64]) -> f64 {
    let d: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let n: f64 = a.iter().map(|x| x * x).sum();
    if d == 0.0 { 0.0 } else { (d / n).sqrt() }
}

fn mla_ops(b: &mut dyn Backend) -> &mut dyn pipeline::backend::mla::MlaOps {
    b.mla().expect("both backends have MLA")
}

/// Router logits with the awkward rows first: all equal (ties throughout),
/// a NaN, then random rows.
fn logits(t: usize, round: bool) -> Vec<f32> {
    let mut x = random(&format!("logits{t}"), t * EXPERTS, 0.0, 2.0);
    if t > 2 {
        x[..EXPERTS].fill(0.25);
        x[EXPERTS + 5] = f32::NAN;
    }
    if round { x.into_iter().map(bf16).collect() } else { x }
}

fn run(precision: CudaPrecision) {
    let is_bf16 = precision == CudaPrecision::Bf16;
    let mut store = WeightStore::default();
    let w = if is_bf16 { weight_bf16 } else { weight };
    let norm = w(&mut store, "latent_norm", vec![DIMS.kv_lora_rank], 1.0, 0.1);
    // Every biased score negative: masked groups must lose anyway.
    // Every sixth expert shares its bias, so the row of equal logits ties
    // experts and groups throughout (ties go to the lower index).
    let six = random("bias", 6, -2.0, 0.3);
    let values: Vec<f32> = (0..EXPERTS).map(|e| six[e % 6]).map(|v| if is_bf16 { bf16(v) } else { v }).collect();
    let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let bias = store.insert(WeightTensor::owned("bias".into(), WeightDtype::F32, vec![EXPERTS], bytes));
    let store = Arc::new(store);
    let mut gpu = CudaBackend::with_weights(store.clone(), &[], 0, precision, &Default::default()).unwrap();
    gpu.set_poison(true);
    let cpu = CpuBackend::new(store, Some(2)).unwrap();
    let cpu = if is_bf16 { cpu.with_contract(pipeline::backend::contract::NumericContract::BF16) } else { cpu };
    let mut pair = Pair { cpu, gpu, rows: Vec::new(), failures: 0, bf16: is_bf16 };
    let (one, chain) = if is_bf16 { (4e-3, 2e-2) } else { (1e-6, 1e-6) };
    let qk = DIMS.qk_nope + DIMS.qk_rope;
    let kv_b_width = DIMS.heads * (DIMS.qk_nope + DIMS.v_head_dim);
    // One layer for both rotations: a step at position 0 empties every
    // cache (the decode step then needs only this layer's).
    let layer = 0;
    for interleave in [true, false] {
        let rope = rope(interleave);
        for (t, start) in [(70usize, 0usize), (1, 70)] {
            let tokens: Vec<u32> = (0..t as u32).collect();
            pair.cpu.begin_step(&tokens, start).unwrap();
            pair.gpu.begin_step(&tokens, start).unwrap();
            let dims = format!("T={t} pos={start} {}", if interleave { "interleaved" } else { "half" });
            let x = |name: &str, n| {
                let v = random(&format!("{name}{t}{interleave}"), n, 0.0, 1.0);
                if is_bf16 { v.into_iter().map(bf16).collect() } else { v }
            };
            pair.put(S::MlaKvA, HostTensor::f32(vec![t, DIMS.kv_lora_rank + DIMS.qk_rope], x("kv_a", t * 24)));
            pair.put(S::MlaKvB, HostTensor::f32(vec![t, kv_b_width], x("kv_b", t * kv_b_width)));
            pair.put(S::MlaQ, HostTensor::f32(vec![t, DIMS.heads * qk], x("q", t * DIMS.heads * qk)));
            pair.case("latent_norm", &format!("{dims} 24->20"), one, &[S::MlaKvANorm], |b| {
                mla_ops(b).latent_norm(S::MlaKvA, norm, 1e-6, S::MlaKvANorm)
            });
            pair.case("query_rope", &format!("{dims} nh=3 6+4"), one, &[S::QPostRope], |b| {
                mla_ops(b).query_rope(S::MlaQ, DIMS, &rope, S::QPostRope)
            });
            pair.case("keys", &format!("{dims} nh=3 6+4"), one, &[S::KPostRope], |b| {
                mla_ops(b).keys(S::MlaKvA, S::MlaKvB, DIMS, &rope, S::KPostRope)
            });
            pair.case(
                "mla attention",
                &format!("{dims} qk=10 v=5"),
                chain,
                &[S::AttnScores, S::AttnSoftmax, S::Attention],
                |b| {
                    mla_ops(b).append_kv(layer, S::KPostRope, S::MlaKvB, DIMS)?;
                    mla_ops(b).scores(layer, S::QPostRope, DIMS, 0.37, S::AttnScores)?;
                    b.attn_softmax(S::AttnScores, S::AttnSoftmax)?;
                    mla_ops(b).attention(layer, S::AttnSoftmax, DIMS, S::Attention)
                },
            );
            let (ck, cv) = pair.cpu.kv_cache(layer).unwrap();
            let (gk, gv) = pair.gpu.kv_cache(layer).unwrap();
            let same = ck.shape == gk.shape
                && cv.shape == gv.shape
                && rel_l2(&ck.to_f64(), &gk.to_f64()) <= one
                && rel_l2(&cv.to_f64(), &gv.to_f64()) <= one;
            pair.failures += usize::from(!same);
            pair.rows.push(format!(
                "{:<16} {:<20} {:<26} keys {:?} values {:?}{:<10} {}",
                "kv cache",
                "read back",
                dims,
                gk.shape,
                gv.shape,
                "",
                if same { "ok" } else { "FAIL" }
            ));
            for (n_group, topk_group, top_k, normalise) in
                [(4usize, 2usize, 3usize, true), (1, 1, 5, false), (8, 3, 8, true)]
            {
                let router = GroupedTopK { n_group, topk_group, top_k, normalise, scaling: 2.5 };
                pair.put(S::MoeRouterLogits, HostTensor::f32(vec![t, EXPERTS], logits(t, is_bf16)));
                pair.case(
                    "router_grouped",
                    &format!("T={t} E=24 g={n_group}/{topk_group} k={top_k}"),
                    1e-6,
                    &[S::MoeRouterGroupScores, S::MoeRouterGroups, S::MoeRouter, S::MoeRouterIndices],
                    |b| {
                        let ops = b.grouped_router().expect("both backends route in groups");
                        ops.route_grouped(S::MoeRouterLogits, bias, &router, GroupedSlots::STAGES)
                    },
                );
            }
        }
    }
    pair.finish();
}

#[test]
fn cuda_mla_and_grouped_router_match_the_cpu_backend_in_f32() {
    if common::gpu_enabled() {
        run(CudaPrecision::F32);
    }
}

#[test]
fn cuda_mla_and_grouped_router_match_the_cpu_backend_in_bf16() {
    if common::gpu_enabled() {
        run(CudaPrecision::Bf16);
    }
}
