//! GPU forward benchmark (not a test; needs the `cuda` feature and a GPU):
//! the CUDA backend on the synthetic Qwen3-30B-A3B, prefill time and decode
//! tokens/s, against the device's memory bandwidth as the floor. Built by
//! scripts/gpu-build.sh, run by scripts/gpu-run.sh with MOETRACE_BENCH=1;
//! results in BENCHMARKS.md.
//!
//! Environment: MOETRACE_BENCH_LAYERS (default 2), MOETRACE_BENCH_PRECISION
//! (f32 or bf16, default f32), MOETRACE_BENCH_PROMPT (tokens, default 16).

#[cfg(feature = "cuda")]
fn main() {
    use std::time::Instant;

    use pipeline::backend::cuda::CudaPrecision;
    use pipeline::{CudaBackend, Forward, Model};

    let env = |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.to_string());
    let layers: usize = env("MOETRACE_BENCH_LAYERS", "2").parse().expect("MOETRACE_BENCH_LAYERS");
    let prompt_len: usize = env("MOETRACE_BENCH_PROMPT", "16").parse().expect("MOETRACE_BENCH_PROMPT");
    let (precision, bytes_per_weight) = match env("MOETRACE_BENCH_PRECISION", "f32").as_str() {
        "bf16" => (CudaPrecision::Bf16, 2usize),
        _ => (CudaPrecision::F32, 4usize),
    };
    // Weights generated on the device: nothing is materialised on the host.
    let model = Model::synthetic_on_demand("qwen3-30b-a3b", 7, Some(layers)).unwrap();
    let t = Instant::now();
    let backend = CudaBackend::new(&model, 0, precision).unwrap();
    println!(
        "{}: qwen3-30b-a3b, {layers} layers, {:.1} GB of weights generated on the device as {precision:?} in {:.1} s",
        backend.device_name(),
        (model.store.tensors().iter().map(|t| t.numel()).sum::<usize>() * bytes_per_weight) as f64 / 1e9,
        t.elapsed().as_secs_f64()
    );
    let mut forward = Forward::new(&model, Box::new(backend));
    let prompt: Vec<u32> = (0..prompt_len as u32).map(|i| (i * 7919 + 13) % 151_936).collect();
    let c = &model.config;
    // Bytes of weights a decode token reads: attention + router per layer,
    // 8 experts per layer, the lm_head row block and the final norm.
    let per_layer = c.hidden_size * (2 * c.q_width() + 2 * c.kv_width()) + c.num_experts * c.hidden_size;
    let experts = c.experts_per_token * 3 * c.hidden_size * c.moe_intermediate_size;
    let decode_bytes = (layers * (per_layer + experts) + c.vocab_size * c.hidden_size) * bytes_per_weight;
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut prefill = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        forward.step(0, &prompt, 0, &mut |_| {}).unwrap();
        forward.next_token().unwrap(); // synchronises
        prefill.push(t.elapsed().as_secs_f64());
    }
    let prefill = median(prefill);
    println!("| prefill {prompt_len} tokens | {:.1} ms | {:.0} tokens/s |", prefill * 1e3, prompt_len as f64 / prefill);
    let mut decode = Vec::new();
    let mut token = forward.next_token().unwrap();
    for i in 0..16 {
        let t = Instant::now();
        forward.step(1 + i, &[token], prompt_len + i, &mut |_| {}).unwrap();
        token = forward.next_token().unwrap();
        decode.push(t.elapsed().as_secs_f64());
    }
    let decode = median(decode);
    // The decode projections one at a time (T = 1, median of 50 calls
    // each, synchronised by a read), against the bytes of weights each reads.
    use stage_types::SaveTensorStage as S;
    let l0 = &model.layers[0];
    let router = match &l0.mlp {
        pipeline::model::MlpWeights::Moe(m) => vec![m.router],
        pipeline::model::MlpWeights::Dense { gate, .. } => vec![*gate],
    };
    let projections = [
        ("q,k,v", S::AttnNorm, l0.attention.qkv.expect("q/k/v projections").to_vec(), S::QkvMatmul),
        ("o_proj", S::Attention, vec![l0.attention.o_proj], S::AttnOut),
        ("router", S::FfnNorm, router, S::MoeRouterLogits),
        ("lm_head", S::FinalNorm, vec![model.lm_head], S::LmHead),
    ];
    for (name, input, weights, out) in projections {
        let backend = forward.backend_mut();
        let bytes: usize = weights.iter().map(|&w| model.store.get(w).numel() * bytes_per_weight).sum();
        let mut times = Vec::new();
        for _ in 0..50 {
            let t = Instant::now();
            backend.linear(input, &weights, out).unwrap();
            backend.argmax_last_row(out).unwrap(); // synchronises
            times.push(t.elapsed().as_secs_f64());
        }
        let m = median(times);
        println!(
            "| decode projection {name} | {:.1} us (incl. a sync and a read) | {:.2} GB/s effective | floor {:.1} us |",
            m * 1e6,
            bytes as f64 / m / 1e9,
            bytes as f64 / 3.0e12 * 1e6
        );
    }
    println!(
        "| decode (median of 16 steps) | {:.2} ms/token | {:.1} tokens/s | floor {:.2} ms ({:.2} GB of weights at 3.0 TB/s) |",
        decode * 1e3,
        1.0 / decode,
        decode_bytes as f64 / 3.0e12 * 1e3,
        decode_bytes as f64 / 1e9
    );
}

#[cfg(not(feature = "cuda"))]
fn main() {
    eprintln!("gpu_forward needs the `cuda` feature: cargo bench -p pipeline --features cuda --bench gpu_forward");
}
