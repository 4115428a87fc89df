//! CPU forward benchmark (not a test): tokens/s on the tiny presets and ms
//! per layer at Qwen3-30B-A3B dimensions, against this machine's memory
//! bandwidth as the floor.
//!
//! `cargo bench -p pipeline --bench cpu_forward` (add `-- --quick` for one
//! repetition). Results go in BENCHMARKS.md with the machine and date.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pipeline::{CpuBackend, Forward, ForwardEvent, HookCtx, Model};
use stage_types::SaveTensorStage;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Bytes per second of a large memcpy, counting bytes read plus written.
fn memory_bandwidth() -> f64 {
    let n = 512 << 20;
    let src = vec![1u8; n];
    let mut dst = vec![0u8; n];
    let times: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            dst.copy_from_slice(&src);
            std::hint::black_box(&dst);
            t.elapsed().as_secs_f64()
        })
        .collect();
    2.0 * n as f64 / median(times)
}

fn prompt(n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 37 + 11) % 500).collect()
}

/// (prefill tokens/s for 16 tokens, decode tokens/s over 16 steps).
fn tiny(preset: &str, reps: usize) -> (f64, f64) {
    let model = Model::synthetic(preset, 7, None).unwrap();
    let mut prefill = Vec::new();
    let mut decode = Vec::new();
    for _ in 0..reps {
        let backend = CpuBackend::new(model.store.clone(), None).unwrap();
        let mut forward = Forward::new(&model, Box::new(backend));
        let mut step_start = Instant::now();
        let mut step_times = Vec::new();
        forward
            .generate(&prompt(16), 17, &mut |e| match e {
                ForwardEvent::StepStarted { .. } => step_start = Instant::now(),
                ForwardEvent::StepDone { .. } => step_times.push(step_start.elapsed()),
                _ => {}
            })
            .unwrap();
        prefill.push(16.0 / step_times[0].as_secs_f64());
        let decode_time: Duration = step_times[1..].iter().sum();
        decode.push((step_times.len() - 1) as f64 / decode_time.as_secs_f64());
    }
    (median(prefill), median(decode))
}

/// Per-layer ms at qwen3-30b-a3b dimensions for a 16-token prompt and for
/// one decode step, with the bytes of weights each layer touched.
fn qwen3_30b(layers: usize, bandwidth: f64) {
    let t = Instant::now();
    let model = Model::synthetic("qwen3-30b-a3b", 7, Some(layers)).unwrap();
    println!(
        "qwen3-30b-a3b cut to {layers} layers: {:.2} GB of bf16 weights generated in {:.1} s",
        model.store.total_bytes() as f64 / 1e9,
        t.elapsed().as_secs_f64()
    );
    let c = model.config.clone();
    let backend = CpuBackend::new(model.store.clone(), None).unwrap();
    let threads = backend.threads();
    let mut forward = Forward::new(&model, Box::new(backend));
    let distinct: Arc<Mutex<Vec<usize>>> = Arc::default();
    let sink = distinct.clone();
    forward.add_observer(SaveTensorStage::MoeRouterIndices, move |mut ctx: HookCtx| {
        let ids = ctx.read(SaveTensorStage::MoeRouterIndices).unwrap();
        let mut ids = ids.as_i32().unwrap().to_vec();
        ids.sort_unstable();
        ids.dedup();
        sink.lock().unwrap().push(ids.len());
    });
    let attention_bytes =
        2 * c.hidden_size * (c.q_width() + 2 * c.kv_width() + c.q_width()) + 2 * c.num_experts * c.hidden_size;
    let expert_bytes = 2 * 3 * c.hidden_size * c.moe_intermediate_size;
    for (label, tokens, start) in [("prefill 16 tokens", prompt(16), 0usize), ("decode 1 token", vec![42u32], 16)] {
        let mut samples = Vec::new();
        let mut experts = Vec::new();
        for _ in 0..3 {
            if start > 0 {
                forward.step(0, &prompt(16), 0, &mut |_| {}).unwrap();
            }
            distinct.lock().unwrap().clear();
            let mut marks = Vec::new();
            forward
                .step(0, &tokens, start, &mut |e| {
                    if matches!(e, ForwardEvent::StepStarted { .. } | ForwardEvent::LayerDone { .. }) {
                        marks.push(Instant::now());
                    }
                })
                .unwrap();
            let total: f64 = marks.windows(2).map(|w| (w[1] - w[0]).as_secs_f64() * 1e3).sum();
            samples.push(total / (marks.len() - 1) as f64);
            experts = distinct.lock().unwrap().clone();
        }
        let mean_experts = experts.iter().sum::<usize>() as f64 / experts.len() as f64;
        let bytes = attention_bytes as f64 + mean_experts * expert_bytes as f64;
        let floor_ms = bytes / bandwidth * 1e3;
        let ms = median(samples.clone());
        let spread = samples.iter().cloned().fold(f64::NEG_INFINITY, f64::max)
            - samples.iter().cloned().fold(f64::INFINITY, f64::min);
        println!(
            "| qwen3-30b-a3b | {label} | {ms:.1} ms/layer (spread {spread:.1}) | {mean_experts:.0} experts/layer, {:.0} MB of weights | floor {floor_ms:.1} ms | {:.1}x floor | {threads} threads |",
            bytes / 1e6,
            ms / floor_ms
        );
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let reps = if quick { 1 } else { 5 };
    let bandwidth = memory_bandwidth();
    println!("memcpy bandwidth (read + write): {:.1} GB/s", bandwidth / 1e9);
    println!("| model | prefill 16 tokens | decode (16 steps) |");
    println!("|---|---|---|");
    for preset in ["tiny-moe", "tiny-dense"] {
        let (prefill, decode) = tiny(preset, reps);
        println!("| {preset} | {prefill:.0} tokens/s | {decode:.0} tokens/s |");
    }
    qwen3_30b(2, bandwidth);
}
