//! GPU tests: the CUDA backend (F32) against the oracle fixtures at every
//! stage, bit-identical logits with capture on and off, and bisect CPU vs
//! CUDA with and without an injected fault. Run on the GPU machine with
//! MOETRACE_GPU=1 (scripts/gpu-run.sh); elsewhere they say SKIPPED.

use std::path::Path;

use capture::CaptureDir;
use compare::diff::{DiffOptions, diff};
use moetrace_tests::{
    fixture, gguf_fixture, gpu_enabled, greedy_continuation, npy_files, oracle_fixtures, rel_l2, scratch,
};
use session::RunConfig;
use session::bisect::{BisectConfig, BisectOptions, bisect};
use stage_types::SaveTensorStage as S;

fn run(model: &str, prompt: &str, generate: usize, backend: &str, capture: Option<&Path>) -> (Vec<u32>, Vec<u32>) {
    let out = run_output(model, prompt, generate, backend, capture);
    (out.summary.generated, out.last_logits.as_f32().unwrap().iter().map(|x| x.to_bits()).collect())
}

fn run_output(model: &str, prompt: &str, generate: usize, backend: &str, capture: Option<&Path>) -> session::RunOutput {
    let capture = capture.map(|o| format!("capture: (out_dir: {o:?}),")).unwrap_or_default();
    let text =
        format!("(model: {model}, prompt: Tokens({prompt}), generate: {generate}, backend: {backend}, {capture})");
    let config = RunConfig::parse(&text, Path::new("gpu.ron")).unwrap();
    session::run(&config, Path::new("gpu.ron"), &mut |_| {}).unwrap()
}

/// 60 prompt tokens and 12 decode steps of the tiny MoE model in Bf16: the
/// KV caches grow from 64 to 128 positions at step 5, so a graph is
/// recorded (step 2), dropped (step 5 runs eagerly) and recorded again
/// (step 7).
fn graph_run(graphs: bool, capture: Option<(&Path, &str)>) -> session::RunOutput {
    let prompt: Vec<u32> = (0..60).map(|i| (i * 37 + 5) % 500).collect();
    let capture = capture
        .map(|(dir, steps)| format!("capture: (out_dir: {dir:?}, stages: \"all\", layers: \"all\", steps: {steps:?}),"))
        .unwrap_or_default();
    let text = format!(
        "(model: Synthetic(preset: \"tiny-moe\", seed: 3), prompt: Tokens({prompt:?}), generate: 12, \
         backend: Cuda(device: 0, dtype: Bf16, graphs: {graphs}), {capture})"
    );
    let config = RunConfig::parse(&text, Path::new("gpu.ron")).unwrap();
    session::run(&config, Path::new("gpu.ron"), &mut |_| {}).unwrap()
}

fn logit_bits(o: &session::RunOutput) -> Vec<u32> {
    o.last_logits.as_f32().unwrap().iter().map(|x| x.to_bits()).collect()
}

#[test]
fn cuda_bf16_graph_replays_compute_the_bits_of_eager_steps() {
    if !gpu_enabled() {
        return;
    }
    let graphs = graph_run(true, None);
    let eager = graph_run(false, None);
    assert_eq!(graphs.summary.graph_replays, 8, "steps 2-4 and 7-11 replay a graph");
    assert_eq!(eager.summary.graph_replays, 0);
    assert_eq!(graphs.summary.generated, eager.summary.generated);
    assert_eq!(logit_bits(&graphs), logit_bits(&eager), "last logits with and without graphs");
}

#[test]
fn cuda_bf16_captures_replayed_steps_bit_for_bit() {
    if !gpu_enabled() {
        return;
    }
    // Every stage of every layer at every step, then a selection of steps
    // that changes what a step reads (each change records the step again).
    for (name, steps) in [("all", "all"), ("some", "0..4,6,9..12")] {
        let dir = scratch(&format!("gpu-graph-capture-{name}"));
        let graphs = graph_run(true, Some((&dir.join("graphs"), steps)));
        let eager = graph_run(false, Some((&dir.join("eager"), steps)));
        assert!(graphs.summary.graph_replays >= 8, "{steps}: {} replays", graphs.summary.graph_replays);
        assert_eq!(eager.summary.graph_replays, 0);
        assert_eq!(logit_bits(&graphs), logit_bits(&eager), "{steps}: last logits");
        let (g, e) = (npy_files(&dir.join("graphs")), npy_files(&dir.join("eager")));
        assert!(g.len() > 100, "{steps}: {} files", g.len());
        assert_eq!(g.keys().collect::<Vec<_>>(), e.keys().collect::<Vec<_>>(), "{steps}: the same tensors");
        for (path, bytes) in &g {
            assert!(bytes == &e[path], "{steps}: {} differs with graphs", path.display());
        }
    }
}

#[test]
fn cuda_f32_matches_the_oracle_at_every_stage() {
    if !gpu_enabled() {
        return;
    }
    for (name, dir, model) in oracle_fixtures() {
        let oracle = CaptureDir::open(&dir.join("activations")).unwrap();
        let out = scratch(&format!("gpu-oracle-{name}")).join("cuda");
        let expected = greedy_continuation(&dir);
        let prompt = format!("{:?}", oracle.manifest.prompt);
        let (generated, _) = run(&model, &prompt, expected.len(), "Cuda(device: 0, dtype: F32)", Some(&out));
        assert_eq!(generated, expected, "{name}: greedy continuation");
        let ours = CaptureDir::open(&out).unwrap();
        let mut worst = (0.0f64, String::new());
        for (step, layer, stage) in oracle.keys() {
            let r = oracle.load(step, layer, stage).unwrap().unwrap();
            let g = ours.load(step, layer, stage).unwrap().unwrap();
            assert_eq!(g.shape, r.shape, "{name} step {step} layer {layer:?} {stage}");
            if stage.is_integer() {
                assert_eq!(g.values(), r.values(), "{name} step {step} layer {layer:?} {stage}");
                continue;
            }
            let e = rel_l2(&r.values(), &g.values());
            assert!(e <= 1e-5, "{name} step {step} layer {layer:?} {stage}: rel_l2 {e:.3e}");
            if e > worst.0 {
                worst = (e, format!("step {step} layer {layer:?} {stage}"));
            }
        }
        eprintln!(
            "{name}: CUDA F32 matches {} oracle tensors; worst rel_l2 {:.2e} at {}",
            oracle.manifest.tensors.len(),
            worst.0,
            worst.1
        );
        let report = diff(&dir.join("activations"), &out, &DiffOptions::default()).unwrap();
        assert!(report.first_divergence().is_none(), "{}", report.render(false));
    }
}

#[test]
fn cuda_logits_are_bit_identical_with_capture_on_and_off() {
    if !gpu_enabled() {
        return;
    }
    let dir = scratch("gpu-bits");
    let model = "Synthetic(preset: \"tiny-moe\", seed: 3)";
    // 5 prompt tokens (attention as three kernels) and 40 (fused: the
    // capture materialises attn_scores and attn_softmax, which the run
    // without capture never stores).
    let long: Vec<u32> = (0..40).map(|i| (i * 53 + 11) % 500).collect();
    for prompt in ["[5, 9, 200, 31, 7]".to_string(), format!("{long:?}")] {
        for dtype in ["F32", "Bf16"] {
            let backend = format!("Cuda(device: 0, dtype: {dtype})");
            let off = run(model, &prompt, 4, &backend, None);
            let out = dir.join(format!("{dtype}-{}", prompt.len()));
            let on = run(model, &prompt, 4, &backend, Some(&out));
            assert_eq!(off, on, "{dtype}, prompt {prompt}");
        }
    }
}

/// Bisect Cpu against Cuda(F32) on `model` (the fixtures' prompt, 4
/// generated tokens): clean without faults; the report with `faults` (a
/// RON list) applied to the target.
fn bisect_clean_then_with(model: &Path, faults: &str) -> compare::Report {
    bisect_clean_then_with_prompt(model, "[1, 17, 423, 45, 300, 5, 77, 100, 2]", faults)
}

/// [`bisect_clean_then_with`] on `prompt` (token ids, RON list).
fn bisect_clean_then_with_prompt(model: &Path, prompt: &str, faults: &str) -> compare::Report {
    let base = format!(
        "(model: Path({model:?}), prompt: Tokens({prompt}), generate: 4, reference: Cpu, target: Cuda(device: 0, dtype: F32)"
    );
    let run = |text: &str| {
        let config = BisectConfig::parse(text, Path::new("b.ron")).unwrap();
        bisect(&config, Path::new("b.ron"), &BisectOptions::default(), &mut |_, _| {}).unwrap()
    };
    let clean = run(&format!("{base})"));
    assert!(clean.first_divergence().is_none(), "{}", clean.render(false));
    let report = run(&format!("{base}, faults: {faults})"));
    eprintln!("{}", report.render(false));
    report
}

#[test]
fn bisect_cpu_vs_cuda_finds_nothing_and_then_the_injected_fault() {
    if !gpu_enabled() {
        return;
    }
    let Some(dir) = fixture("tiny-qwen3-moe") else { return };
    let faults = "[(stage: \"moe_expert_swigl\", layer: 2, step: 2, kind: Scale(1.5))]";
    let report = bisect_clean_then_with(&dir.join("model"), faults);
    let first = report.first_divergence().unwrap();
    assert_eq!((first.step, first.layer, first.stage), (2, Some(2), S::MoeExpertSwigl), "{}", report.render(false));
    assert!(report.graft.as_ref().unwrap().stage_is_wrong);
}

/// The other families on the GPU: Mixtral (no q/k norm: RoPE reads the
/// projections) and Qwen2-MoE (q/k/v biases, a gated shared expert, a
/// dense layer): clean, then a fault on one decode step's stage found
/// there.
#[test]
fn bisect_cpu_vs_cuda_on_each_family_finds_nothing_and_then_the_injected_fault() {
    if !gpu_enabled() {
        return;
    }
    for (fixture, stage, layer) in [
        ("tiny-mixtral-oracle", S::MoeExpertSwigl, 1),
        ("tiny-qwen2-moe-oracle", S::MoeSharedWeight, 2),
        ("tiny-deepseek-v3-moe-oracle", S::MlaKvB, 1),
        ("tiny-deepseek-v3-moe-oracle", S::MoeRouterChoice, 2),
        ("tiny-gpt-oss-oracle", S::AttnSink, 2),
        ("tiny-gpt-oss-oracle", S::MoeExpertClamp, 1),
    ] {
        let dir = moetrace_tests::workspace_root().join("tests/fixtures").join(fixture);
        let faults = format!("[(stage: {:?}, layer: {layer}, step: 2, kind: Scale(1.5))]", stage.name());
        let report = bisect_clean_then_with_prompt(&dir.join("model"), "[1, 17, 42, 99, 5, 77]", &faults);
        let first = report.first_divergence().unwrap();
        assert_eq!(
            (first.step, first.layer, first.stage),
            (2, Some(layer), stage),
            "{fixture}\n{}",
            report.render(false)
        );
        assert!(report.graft.as_ref().unwrap().stage_is_wrong, "{fixture}");
    }
}

/// The mixed-dispatch bug class on the Q4_K_M fixture: bisect CPU vs
/// Cuda(F32) is clean, and a fault on one expert's down projection (the
/// slots routed to it, one layer, one step) is found at that stage and
/// expert.
#[test]
fn bisect_cpu_vs_cuda_on_the_gguf_fixture_finds_one_experts_fault() {
    if !gpu_enabled() {
        return;
    }
    let Some(dir) = gguf_fixture("tiny-qwen3-moe-q4km") else { return };
    // An expert the prompt routes to in layer 1 (its first token's first).
    let capture = CaptureDir::open(&dir.join("activations")).unwrap();
    let ids = capture.load(0, Some(1), S::MoeRouterIndices).unwrap().unwrap();
    let expert = ids.values()[0] as usize;
    let faults = format!("[(stage: \"moe_expert_out\", layer: 1, step: 0, expert: {expert}, kind: Scale(1.5))]");
    let report = bisect_clean_then_with(&dir.join("model/model.gguf"), &faults);
    let first = report.first_divergence().expect("the fault is found");
    assert_eq!((first.step, first.layer, first.stage), (0, Some(1), S::MoeExpertOut), "{}", report.render(false));
    assert_eq!(first.worst_expert, Some(expert as i32), "{}", report.render(false));
}

#[test]
fn cuda_bf16_stays_within_3e2_of_the_oracle_and_its_flips_are_near_ties() {
    if !gpu_enabled() {
        return;
    }
    for (name, dir, model) in oracle_fixtures() {
        let work = scratch(&format!("gpu-bf16-{name}"));
        let out = work.join("cuda-bf16");
        let oracle = CaptureDir::open(&dir.join("activations")).unwrap();
        let prompt = format!("{:?}", oracle.manifest.prompt);
        run(&model, &prompt, oracle.manifest.steps.len(), "Cuda(device: 0, dtype: Bf16)", Some(&out));
        // The bound is issue 25's 3e-2, except on gpt-oss's fixture, where
        // bf16 storage alone goes past it: the CPU keeping the Bf16
        // contract (every rounding point of the CUDA Bf16 path, f64 sums)
        // on the same prompt reaches 4.15e-2 at moe_expert_out, the CUDA
        // run's own worst to three digits (its experts are 4x wide so the
        // clamp bites, and its random layers double an error each layer;
        // no one stage's rounding dominates: keeping any one in f32 leaves
        // 2.6e-2 to 3.4e-2). There the bound is that storage error with a
        // quarter of headroom, measured here, not written in.
        let mut options = DiffOptions::default();
        let mut storage_worst = None;
        if name.starts_with("tiny-gpt-oss") {
            let emulated = work.join("cpu-emulating-bf16");
            run(&model, &prompt, oracle.manifest.steps.len(), "CpuEmulating(Bf16)", Some(&emulated));
            let storage = diff(&dir.join("activations"), &emulated, &DiffOptions::default()).unwrap();
            let w = storage.rows.iter().filter_map(|r| r.rel_l2()).fold(0.0f64, f64::max);
            assert!((3e-2..5e-2).contains(&w), "{name}: bf16 storage alone gives {w:.2e}");
            options.tolerances.default = Some(1.25 * w);
            storage_worst = Some(w);
        }
        let report = diff(&dir.join("activations"), &out, &options).unwrap();
        eprintln!("{name} Bf16:\n{}", report.render(false));
        let worst = report.rows.iter().filter_map(|r| r.rel_l2()).fold(0.0f64, f64::max);
        eprintln!(
            "{name} Bf16: worst rel_l2 {worst:.2e} over {} tensors (bf16 storage alone: {})",
            report.rows.len(),
            storage_worst.map_or("not measured".to_string(), |w| format!("{w:.2e}"))
        );
        for (i, row) in report.rows.iter().enumerate() {
            use compare::Verdict;
            match &row.verdict {
                Verdict::Ok | Verdict::RoutingFlip | Verdict::Missing { .. } => {}
                Verdict::Diverged => {
                    // Allowed only downstream of a routing flip in the same
                    // step (a one-column stage near zero, like the shared
                    // expert gate's logit, is judged by its absolute error
                    // too: compare's Row::set_metrics).
                    let explained =
                        report.rows[..i].iter().any(|r| r.step == row.step && r.verdict == Verdict::RoutingFlip);
                    assert!(explained, "{name}: {} diverged without a routing flip upstream", row.place());
                }
                other => panic!("{name}: {} is {}", row.place(), other.label()),
            }
        }
    }
}

/// bisect --local of Cpu against Cuda(Bf16), judged by the expected-error
/// model, on each new family's fixture: a clean run has no finding; a 5%
/// fault on one decode step's stage is the one finding, at its step, layer
/// and stage.
#[test]
fn local_bisect_on_cuda_bf16_finds_one_fault_alone_in_each_family() {
    if !gpu_enabled() {
        return;
    }
    let root = moetrace_tests::workspace_root().join("tests/fixtures");
    for (fixture, stage, layer) in [
        ("tiny-mixtral-oracle", "attn_out", 1),
        ("tiny-qwen2-moe-oracle", "moe_shared_out", 2),
        ("tiny-qwen2-moe-oracle", "qkv_bias", 1),
        ("tiny-deepseek-v3-moe-oracle", "mla_kv_a_norm", 1),
        ("tiny-deepseek-v3-moe-oracle", "attention", 2),
        ("tiny-deepseek-v3-moe-oracle", "moe_shared_out", 2),
        ("tiny-gpt-oss-oracle", "attn_sink", 2),
        ("tiny-gpt-oss-oracle", "moe_expert_clamp", 1),
    ] {
        let model = root.join(fixture).join("model");
        let base = format!(
            "(model: Path({model:?}), prompt: Tokens([1, 17, 42, 99, 5, 77, 100, 2]), generate: 3, reference: Cpu, target: Cuda(device: 0, dtype: Bf16), mode: Local"
        );
        let run = |text: &str| {
            let config = BisectConfig::parse(text, Path::new("b.ron")).unwrap();
            bisect(&config, Path::new("b.ron"), &BisectOptions::default(), &mut |_, _| {}).unwrap()
        };
        let clean = run(&format!("{base})"));
        assert!(clean.findings().is_empty(), "{fixture}: clean\n{}", clean.render(false));
        let fault = format!("[(stage: {stage:?}, layer: {layer}, step: 2, kind: Scale(1.05))]");
        let report = run(&format!("{base}, faults: {fault})"));
        let found: Vec<_> = report.findings().iter().map(|r| (r.step, r.layer, r.stage.name())).collect();
        assert_eq!(found, [(2, Some(layer), stage)], "{fixture}: {fault}\n{}", report.render(false));
        eprintln!("{fixture}: clean 0 findings; {fault} found alone");
    }
}
