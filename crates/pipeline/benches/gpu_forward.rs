//! GPU forward benchmark (not a test; needs the `cuda` feature and a GPU):
//! ms per layer of the CUDA backend at Qwen3-30B-A3B dimensions (synthetic,
//! cut to 2 layers) for a 16-token prefill and a decode step, against the
//! device's memory bandwidth as the floor. Built by scripts/gpu-build.sh,
//! run by scripts/gpu-run.sh; results in BENCHMARKS.md.

#[cfg(feature = "cuda")]
fn main() {
    use std::time::Instant;

    use pipeline::{CudaBackend, Forward, Model};

    let t = Instant::now();
    let model = Model::synthetic("qwen3-30b-a3b", 7, Some(2)).unwrap();
    println!("model generated in {:.1} s", t.elapsed().as_secs_f64());
    let t = Instant::now();
    let backend = CudaBackend::new(model.store.clone(), 0).unwrap();
    println!("{}: weights uploaded as f32 in {:.1} s", backend.device_name(), t.elapsed().as_secs_f64());
    let mut forward = Forward::new(&model, Box::new(backend));
    let prompt: Vec<u32> = (0..16u32).map(|i| (i * 7919) % 151_936).collect();
    let c = &model.config;
    let attention =
        4 * c.hidden_size * (c.q_width() + 2 * c.kv_width() + c.q_width()) + 4 * c.num_experts * c.hidden_size;
    let expert = 4 * 3 * c.hidden_size * c.moe_intermediate_size;
    for (label, tokens, start, experts) in
        [("prefill 16 tokens", prompt.clone(), 0usize, 64usize), ("decode 1 token", vec![42], 16, 8)]
    {
        let mut samples = Vec::new();
        for _ in 0..5 {
            if start > 0 {
                forward.step(0, &prompt, 0, &mut |_| {}).unwrap();
                forward.next_token().unwrap();
            }
            let t = Instant::now();
            forward.step(1, &tokens, start, &mut |_| {}).unwrap();
            forward.next_token().unwrap(); // synchronises
            samples.push(t.elapsed().as_secs_f64() * 1e3);
        }
        samples.sort_by(f64::total_cmp);
        let ms = samples[2];
        let floor = (attention + experts * expert) as f64 / 3.0e12 * 1e3;
        println!(
            "| {label} | {ms:.2} ms per step ({:.2} ms/layer incl. embedding and lm_head) | f32 weight floor per layer about {floor:.3} ms at 3 TB/s |",
            ms / 2.0
        );
    }
}

#[cfg(not(feature = "cuda"))]
fn main() {
    eprintln!("gpu_forward needs the `cuda` feature: cargo bench -p pipeline --features cuda --bench gpu_forward");
}
