//! llama.cpp's CPU numerics as an option (`backend: CpuLlamaCpp`): before
//! each projection the activations are converted as ggml's CPU path
//! converts them for the weight's type. On the Q4_K_M fixture that is Q8_K
//! (and Q8_0) quantization of the activations: the first projection moves
//! by about 1% (rel_l2) while the greedy continuation stays the oracle's;
//! on f32 weights the option changes no bit; on bf16 weights it rounds the
//! activations to bf16, as ggml does.

use std::path::Path;

use capture::CaptureDir;
use moetrace_tests::{gguf_fixture, greedy_continuation, rel_l2, scratch, workspace_root};
use pipeline::weights::{WeightDtype, WeightStore, WeightTensor};
use pipeline::{CpuBackend, Forward, Model};
use session::RunConfig;
use stage_types::SaveTensorStage as S;

fn capture_run(model: &Path, backend: &str, out: &Path) -> Vec<u32> {
    let text = format!(
        "(model: Path({model:?}), prompt: Tokens([1, 17, 423, 45, 300, 5, 77, 100, 2]), generate: 8, backend: {backend}, threads: 2, capture: (stages: \"qkv_matmul,moe_expert_out,lm_head\", out_dir: {out:?}))"
    );
    let config = RunConfig::parse(&text, Path::new("numerics.ron")).unwrap();
    session::run(&config, Path::new("numerics.ron"), &mut |_| {}).unwrap().summary.generated
}

#[test]
fn q8_k_activations_move_the_gguf_fixture_by_about_a_percent_and_keep_its_tokens() {
    let Some(dir) = gguf_fixture("tiny-qwen3-moe-q4km") else { return };
    let model = dir.join("model/model.gguf");
    let out = scratch("llama-cpp-numerics");
    let exact = capture_run(&model, "Cpu", &out.join("exact"));
    let llama = capture_run(&model, "CpuLlamaCpp", &out.join("llama"));
    assert_eq!(exact, greedy_continuation(&dir));
    assert_eq!(llama, exact, "the greedy continuation is kept");
    let (a, b) = (CaptureDir::open(&out.join("exact")).unwrap(), CaptureDir::open(&out.join("llama")).unwrap());
    let load = |c: &CaptureDir, layer, stage| c.load(0, layer, stage).unwrap().unwrap().values();
    let first = rel_l2(&load(&a, Some(0), S::QkvMatmul), &load(&b, Some(0), S::QkvMatmul));
    let logits = rel_l2(&load(&a, None, S::LmHead), &load(&b, None, S::LmHead));
    eprintln!("Q8_K activations: step 0 layer 0 qkv_matmul rel_l2 {first:.2e}, lm_head {logits:.2e}");
    assert!((2e-3..3e-2).contains(&first), "layer 0's first projection moved by {first:.2e}");
    assert!((2e-3..5e-2).contains(&logits), "logits moved by {logits:.2e}");
    assert!(b.manifest.dtype.contains("q8_k"), "the manifest names the numerics: {}", b.manifest.dtype);
}

/// Last-step logits bits of a short greedy run.
fn logits(model: &Model, ggml: bool) -> Vec<u32> {
    let mut backend = CpuBackend::new(model.store.clone(), Some(2)).unwrap();
    backend.set_ggml_activations(ggml);
    let mut forward = Forward::new(model, Box::new(backend));
    forward.generate(&[5, 9, 100, 31, 7], 3, &mut |_| {}).unwrap();
    let t = forward.backend_mut().read(S::LmHead).unwrap();
    t.as_f32().unwrap().iter().map(|v| v.to_bits()).collect()
}

#[test]
fn on_f32_weights_the_option_changes_no_bit_and_on_bf16_it_rounds() {
    let bf16 = Model::load(&workspace_root().join("tests/fixtures/tiny-moe-oracle/model")).unwrap();
    assert_ne!(logits(&bf16, false), logits(&bf16, true), "bf16 weights: activations rounded to bf16");
    let mut store = WeightStore::default();
    for t in bf16.store.tensors() {
        let bytes = t.to_f32_vec().iter().flat_map(|v| v.to_le_bytes()).collect();
        store.insert(WeightTensor::owned(t.name.clone(), WeightDtype::F32, t.shape.clone(), bytes));
    }
    let f32 = Model::assemble(bf16.config.clone(), store, bf16.source.clone()).unwrap();
    assert_eq!(logits(&f32, false), logits(&f32, true), "f32 weights: nothing converted");
}
