//! Backend parity, in the style of llama.cpp's test-backend-ops: every
//! operation of the CUDA backend against the CPU backend on seeded random
//! inputs of awkward sizes (T = 70 then 1 at position 70, so decode
//! attention splits its 71 positions; widths that are not multiples of
//! 32, 13 experts; T = 300 for the expert projections), with the GPU's outputs poisoned (NaN) before each run so
//! an unwritten element fails. Prints a table. GPU only (MOETRACE_GPU=1).
//!
//! To add a case: write its inputs with `put`, call the operation on both
//! backends through `case`, and give its tolerance (rel_l2; ids exact).
#![cfg(feature = "cuda")]

mod common;
#[path = "common/parity.rs"]
mod parity;

use std::sync::Arc;

use parity::{Pair, bf16, random, weight, weight_bf16};
use pipeline::backend::cuda::CudaPrecision;
use pipeline::backend::{AttentionShape, Backend, QkNormArgs, RopeArgs};
use pipeline::weights::{WeightId, WeightStore};
use pipeline::{CpuBackend, CudaBackend, HostTensor};
use stage_types::SaveTensorStage as S;

#[test]
fn every_cuda_operation_matches_the_cpu_backend_on_awkward_sizes() {
    if !common::gpu_enabled() {
        return;
    }
    let (h, v, e, k, i_dim, hd) = (45usize, 37usize, 13usize, 3usize, 29usize, 18usize);
    let mut store = WeightStore::default();
    let table = weight(&mut store, "table", vec![v, h], 0.0, 1.0);
    let norm = weight(&mut store, "norm", vec![h], 1.0, 0.1);
    let w1 = weight(&mut store, "w1", vec![31, h], 0.0, 0.15);
    let w2 = weight(&mut store, "w2", vec![7, h], 0.0, 0.15);
    let bias = weight(&mut store, "bias", vec![38], 0.0, 0.1);
    let (qn, kn) = (weight(&mut store, "qn", vec![hd], 1.0, 0.1), weight(&mut store, "kn", vec![hd], 1.0, 0.1));
    let router = weight(&mut store, "router", vec![e, h], 0.0, 0.3);
    let ups: Vec<WeightId> = (0..e).map(|x| weight(&mut store, &format!("up{x}"), vec![i_dim, h], 0.0, 0.15)).collect();
    let downs: Vec<WeightId> =
        (0..e).map(|x| weight(&mut store, &format!("down{x}"), vec![h, i_dim], 0.0, 0.2)).collect();
    // Larger experts, many slots per expert (a prefill's shape).
    let (big_h, big_i, big_e) = (300usize, 150usize, 5usize);
    let big_ups: Vec<WeightId> =
        (0..big_e).map(|x| weight(&mut store, &format!("bigup{x}"), vec![big_i, big_h], 0.0, 0.06)).collect();
    let big_downs: Vec<WeightId> =
        (0..big_e).map(|x| weight(&mut store, &format!("bigdown{x}"), vec![big_h, big_i], 0.0, 0.08)).collect();
    let store = Arc::new(store);
    let experts: [&[WeightId]; 4] = [&ups, &downs, &big_ups, &big_downs];
    let mut gpu =
        CudaBackend::with_weights(store.clone(), &experts, 0, CudaPrecision::F32, &Default::default()).unwrap();
    gpu.set_poison(true);
    let mut pair =
        Pair { cpu: CpuBackend::new(store, Some(2)).unwrap(), gpu, rows: Vec::new(), failures: 0, bf16: false };
    let shape = AttentionShape { heads: 3, kv_heads: 1, head_dim: hd };

    for (t, start) in [(70usize, 0usize), (1, 70)] {
        let tokens: Vec<u32> = (0..t as u32).map(|x| (x * 7 + 3) % v as u32).collect();
        pair.cpu.begin_step(&tokens, start).unwrap();
        pair.gpu.begin_step(&tokens, start).unwrap();
        let dims = format!("T={t} pos={start}");
        let x = |name: &str, n| random(&format!("{name}{t}"), n, 0.0, 1.0);
        pair.case("embedding", &format!("{dims} V={v} H={h}"), 1e-7, &[S::Embedding], |b| {
            b.embedding(table, S::Embedding)
        });
        pair.case("rms_norm", &format!("{dims} H={h}"), 1e-6, &[S::AttnNorm], |b| {
            b.rms_norm(S::Embedding, norm, 1e-6, S::AttnNorm)
        });
        pair.case("linear", &format!("{dims} {h}->31+7"), 1e-6, &[S::QkvMatmul], |b| {
            b.linear(S::AttnNorm, &[w1, w2], S::QkvMatmul)
        });
        pair.case("add_bias", &format!("{dims} W=38"), 1e-6, &[S::QkvBias], |b| {
            b.add_bias(S::QkvMatmul, &[bias], S::QkvBias)
        });
        pair.put(S::QkvMatmul, HostTensor::f32(vec![t, 5 * hd], x("qkv", t * 5 * hd)));
        let args = QkNormArgs { q_heads: 3, kv_heads: 1, head_dim: hd, q_weight: qn, k_weight: kn, eps: 1e-6 };
        pair.case("qk_norm", &format!("{dims} nh=3 nkv=1 hd={hd}"), 1e-6, &[S::QkNorm], |b| {
            b.qk_norm(S::QkvMatmul, args, S::QkNorm)
        });
        pair.case("rope q", &format!("{dims} 3 heads"), 1e-6, &[S::QPostRope], |b| {
            b.rope(S::QkNorm, RopeArgs { col_start: 0, heads: 3, head_dim: hd, theta: 1e4 }, S::QPostRope)
        });
        pair.case("rope k", &format!("{dims} 1 head @54"), 1e-6, &[S::KPostRope], |b| {
            b.rope(S::QkNorm, RopeArgs { col_start: 54, heads: 1, head_dim: hd, theta: 1e4 }, S::KPostRope)
        });
        pair.case("attn_scores", &format!("{dims} GQA 3/1"), 1e-6, &[S::AttnScores], |b| {
            b.append_kv(0, S::KPostRope, S::QkvMatmul, 4 * hd)?;
            b.attn_scores(0, S::QPostRope, shape, S::AttnScores)
        });
        pair.case("attn_softmax", &dims, 1e-6, &[S::AttnSoftmax], |b| b.attn_softmax(S::AttnScores, S::AttnSoftmax));
        pair.case("attention", &dims, 1e-6, &[S::Attention], |b| b.attention(0, S::AttnSoftmax, shape, S::Attention));
        pair.put(S::FfnGate, HostTensor::f32(vec![t, h], x("gate", t * h)));
        pair.put(S::FfnUp, HostTensor::f32(vec![t, h], x("up", t * h)));
        pair.case("add", &format!("{dims} H={h}"), 1e-7, &[S::PostAttnResidual], |b| {
            b.add(S::FfnGate, S::FfnUp, S::PostAttnResidual)
        });
        pair.case("silu", &format!("{dims} H={h}"), 1e-6, &[S::FfnSilu], |b| b.silu(S::FfnGate, S::FfnSilu));
        pair.case("mul", &format!("{dims} H={h}"), 1e-7, &[S::FfnSwigl], |b| b.mul(S::FfnSilu, S::FfnUp, S::FfnSwigl));
        pair.case("swiglu", &format!("{dims} H={h}"), 1e-6, &[S::MoeExpertSwigl], |b| {
            b.swiglu(S::FfnGate, S::FfnUp, S::MoeExpertSwigl)
        });
        pair.put(S::FfnNorm, HostTensor::f32(vec![t, h], x("norm", t * h)));
        pair.case("linear router", &format!("{dims} E={e}"), 1e-6, &[S::MoeRouterLogits], |b| {
            b.linear(S::FfnNorm, &[router], S::MoeRouterLogits)
        });
        for normalise in [true, false] {
            pair.case(
                &format!("top_k norm={normalise}"),
                &format!("{dims} E={e} k={k}"),
                1e-6,
                &[S::MoeRouter, S::MoeRouterIndices],
                |b| b.router_top_k(S::MoeRouterLogits, k, normalise, S::MoeRouter, S::MoeRouterIndices),
            );
        }
        // Many experts (lanes own 66 each: both halves of the taken bits)
        // and exact ties (logits on a coarse grid): ties go to the lower id.
        let many = 2100usize;
        pair.put(
            S::AttnScores,
            HostTensor::f32(vec![t, many], x("manylogits", t * many).iter().map(|v| (v * 4.0).round() / 4.0).collect()),
        );
        pair.case("top_k ties", &format!("{dims} E={many} k=9"), 1e-6, &[S::AttnSoftmax, S::MoeExpertGate], |b| {
            b.router_top_k(S::AttnScores, 9, true, S::AttnSoftmax, S::MoeExpertGate)
        });
        pair.case("expert_linear", &format!("{dims} [T,H]->[T,{k},{i_dim}]"), 1e-6, &[S::MoeExpertUp], |b| {
            b.expert_linear(S::FfnNorm, S::MoeRouterIndices, &ups, S::MoeExpertUp)
        });
        pair.case("expert_linear", &format!("{dims} [T,{k},{i_dim}]->[T,{k},H]"), 1e-6, &[S::MoeExpertOut], |b| {
            b.expert_linear(S::MoeExpertUp, S::MoeRouterIndices, &downs, S::MoeExpertOut)
        });
        pair.case("moe_combine", &format!("{dims} k={k} H={h}"), 1e-6, &[S::MoeFfnOut], |b| {
            b.moe_combine(S::MoeExpertOut, S::MoeRouter, None, S::MoeFfnOut)
        });
        // The shared expert's term (Qwen2-MoE): its sigmoid gate, then the
        // routed sum plus the gated and the ungated shared output.
        pair.put(S::MoeSharedLogit, HostTensor::f32(vec![t, 1], x("sharedlogit", t).iter().map(|v| 4.0 * v).collect()));
        pair.case("sigmoid", &format!("{dims} [T,1]"), 1e-6, &[S::MoeSharedWeight], |b| {
            b.sigmoid(S::MoeSharedLogit, S::MoeSharedWeight)
        });
        pair.put(S::MoeSharedOut, HostTensor::f32(vec![t, h], x("sharedout", t * h)));
        for gated in [true, false] {
            let shared =
                pipeline::backend::SharedTerm { out: S::MoeSharedOut, weight: gated.then_some(S::MoeSharedWeight) };
            pair.case("moe_combine shared", &format!("{dims} k={k} H={h} gated {gated}"), 1e-6, &[S::MoeFfnOut], |b| {
                b.moe_combine(S::MoeExpertOut, S::MoeRouter, Some(shared), S::MoeFfnOut)
            });
        }
        pair.argmax(S::MoeFfnOut, "moe_ffn_out", &dims);
        // The greedy choice on rows made to trip it: NaN, ties (the lower
        // index wins), nothing above -inf (0), a long row with two maxima.
        let mut long: Vec<f32> = (0..5003).map(|i| ((i * 7919) % 1000) as f32 / 1000.0).collect();
        long[4100] = 2.0;
        long[4999] = 2.0;
        let rows: [Vec<f32>; 4] = [
            vec![f32::NAN, 3.0, 5.0, f32::NAN, 5.0, f32::NEG_INFINITY],
            vec![f32::NAN; 7],
            vec![f32::NEG_INFINITY, f32::NAN, f32::NEG_INFINITY],
            long,
        ];
        for row in rows {
            let width = row.len();
            let mut two = vec![9.0f32; width];
            two.extend(&row);
            pair.put(S::LmHead, HostTensor::f32(vec![2, width], two));
            pair.argmax(S::LmHead, "crafted", &format!("V={width}"));
        }
    }
    // Expert projections at T = 300, top-2 of 5 experts (600 slots).
    let (t, top) = (300usize, 2usize);
    let tokens: Vec<u32> = (0..t as u32).map(|x| x % v as u32).collect();
    pair.cpu.begin_step(&tokens, 0).unwrap();
    pair.gpu.begin_step(&tokens, 0).unwrap();
    let ids: Vec<i32> = (0..t).flat_map(|x| [(x * 3 % big_e) as i32, ((x * 3 + 1 + x / 7) % big_e) as i32]).collect();
    let ids: Vec<i32> = ids
        .chunks(top)
        .flat_map(|c| if c[0] == c[1] { [c[0], (c[0] + 1) % big_e as i32] } else { [c[0], c[1]] })
        .collect();
    pair.put(S::MoeRouterIndices, HostTensor::i32(vec![t, top], ids));
    pair.put(S::FfnNorm, HostTensor::f32(vec![t, big_h], random("bignorm", t * big_h, 0.0, 1.0)));
    let dims = format!("T={t} E={big_e} k={top}");
    pair.case("expert_linear", &format!("{dims} [T,{big_h}]->[T,{top},{big_i}]"), 1e-6, &[S::MoeExpertUp], |b| {
        b.expert_linear(S::FfnNorm, S::MoeRouterIndices, &big_ups, S::MoeExpertUp)
    });
    pair.case(
        "expert_linear",
        &format!("{dims} [T,{top},{big_i}]->[T,{top},{big_h}]"),
        1e-6,
        &[S::MoeExpertOut],
        |b| b.expert_linear(S::MoeExpertUp, S::MoeRouterIndices, &big_downs, S::MoeExpertOut),
    );
    pair.finish();
}

#[test]
fn bf16_kernels_round_at_the_store_and_match_the_cpu_backend() {
    if !common::gpu_enabled() {
        return;
    }
    // Widths that take the fast paths: rows of 2048 (RMSNorm over 1024
    // threads), expert sizes for the grouped tensor-core kernel (k % 32,
    // n % 64) at T = 100 (400 slots) and for 16-byte loads at T = 1, where
    // the projections, attention scores and attention take their one-row
    // kernels (101 positions: two splits).
    let (h, v, e, k, i_dim, hd) = (2048usize, 37usize, 16usize, 4usize, 64usize, 64usize);
    let mut store = WeightStore::default();
    let table = weight_bf16(&mut store, "table", vec![v, h], 0.0, 1.0);
    let norm = weight_bf16(&mut store, "norm", vec![h], 1.0, 0.1);
    let qkv = weight_bf16(&mut store, "qkv", vec![(4 + 2 + 2) * hd, h], 0.0, 0.03);
    let (qn, kn) =
        (weight_bf16(&mut store, "qn", vec![hd], 1.0, 0.1), weight_bf16(&mut store, "kn", vec![hd], 1.0, 0.1));
    let router = weight_bf16(&mut store, "router", vec![e, h], 0.0, 0.05);
    let ups: Vec<WeightId> =
        (0..e).map(|x| weight_bf16(&mut store, &format!("up{x}"), vec![i_dim, h], 0.0, 0.03)).collect();
    let downs: Vec<WeightId> =
        (0..e).map(|x| weight_bf16(&mut store, &format!("down{x}"), vec![h, i_dim], 0.0, 0.2)).collect();
    // Many slots per expert (a prefill's shape): several 32-slot tiles each.
    let (big_h, big_i, big_e) = (256usize, 128usize, 5usize);
    let big_ups: Vec<WeightId> =
        (0..big_e).map(|x| weight_bf16(&mut store, &format!("bigup{x}"), vec![big_i, big_h], 0.0, 0.06)).collect();
    let big_downs: Vec<WeightId> =
        (0..big_e).map(|x| weight_bf16(&mut store, &format!("bigdown{x}"), vec![big_h, big_i], 0.0, 0.08)).collect();
    let store = Arc::new(store);
    let experts: [&[WeightId]; 4] = [&ups, &downs, &big_ups, &big_downs];
    let mut gpu =
        CudaBackend::with_weights(store.clone(), &experts, 0, CudaPrecision::Bf16, &Default::default()).unwrap();
    gpu.set_poison(true);
    let mut pair =
        Pair { cpu: CpuBackend::new(store, Some(2)).unwrap(), gpu, rows: Vec::new(), failures: 0, bf16: true };
    let shape = AttentionShape { heads: 4, kv_heads: 2, head_dim: hd };
    // One op on bf16 inputs differs from the f64 reference by the output's
    // rounding (at most 2^-9 relative); a chain of ops by a few of those.
    let (one, chain) = (4e-3, 2e-2);
    for (t, start) in [(100usize, 0usize), (1, 100)] {
        let tokens: Vec<u32> = (0..t as u32).map(|x| (x * 7 + 3) % v as u32).collect();
        pair.cpu.begin_step(&tokens, start).unwrap();
        pair.gpu.begin_step(&tokens, start).unwrap();
        let dims = format!("T={t} pos={start}");
        let x = |name: &str, n| random(&format!("bf{name}{t}"), n, 0.0, 1.0).into_iter().map(bf16).collect::<Vec<_>>();
        pair.case("embedding", &format!("{dims} H={h}"), 0.0, &[S::Embedding], |b| b.embedding(table, S::Embedding));
        pair.case("rms_norm", &format!("{dims} H={h}"), one, &[S::AttnNorm], |b| {
            b.rms_norm(S::Embedding, norm, 1e-6, S::AttnNorm)
        });
        pair.put(S::AttnNorm, HostTensor::f32(vec![t, h], x("norm", t * h)));
        pair.case("linear", &format!("{dims} {h}->{}", 8 * hd), one, &[S::QkvMatmul], |b| {
            b.linear(S::AttnNorm, &[qkv], S::QkvMatmul)
        });
        let args = QkNormArgs { q_heads: 4, kv_heads: 2, head_dim: hd, q_weight: qn, k_weight: kn, eps: 1e-6 };
        pair.case("qk_norm", &format!("{dims} nh=4 nkv=2 hd={hd}"), chain, &[S::QkNorm], |b| {
            b.qk_norm(S::QkvMatmul, args, S::QkNorm)
        });
        pair.case("rope", &format!("{dims} q and k"), chain, &[S::QPostRope, S::KPostRope], |b| {
            b.rope(S::QkNorm, RopeArgs { col_start: 0, heads: 4, head_dim: hd, theta: 1e6 }, S::QPostRope)?;
            b.rope(S::QkNorm, RopeArgs { col_start: 4 * hd, heads: 2, head_dim: hd, theta: 1e6 }, S::KPostRope)
        });
        pair.case(
            "attention",
            &format!("{dims} GQA 4/2"),
            chain,
            &[S::AttnScores, S::AttnSoftmax, S::Attention],
            |b| {
                b.append_kv(0, S::KPostRope, S::QkvMatmul, 6 * hd)?;
                b.attn_scores(0, S::QPostRope, shape, S::AttnScores)?;
                b.attn_softmax(S::AttnScores, S::AttnSoftmax)?;
                b.attention(0, S::AttnSoftmax, shape, S::Attention)
            },
        );
        pair.put(S::FfnGate, HostTensor::f32(vec![t, h], x("gate", t * h)));
        pair.case("add, swiglu", &format!("{dims} H={h}"), one, &[S::PostAttnResidual, S::MoeExpertSwigl], |b| {
            b.add(S::FfnGate, S::AttnNorm, S::PostAttnResidual)?;
            b.swiglu(S::FfnGate, S::AttnNorm, S::MoeExpertSwigl)
        });
        pair.put(S::FfnNorm, HostTensor::f32(vec![t, h], x("ffn", t * h)));
        pair.case(
            "router",
            &format!("{dims} E={e} k={k}"),
            1e-5,
            &[S::MoeRouterLogits, S::MoeRouter, S::MoeRouterIndices],
            |b| {
                b.linear(S::FfnNorm, &[router], S::MoeRouterLogits)?;
                b.router_top_k(S::MoeRouterLogits, k, true, S::MoeRouter, S::MoeRouterIndices)
            },
        );
        pair.case("expert_linear", &format!("{dims} [T,{h}]->[T,{k},{i_dim}]"), one, &[S::MoeExpertUp], |b| {
            b.expert_linear(S::FfnNorm, S::MoeRouterIndices, &ups, S::MoeExpertUp)
        });
        pair.put(S::MoeExpertSwigl, HostTensor::f32(vec![t, k, i_dim], x("act", t * k * i_dim)));
        pair.case("expert_linear", &format!("{dims} [T,{k},{i_dim}]->[T,{k},{h}]"), one, &[S::MoeExpertOut], |b| {
            b.expert_linear(S::MoeExpertSwigl, S::MoeRouterIndices, &downs, S::MoeExpertOut)
        });
        pair.put(S::MoeExpertOut, HostTensor::f32(vec![t, k, h], x("out", t * k * h)));
        pair.case("moe_combine", &format!("{dims} k={k} H={h}"), one, &[S::MoeFfnOut], |b| {
            b.moe_combine(S::MoeExpertOut, S::MoeRouter, None, S::MoeFfnOut)
        });
    }
    // T = 300, top-2 of 5 experts: 600 slots, about 120 per expert.
    let (t, top) = (300usize, 2usize);
    let tokens: Vec<u32> = (0..t as u32).map(|x| x % v as u32).collect();
    pair.cpu.begin_step(&tokens, 0).unwrap();
    pair.gpu.begin_step(&tokens, 0).unwrap();
    let ids: Vec<i32> = (0..t).flat_map(|x| [(x * 3 % big_e) as i32, ((x * 3 + 1) % big_e) as i32]).collect();
    pair.put(S::MoeRouterIndices, HostTensor::i32(vec![t, top], ids));
    let x = |name: &str, n| random(name, n, 0.0, 1.0).into_iter().map(bf16).collect::<Vec<_>>();
    pair.put(S::FfnNorm, HostTensor::f32(vec![t, big_h], x("bfbignorm", t * big_h)));
    let dims = format!("T={t} E={big_e} k={top}");
    let one = 4e-3;
    pair.case("expert_linear", &format!("{dims} [T,{big_h}]->[T,{top},{big_i}]"), one, &[S::MoeExpertUp], |b| {
        b.expert_linear(S::FfnNorm, S::MoeRouterIndices, &big_ups, S::MoeExpertUp)
    });
    pair.put(S::MoeExpertSwigl, HostTensor::f32(vec![t, top, big_i], x("bfbigact", t * top * big_i)));
    pair.case("expert_linear", &format!("{dims} [T,{top},{big_i}]->[T,{top},{big_h}]"), one, &[S::MoeExpertOut], |b| {
        b.expert_linear(S::MoeExpertSwigl, S::MoeRouterIndices, &big_downs, S::MoeExpertOut)
    });
    // An id that is no expert (the CPU refuses it): on the GPU its row is
    // NaN and every other row is still computed.
    let mut ids: Vec<i32> = (0..t).flat_map(|x| [(x * 3 % big_e) as i32, ((x * 3 + 1) % big_e) as i32]).collect();
    ids[7] = -1;
    pair.gpu.write(S::MoeRouterIndices, &HostTensor::i32(vec![t, top], ids)).unwrap();
    pair.gpu.expert_linear(S::FfnNorm, S::MoeRouterIndices, &big_ups, S::MoeExpertUp).unwrap();
    let up = pair.gpu.read(S::MoeExpertUp).unwrap().as_f32().unwrap().to_vec();
    let nan_rows: Vec<usize> =
        (0..t * top).filter(|&r| up[r * big_i..(r + 1) * big_i].iter().any(|v| v.is_nan())).collect();
    let all_nan = up[7 * big_i..8 * big_i].iter().all(|v| v.is_nan());
    let ok = nan_rows == [7] && all_nan;
    pair.failures += usize::from(!ok);
    pair.rows.push(format!(
        "{:<16} {:<20} {:<26} bf16 exact     NaN rows {nan_rows:?} (want [7]){:<8} {}",
        "expert_linear",
        "moe_expert_up",
        "id -1 at slot 7",
        "",
        if ok { "ok" } else { "FAIL" }
    ));
    pair.finish();
}
