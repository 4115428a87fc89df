//! GPU tests of memory: weights that cannot fit fail before any upload with
//! the numbers; running out of memory inside a step is a clear error and
//! the backend works again afterwards; capture copies through the pinned
//! staging pool equal synchronous reads bit for bit. Run on the GPU machine
//! with MOETRACE_GPU=1 (scripts/gpu-run.sh); elsewhere they say SKIPPED.

use std::path::Path;

use moetrace_tests::gpu_enabled;
use pipeline::backend::cuda::CudaPrecision;
use pipeline::{CudaBackend, Forward, Model, PipelineError};
use session::RunConfig;
use stage_types::SaveTensorStage as S;

#[test]
fn weights_that_cannot_fit_fail_before_upload_and_name_the_numbers() {
    if !gpu_enabled() {
        return;
    }
    // The preset doubled to 96 layers, in f32: about 244 GB, more than any
    // single card (H100 80 GB, H200 141 GB).
    let text = "(model: Synthetic(preset: \"qwen3-30b-a3b\", seed: 7, layers: 96), prompt: Tokens([1, 2]), backend: Cuda(device: 0, dtype: F32))";
    let config = RunConfig::parse(text, Path::new("oom.ron")).unwrap();
    let started = std::time::Instant::now();
    let err = session::run(&config, Path::new("oom.ron"), &mut |_| {}).unwrap_err().to_string();
    eprintln!("{err} ({:.2} s)", started.elapsed().as_secs_f64());
    assert!(err.contains("GPU out of memory") && err.contains("GB free") && err.contains("dtype: Bf16"), "{err}");
    assert!(started.elapsed().as_secs() < 30, "the check must come before the upload");
}

#[test]
fn a_prompt_whose_activations_cannot_fit_is_refused_before_the_first_step() {
    if !gpu_enabled() {
        return;
    }
    // 40 000 tokens (within the model's 40 960 positions) with their
    // attention scores captured: the fused attention keeps no scores in
    // memory unless they are read, but these are 32 x 40 000 x 40 000 f32,
    // about 205 GB.
    let tokens: Vec<String> = (0..40_000u32).map(|i| ((i * 7919 + 13) % 151_936).to_string()).collect();
    let out = moetrace_tests::scratch("long-scores");
    let text = format!(
        "(model: Synthetic(preset: \"qwen3-30b-a3b\", seed: 7, layers: 2), prompt: Tokens([{}]), backend: Cuda(device: 0, dtype: Bf16), capture: (stages: \"attn_scores\", layers: \"0\", out_dir: {out:?}))",
        tokens.join(",")
    );
    let config = RunConfig::parse(&text, Path::new("long.ron")).unwrap();
    let started = std::time::Instant::now();
    let err = session::run(&config, Path::new("long.ron"), &mut |_| {}).unwrap_err().to_string();
    eprintln!("{err} ({:.2} s)", started.elapsed().as_secs_f64());
    assert!(
        err.contains("GPU out of memory") && err.contains("KV caches and activations") && err.contains("GB free"),
        "{err}"
    );
}

#[test]
fn out_of_memory_inside_a_step_is_a_clear_error_and_the_backend_recovers() {
    if !gpu_enabled() {
        return;
    }
    let model = Model::synthetic_on_demand("qwen3-30b-a3b", 7, Some(1)).unwrap();
    let mut backend = CudaBackend::new(&model, 0, CudaPrecision::Bf16).unwrap();
    // Unfused, attention keeps scores of 32 heads over 65536 x 65536
    // positions in memory: 550 GB (fused, this step fits).
    backend.set_fused_attention(false);
    let mut forward = Forward::new(&model, Box::new(backend));
    let long: Vec<u32> = (0..65_536u32).map(|i| (i * 7919 + 13) % 151_936).collect();
    match forward.step(0, &long, 0, &mut |_| {}) {
        Err(e @ PipelineError::GpuOutOfMemory { .. }) => eprintln!("as expected: {e}"),
        other => panic!("expected GPU out of memory, got {other:?}"),
    }
    let short = [5u32, 9, 200, 31, 7];
    forward.step(0, &short, 0, &mut |_| {}).expect("a step that fits runs after the failed one");
    let token = forward.next_token().unwrap();
    assert!(token < 151_936);
}

#[test]
fn a_prompt_whose_unfused_scores_exceed_the_gpu_runs_with_fused_attention() {
    if !gpu_enabled() {
        return;
    }
    // 32 768 tokens: scores and probabilities of 32 heads would be 275 GB;
    // fused, the step needs a few GB.
    let model = Model::synthetic_on_demand("qwen3-30b-a3b", 7, Some(1)).unwrap();
    let backend = CudaBackend::new(&model, 0, CudaPrecision::Bf16).unwrap();
    let mut forward = Forward::new(&model, Box::new(backend));
    let long: Vec<u32> = (0..32_768u32).map(|i| (i * 7919 + 13) % 151_936).collect();
    let started = std::time::Instant::now();
    forward.step(0, &long, 0, &mut |_| {}).expect("the fused step fits");
    let token = forward.next_token().unwrap();
    eprintln!("32768-token prefill of one layer: {:.2} s, token {token}", started.elapsed().as_secs_f64());
    assert!(token < 151_936);
}

#[test]
fn capture_copies_through_pinned_buffers_equal_synchronous_reads() {
    if !gpu_enabled() {
        return;
    }
    let model = Model::synthetic("tiny-moe", 3, None).unwrap();
    for precision in [CudaPrecision::F32, CudaPrecision::Bf16] {
        let backend = CudaBackend::new(&model, 0, precision).unwrap();
        let mut forward = Forward::new(&model, Box::new(backend));
        for (step, tokens, start) in [(0, vec![5u32, 9, 200, 31, 7, 11, 3], 0), (1, vec![42], 7)] {
            forward.step(step, &tokens, start, &mut |_| {}).unwrap();
            let backend = forward.backend_mut();
            // Start every copy first (the pool hands out one buffer each),
            // then wait for them all.
            let pending: Vec<_> = S::ALL.iter().filter_map(|&s| backend.read_async(s).ok().map(|p| (s, p))).collect();
            assert!(pending.len() >= 20, "{precision:?}: only {} stages held data", pending.len());
            for (stage, p) in pending {
                let copied = p.wait().unwrap();
                let read = backend.read(stage).unwrap();
                assert_eq!(copied, read, "{precision:?} step {step} {stage}");
            }
        }
    }
}
