//! The device's ggml block decoders (kernels-cuda's quant.cu) against the
//! host's (pipeline::weights::quant), bit for bit: Q8_0, MXFP4, Q4_K, Q5_K
//! and Q6_K on random blocks in awkward counts (33 Q8_0 blocks, 7 K-quant
//! super-blocks), the f16 scales of the first blocks set to a subnormal, a
//! negative value, zero, infinity, a NaN and the largest half, written into
//! the middle of a larger buffer (what is around it untouched), as f32 and
//! as bf16 bits; and block-scaled FP8 kept on the device the same way.
//! GPU only (MOETRACE_GPU=1).
#![cfg(feature = "cuda")]

mod common;

use half::{bf16, f16};
use kernels_cuda::GpuDevice;
use kernels_cuda::quant::{block_layout, dequant_fill};
use kernels_cuda::synthetic::download;
use pipeline::weights::gguf::GgmlType;
use pipeline::weights::quant::dequantize;

fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

#[test]
fn device_block_decoders_match_the_host_bit_for_bit() {
    if !common::gpu_enabled() {
        return;
    }
    let device = GpuDevice::open(0).unwrap();
    let specials: [u16; 6] = [0x0001, 0xb800, 0x0000, 0x7c00, 0x7e01, 0x7bff];
    for (kind, blocks, scale_at) in [
        (GgmlType::Q8_0, 33, 0),
        (GgmlType::MXFP4, 33, usize::MAX),
        (GgmlType::Q4_K, 7, 0),
        (GgmlType::Q5_K, 7, 0),
        (GgmlType::Q6_K, 7, 208),
    ] {
        let (len, size) = block_layout(kind.0).unwrap();
        let mut bytes = random_bytes(blocks * size, u64::from(kind.0));
        // Ordinary scales elsewhere: a random f16 can be anything.
        for (b, block) in bytes.chunks_mut(size).enumerate() {
            if kind == GgmlType::MXFP4 {
                // e8m0 exponents: the two subnormal ones, 2^-1, the two
                // largest (the last overflows f32 for codes 6 and 12),
                // then ordinary ones.
                block[0] = [0u8, 1, 127, 254, 255].get(b).copied().unwrap_or(100 + (b % 40) as u8);
                continue;
            }
            let scale = specials.get(b).copied().unwrap_or(f16::from_f32(0.01 + b as f32 * 1e-3).to_bits());
            block[scale_at..scale_at + 2].copy_from_slice(&scale.to_le_bytes());
            if kind == GgmlType::Q4_K || kind == GgmlType::Q5_K {
                block[2..4].copy_from_slice(&f16::from_f32(0.003).to_bits().to_le_bytes());
            }
        }
        let n = blocks * len;
        let mut host = vec![0.0f32; n];
        dequantize(kind, &bytes, &mut host).unwrap();
        let (offset, total) = (5, n + 9);
        let mut out = device.stream().alloc_zeros::<f32>(total).unwrap();
        dequant_fill(&device, &mut out, offset, n, kind.0, &bytes).unwrap();
        let got = download(&device, &out).unwrap();
        assert!(got[..offset].iter().chain(&got[offset + n..]).all(|&v| v == 0.0), "{}: outside", kind.name());
        let mut nans = 0;
        for (i, (h, g)) in host.iter().zip(&got[offset..offset + n]).enumerate() {
            if h.is_nan() {
                assert!(g.is_nan(), "{} value {i}: host NaN, device {g}", kind.name());
                nans += 1;
            } else {
                assert_eq!(h.to_bits(), g.to_bits(), "{} value {i}: host {h}, device {g}", kind.name());
            }
        }
        let mut out16 = device.stream().alloc_zeros::<u16>(n).unwrap();
        dequant_fill(&device, &mut out16, 0, n, kind.0, &bytes).unwrap();
        let got16 = download(&device, &out16).unwrap();
        for (i, (h, g)) in host.iter().zip(&got16).enumerate() {
            let want = bf16::from_f32(*h);
            let ok = if h.is_nan() { bf16::from_bits(*g).is_nan() } else { want.to_bits() == *g };
            assert!(ok, "{} bf16 value {i}: host {h}, device bits {g:#06x}", kind.name());
        }
        eprintln!(
            "{}: {n} values ({blocks} blocks) identical, {nans} NaN from the NaN and infinite scales",
            kind.name()
        );
    }
    // Bad requests are errors, not launches.
    let mut out = device.stream().alloc_zeros::<f32>(64).unwrap();
    let err = dequant_fill(&device, &mut out, 0, 64, 2, &[0u8; 36]).unwrap_err().to_string();
    assert!(err.contains("ggml type 2"), "{err}");
    let err = dequant_fill(&device, &mut out, 0, 64, 8, &[0u8; 35]).unwrap_err().to_string();
    assert!(err.contains("35 bytes"), "{err}");
    let err = dequant_fill(&device, &mut out, 40, 32, 8, &[0u8; 34]).unwrap_err().to_string();
    assert!(err.contains("do not fit"), "{err}");
}

/// Synthetic blocks made on the device (the `-q4km` presets' weights) are
/// the host's bytes, for each block format, written at an offset into a
/// larger buffer; and the tiny quantized preset, its weights made and kept
/// quantized on the device, runs as on the CPU (F32: the same tokens,
/// logits within 1e-5).
#[test]
fn synthetic_blocks_made_on_the_device_are_the_hosts_and_the_q4km_preset_runs_as_on_the_cpu() {
    use kernels_cuda::synthetic::{ScaleFields, synthetic_blocks_fill};
    use pipeline::backend::cuda::CudaPrecision;
    use pipeline::weights::BlockRecipe;
    use pipeline::{CpuBackend, CudaBackend, Forward, Model};
    if !common::gpu_enabled() {
        return;
    }
    let device = GpuDevice::open(0).unwrap();
    for kind in [GgmlType::Q8_0, GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K] {
        let recipe = BlockRecipe::new(0x1234_5678_9abc_def0, kind, 0.03);
        let (d_at, dmin_at) = recipe.scale_fields();
        let fields = ScaleFields { d_at: d_at as u32, dmin_at: dmin_at.map(|at| at as u32) };
        let (len, size) = block_layout(kind.0).unwrap();
        let host = recipe.blocks(7 * len);
        let mut out = device.stream().clone_htod(&vec![0xa5u8; host.len() + 2 * size]).unwrap();
        synthetic_blocks_fill(&device, &mut out, size, (7, size), recipe.key, fields, (recipe.d, recipe.dmin)).unwrap();
        let got = download(&device, &out).unwrap();
        assert!(got[..size].iter().chain(&got[size + host.len()..]).all(|&b| b == 0xa5), "{kind:?}: outside written");
        assert_eq!(&got[size..size + host.len()], &host[..], "{kind:?}");
    }
    let prompt: Vec<u32> = (0..40).map(|i| (i * 37 + 5) % 512).collect();
    let run = |model: &Model, backend: Box<dyn pipeline::Backend>| {
        let mut forward = Forward::new(model, backend);
        let generated = forward.generate(&prompt, 6, &mut |_| {}).unwrap().generated;
        let logits = forward.backend_mut().read(stage_types::SaveTensorStage::LmHead).unwrap();
        (generated, logits.as_f32().unwrap().to_vec())
    };
    let cpu_model = Model::synthetic("tiny-moe-q4km", 5, None).unwrap();
    let cpu = run(&cpu_model, Box::new(CpuBackend::new(cpu_model.store.clone(), Some(2)).unwrap()));
    let gpu_model = Model::synthetic_on_demand("tiny-moe-q4km", 5, None).unwrap();
    let backend = CudaBackend::new(&gpu_model, 0, CudaPrecision::F32).unwrap();
    let bytes = backend.weight_bytes();
    let gpu = run(&gpu_model, Box::new(backend));
    assert_eq!(cpu.1.len(), gpu.1.len(), "logits");
    let e = rel_l2(&cpu.1, &gpu.1);
    eprintln!("tiny-moe-q4km: {bytes} weight bytes on the device; logits rel_l2 {e:.2e}; tokens {:?}", gpu.0);
    assert!(e <= 1e-5, "logits rel_l2 {e:.3e}");
    assert_eq!(gpu.0, cpu.0, "greedy tokens");
}

/// rel_l2 of `b` against `a`.
fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let (num, den) = a.iter().zip(b).fold((0.0f64, 0.0f64), |(n, d), (&x, &y)| {
        (n + (f64::from(x) - f64::from(y)).powi(2), d + f64::from(x).powi(2))
    });
    if num == 0.0 { 0.0 } else { (num / den).sqrt() }
}

/// Compares `slots` of the CPU and the GPU backend (rel_l2 within
/// `tolerance`; in Bf16 mode every GPU value a bf16 value), printing a
/// line per slot and pushing the failed ones, labelled, to `failures`.
fn compare_slots(
    cpu: &mut pipeline::CpuBackend,
    gpu: &mut pipeline::CudaBackend,
    slots: &[stage_types::SaveTensorStage],
    bf16_mode: bool,
    tolerance: f64,
    label: &str,
    failures: &mut Vec<String>,
) {
    use pipeline::backend::Backend;
    let bf16 = |x: f32| half::bf16::from_f32(x).to_f32();
    for &slot in slots {
        let (a, g) = (cpu.read(slot).unwrap(), gpu.read(slot).unwrap());
        let (a, g) = (a.as_f32().unwrap().to_vec(), g.as_f32().unwrap().to_vec());
        let err = rel_l2(&a, &g);
        let unrounded = if bf16_mode { g.iter().filter(|&&q| q != bf16(q)).count() } else { 0 };
        let ok = err <= tolerance && unrounded == 0 && a.len() == g.len();
        println!(
            "{label} {slot:<16} rel_l2 {err:.2e} (tol {tolerance:.0e}) {unrounded} not bf16 {}",
            if ok { "ok" } else { "FAIL" }
        );
        if !ok {
            failures.push(format!("{label} {slot}"));
        }
    }
}

/// The projections over quantized weights in the manner of gpu_parity's
/// table: every block type as a dense weight of awkward row counts (37, 7,
/// 5, 3 rows of k = 512: two super-blocks, in one linear call; at T = 3
/// the first three in one launch), every block type as experts (5, top-2:
/// Q5_K gate and Q4_K up [256, 512], sharing a launch at T = 3; Q6_K down
/// and Q8_0 [512, 256]), and a Q4_K embedding, at T = 3 (the decode
/// kernels read the blocks) and T = 40 (dense weights decoded into the
/// scratch for cuBLAS; experts in Bf16 through the grouped kernel, which
/// decodes inside its tiles), F32 and Bf16, the GPU's outputs poisoned,
/// against the CPU backend on the same blocks. Bf16 multiplies by the
/// weights rounded to bf16, so it is looser; its outputs must hold bf16
/// values.
#[test]
fn quantized_projections_match_the_cpu_backend_on_awkward_sizes() {
    use std::sync::Arc;

    use pipeline::backend::Backend;
    use pipeline::backend::cuda::CudaPrecision;
    use pipeline::weights::{BlockRecipe, WeightDtype, WeightId, WeightStore, WeightTensor, tensor_key};
    use pipeline::{CpuBackend, CudaBackend, HostTensor};
    use stage_types::SaveTensorStage as S;
    if !common::gpu_enabled() {
        return;
    }
    let (k, v, e, top, i_dim) = (512usize, 37usize, 5usize, 2usize, 256usize);
    let mut store = WeightStore::default();
    let mut quant = |name: &str, kind: GgmlType, shape: Vec<usize>| -> WeightId {
        let n: usize = shape.iter().product();
        let blocks = BlockRecipe::new(tensor_key(21, name), kind, 0.05).blocks(n);
        store.insert(WeightTensor::owned(name.into(), WeightDtype::Quant(kind), shape, blocks))
    };
    let dense = [
        quant("q4", GgmlType::Q4_K, vec![37, k]),
        quant("q6", GgmlType::Q6_K, vec![7, k]),
        quant("q5", GgmlType::Q5_K, vec![5, k]),
        quant("q8", GgmlType::Q8_0, vec![3, k]),
    ];
    let table = quant("table", GgmlType::Q4_K, vec![v, k]);
    // Every block type as experts too: gate (Q5_K) and up (Q4_K) share a
    // launch in a decode step (two block types in one launch), down in
    // Q6_K and a fourth projection in Q8_0.
    let mut experts_of = |name: &str, kind: GgmlType, shape: [usize; 2]| -> Vec<WeightId> {
        (0..e).map(|x| quant(&format!("{name}{x}"), kind, shape.to_vec())).collect()
    };
    let gates = experts_of("gate", GgmlType::Q5_K, [i_dim, k]);
    let ups = experts_of("up", GgmlType::Q4_K, [i_dim, k]);
    let downs = experts_of("down", GgmlType::Q6_K, [k, i_dim]);
    let q8s = experts_of("q8", GgmlType::Q8_0, [k, i_dim]);
    let store = Arc::new(store);
    let bf16 = |x: f32| half::bf16::from_f32(x).to_f32();
    let mut failures = Vec::new();
    for (precision, tolerance) in [(CudaPrecision::F32, 1e-6), (CudaPrecision::Bf16, 1e-2)] {
        let experts: [&[WeightId]; 4] = [&gates, &ups, &downs, &q8s];
        let mut gpu = CudaBackend::with_weights(store.clone(), &experts, 0, precision, &Default::default()).unwrap();
        gpu.set_poison(true);
        let mut cpu = CpuBackend::new(store.clone(), Some(2)).unwrap();
        for t in [3usize, 40] {
            let tokens: Vec<u32> = (0..t as u32).map(|x| (x * 11 + 2) % v as u32).collect();
            let x: Vec<f32> =
                random_bytes(t * k, t as u64).iter().map(|&b| bf16((f32::from(b) - 127.5) / 64.0)).collect();
            let ids: Vec<i32> = (0..t).flat_map(|r| [(r % e) as i32, ((r * 3 + 1) % e) as i32]).collect();
            let ids: Vec<i32> = ids
                .chunks(top)
                .flat_map(|c| if c[0] == c[1] { [c[0], (c[0] + 1) % e as i32] } else { [c[0], c[1]] })
                .collect();
            for b in [&mut cpu as &mut dyn Backend, &mut gpu] {
                b.begin_step(&tokens, 0).unwrap();
                b.write(S::AttnNorm, &HostTensor::f32(vec![t, k], x.clone())).unwrap();
                b.write(S::MoeRouterIndices, &HostTensor::i32(vec![t, top], ids.clone())).unwrap();
                b.embedding(table, S::Embedding).unwrap();
                b.linear(S::AttnNorm, &dense, S::QkvMatmul).unwrap();
                b.expert_linear(S::AttnNorm, S::MoeRouterIndices, &gates, S::MoeExpertGate).unwrap();
                b.expert_linear(S::AttnNorm, S::MoeRouterIndices, &ups, S::MoeExpertUp).unwrap();
                b.expert_linear(S::MoeExpertUp, S::MoeRouterIndices, &downs, S::MoeExpertOut).unwrap();
                b.expert_linear(S::MoeExpertGate, S::MoeRouterIndices, &q8s, S::MoeExpertSwigl).unwrap();
            }
            let slots =
                [S::Embedding, S::QkvMatmul, S::MoeExpertGate, S::MoeExpertUp, S::MoeExpertOut, S::MoeExpertSwigl];
            let label = format!("{precision:?} T={t}");
            compare_slots(
                &mut cpu,
                &mut gpu,
                &slots,
                precision == CudaPrecision::Bf16,
                tolerance,
                &label,
                &mut failures,
            );
        }
    }
    assert!(failures.is_empty(), "{failures:?}");
}

/// An FP8 tensor as DeepSeek-V3 ships one: `rows x cols` e4m3 bytes with
/// one scale per 128 x 128 block, rows ending in a partial block. NaN
/// bytes (S.1111.111) kept when `nans`, else replaced by the largest value.
fn fp8_tensor(name: &str, seed: u64, rows: usize, cols: usize, nans: bool) -> pipeline::weights::WeightTensor {
    use pipeline::weights::fp8::BlockScales;
    use pipeline::weights::{WeightDtype, WeightTensor};
    let mut bytes = random_bytes(rows * cols, seed);
    if !nans {
        bytes.iter_mut().filter(|b| **b & 0x7f == 0x7f).for_each(|b| *b -= 1);
    }
    let (br, bc) = (rows.div_ceil(128), cols.div_ceil(128));
    // Scales from 1e-8 (flashinfer #2356's range) to 1e-2, one per block.
    let values =
        (0..br * bc).map(|i| 10f32.powi(-8 + ((i as u64 + seed) % 7) as i32) * (1.0 + i as f32 / 10.0)).collect();
    let scales = BlockScales { block: (128, 128), cols: bc, values };
    WeightTensor::owned(name.into(), WeightDtype::Fp8E4m3, vec![rows, cols], bytes)
        .with_block_scales(std::sync::Arc::new(scales))
}

/// Block-scaled FP8 stays FP8 on the device (rows of FP8_B128 blocks, each
/// with its block's f32 scale): decoded there bit for bit as the host
/// decodes it (f32(q) * scale; NaN bytes NaN; rows 200 = 1.56 blocks), and
/// its projections (a dense weight, experts through the decode kernels at
/// T = 3 and the dequantised / grouped paths at T = 40) against the CPU
/// backend, F32 and Bf16; the weights take their FP8 bytes (plus 4 a row
/// block), not bf16's.
#[test]
fn fp8_weights_stay_fp8_on_the_device_and_project_as_on_the_cpu() {
    use std::sync::Arc;

    use kernels_cuda::quant::FP8_B128;
    use pipeline::backend::Backend;
    use pipeline::backend::cuda::CudaPrecision;
    use pipeline::weights::{WeightId, WeightStore, fp8};
    use pipeline::{CpuBackend, CudaBackend, HostTensor};
    use stage_types::SaveTensorStage as S;
    if !common::gpu_enabled() {
        return;
    }
    let device = GpuDevice::open(0).unwrap();
    let t = fp8_tensor("decode", 1, 200, 256, true);
    let host = t.to_f32_vec();
    let n = host.len();
    let mut out = device.stream().alloc_zeros::<f32>(n).unwrap();
    dequant_fill(&device, &mut out, 0, n, FP8_B128, &fp8::as_row_blocks(&t)).unwrap();
    let got = download(&device, &out).unwrap();
    let nans = host.iter().filter(|h| h.is_nan()).count();
    for (i, (h, g)) in host.iter().zip(&got).enumerate() {
        assert!(h.to_bits() == g.to_bits() || (h.is_nan() && g.is_nan()), "value {i}: host {h}, device {g}");
    }
    eprintln!("FP8_B128: {n} values identical ({nans} NaN bytes)");

    let (k, e, top) = (256usize, 4usize, 2usize);
    let mut store = WeightStore::default();
    let dense = store.insert(fp8_tensor("dense", 2, 200, k, false));
    // Experts of 192 rows (1.5 blocks), each its own bytes and scales.
    let ups: Vec<WeightId> =
        (0..e).map(|x| store.insert(fp8_tensor(&format!("up{x}"), 3 + x as u64, 192, k, false))).collect();
    let bytes_kept: usize = [dense].iter().chain(&ups).map(|&id| fp8::row_block_bytes(store.get(id))).sum();
    let store = Arc::new(store);
    let bf16 = |x: f32| half::bf16::from_f32(x).to_f32();
    let mut failures = Vec::new();
    for (precision, tolerance) in [(CudaPrecision::F32, 1e-6), (CudaPrecision::Bf16, 1e-2)] {
        let experts: [&[WeightId]; 1] = [&ups];
        let mut gpu = CudaBackend::with_weights(store.clone(), &experts, 0, precision, &Default::default()).unwrap();
        gpu.set_poison(true);
        if gpu.weight_bytes() > bytes_kept + (1 << 20) {
            failures.push(format!(
                "{precision:?}: {} bytes on the device, the FP8 blocks are {bytes_kept}",
                gpu.weight_bytes()
            ));
        }
        let mut cpu = CpuBackend::new(store.clone(), Some(2)).unwrap();
        for t in [3usize, 40] {
            let tokens: Vec<u32> = (0..t as u32).collect();
            let x: Vec<f32> =
                random_bytes(t * k, t as u64 + 9).iter().map(|&b| bf16((f32::from(b) - 127.5) / 64.0)).collect();
            let ids: Vec<i32> = (0..t).flat_map(|r| [(r % e) as i32, ((r + 1) % e) as i32]).collect();
            for b in [&mut cpu as &mut dyn Backend, &mut gpu] {
                b.begin_step(&tokens, 0).unwrap();
                b.write(S::AttnNorm, &HostTensor::f32(vec![t, k], x.clone())).unwrap();
                b.write(S::MoeRouterIndices, &HostTensor::i32(vec![t, top], ids.clone())).unwrap();
                b.linear(S::AttnNorm, &[dense], S::QkvMatmul).unwrap();
                b.expert_linear(S::AttnNorm, S::MoeRouterIndices, &ups, S::MoeExpertUp).unwrap();
            }
            let label = format!("FP8 {precision:?} T={t}");
            let slots = [S::QkvMatmul, S::MoeExpertUp];
            compare_slots(
                &mut cpu,
                &mut gpu,
                &slots,
                precision == CudaPrecision::Bf16,
                tolerance,
                &label,
                &mut failures,
            );
        }
    }
    assert!(failures.is_empty(), "{failures:?}");
}
