//! GPU test: the device's synthetic weight generator (kernels-cuda,
//! synthetic.cu) matches the host generator bit for bit, as bf16 bits and
//! widened to f32, at an offset inside a larger buffer (how stacked experts
//! are filled). Runs only on the GPU machine (MOETRACE_GPU=1, see
//! scripts/gpu-run.sh); elsewhere it says plainly that it checked nothing.
#![cfg(feature = "cuda")]

mod common;

use kernels_cuda::GpuDevice;
use kernels_cuda::synthetic::{download, synthetic_fill, synthetic_fill_bf16};
use pipeline::weights::{synthetic_value, tensor_key};

#[test]
fn gpu_synthetic_weights_match_the_host_generator_bit_for_bit() {
    if !common::gpu_enabled() {
        return;
    }
    let device = GpuDevice::open(0).expect("open GPU 0");
    eprintln!("device: {} ({})", device.name(), device.arch());
    for (name, n, mean, std) in [
        ("model.layers.0.self_attn.q_proj.weight", 1_000_003usize, 0.0f32, 0.0442f32),
        ("model.layers.3.input_layernorm.weight", 37, 1.0, 0.1),
        ("model.embed_tokens.weight", 4_194_305, 0.0, 0.05),
    ] {
        let key = tensor_key(7, name);
        let host: Vec<u16> =
            (0..n).map(|i| half::bf16::from_f32(synthetic_value(key, i as u64, mean, std)).to_bits()).collect();
        let gpu = download(&device, &synthetic_fill_bf16(&device, n, key, mean, std).unwrap()).unwrap();
        let mismatches = (0..n).filter(|&i| gpu[i] != host[i]).count();
        assert_eq!(mismatches, 0, "{name}: {mismatches} of {n} bf16 values differ");

        let offset = 13;
        let mut wide = device.stream().alloc_zeros::<f32>(n + 2 * offset).unwrap();
        synthetic_fill(&device, &mut wide, offset, n, key, (mean, std)).unwrap();
        let wide = download(&device, &wide).unwrap();
        let mismatches = (0..n).filter(|&i| wide[offset + i].to_bits() != (host[i] as u32) << 16).count();
        assert_eq!(mismatches, 0, "{name}: {mismatches} of {n} f32 values differ");
        assert!(wide[..offset].iter().chain(&wide[offset + n..]).all(|&v| v == 0.0), "{name}: wrote outside");
    }
}
