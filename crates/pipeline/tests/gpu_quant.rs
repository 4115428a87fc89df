//! The device's ggml block decoders (kernels-cuda's quant.cu) against the
//! host's (pipeline::weights::quant), bit for bit: Q8_0, Q4_K, Q5_K and
//! Q6_K on random blocks in awkward counts (33 Q8_0 blocks, 7 K-quant
//! super-blocks), the f16 scales of the first blocks set to a subnormal, a
//! negative value, zero, infinity, a NaN and the largest half, written into
//! the middle of a larger buffer (what is around it untouched), as f32 and
//! as bf16 bits. GPU only (MOETRACE_GPU=1).
#![cfg(feature = "cuda")]

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
    if std::env::var_os("MOETRACE_GPU").is_none() {
        eprintln!("SKIPPED (GPU test): set MOETRACE_GPU=1 on a machine with an NVIDIA GPU; this test checked nothing");
        return;
    }
    let device = GpuDevice::open(0).unwrap();
    let specials: [u16; 6] = [0x0001, 0xb800, 0x0000, 0x7c00, 0x7e01, 0x7bff];
    for (kind, blocks, scale_at) in
        [(GgmlType::Q8_0, 33, 0), (GgmlType::Q4_K, 7, 0), (GgmlType::Q5_K, 7, 0), (GgmlType::Q6_K, 7, 208)]
    {
        let (len, size) = block_layout(kind.0).unwrap();
        let mut bytes = random_bytes(blocks * size, u64::from(kind.0));
        // Ordinary scales elsewhere: a random f16 can be anything.
        for (b, block) in bytes.chunks_mut(size).enumerate() {
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
