//! Local mode (teacher forcing) of bisect: every stage's own error. A fault
//! at any stage, layer and step is the one finding, with its local error;
//! upstream noise is flagged where it enters and nowhere downstream;
//! routing flips are counted with their margins and never propagate.

use std::path::Path;

use compare::{Mode, Report, Verdict};
use moetrace_tests::model_spec;
use session::bisect::{BisectConfig, BisectOptions, bisect};
use stage_types::SaveTensorStage as S;

const PROMPT: &str = "[1, 17, 423, 45, 300, 5, 77, 100, 2]";

fn local_bisect(model: &str, generate: usize, faults: &str) -> Report {
    local_bisect_on(model, PROMPT, generate, faults)
}

fn local_bisect_on(model: &str, prompt: &str, generate: usize, faults: &str) -> Report {
    let text = format!(
        "(model: {model}, prompt: Tokens({prompt}), generate: {generate}, reference: Cpu, target: Cpu, threads: 1, mode: Local, faults: [{faults}])"
    );
    let config = BisectConfig::parse(&text, Path::new("b.ron")).unwrap();
    let report = bisect(&config, Path::new("b.ron"), &BisectOptions::default(), &mut |_, _| {}).unwrap();
    assert_eq!(report.mode, Mode::Local);
    report
}

fn free_bisect(model: &str, generate: usize, faults: &str) -> Report {
    let text = format!(
        "(model: {model}, prompt: Tokens({PROMPT}), generate: {generate}, reference: Cpu, target: Cpu, threads: 1, faults: [{faults}])"
    );
    let config = BisectConfig::parse(&text, Path::new("b.ron")).unwrap();
    let options = BisectOptions { all: true, ..BisectOptions::default() };
    bisect(&config, Path::new("b.ron"), &options, &mut |_, _| {}).unwrap()
}

fn findings(report: &Report) -> Vec<(usize, Option<usize>, S)> {
    report.findings().iter().map(|r| (r.step, r.layer, r.stage)).collect()
}

/// A fault at every stage, one run each (layers spread by a stride, every
/// third at a decode step): local mode names exactly that (step, layer,
/// stage), with a local error, and nothing else.
fn every_stage_is_named_alone(name: &str) {
    let Some((model, config)) = model_spec(name) else { return };
    every_stage_is_named_alone_in(name, &model, &config, PROMPT, 20);
}

/// [`every_stage_is_named_alone`] for `model` (a config's model spec) on
/// `prompt`, at least `least` stages applying.
fn every_stage_is_named_alone_in(name: &str, model: &str, config: &pipeline::ModelConfig, prompt: &str, least: usize) {
    let mut checked = 0;
    for (i, &stage) in S::ALL.iter().enumerate() {
        let layer = stage.is_layer_stage().then(|| {
            (0..config.num_layers)
                .map(|l| (l + 3 * i + 1) % config.num_layers)
                .find(|&l| stage.applies_to(config.layer_traits(l)))
        });
        let layer = match layer {
            Some(None) => continue,
            Some(Some(l)) => Some(l),
            None => None,
        };
        let (step, token) = if i % 3 == 0 { (2, 0) } else { (0, 4) };
        let kind = if stage.is_integer() { "Zero" } else { "Scale(1.5)" };
        let layer_field = layer.map(|l| format!("layer: {l}, ")).unwrap_or_default();
        let fault = format!("(stage: {:?}, {layer_field}step: {step}, token: {token}, kind: {kind})", stage.name());
        let report = local_bisect_on(model, prompt, 3, &fault);
        let found = findings(&report);
        if stage == S::MoeRouterLogits {
            // The router is judged as a unit: its weights (and, across a
            // margin, its choice) follow its own logits.
            assert_eq!(found.first(), Some(&(step, layer, stage)), "{name}: {fault}\n{}", report.render(false));
            let router = [
                S::MoeRouterLogits,
                S::MoeRouterChoice,
                S::MoeRouterGroupScores,
                S::MoeRouterGroups,
                S::MoeRouter,
                S::MoeRouterIndices,
            ];
            assert!(found.iter().all(|f| router.contains(&f.2)), "{name}: {fault}: {found:?}");
        } else {
            assert_eq!(found, [(step, layer, stage)], "{name}: {fault}\n{}", report.render(false));
        }
        let row = report.findings()[0];
        if stage.holds_ids() {
            assert_eq!(row.verdict, Verdict::WrongRouter, "{name}: {fault}");
        } else {
            let error = row.metrics.as_ref().map(|m| m.worst_row_error).unwrap();
            // attn_sink holds one share per (head, query), judged against
            // the whole tensor's scale: a 1.5x share moves it less.
            let least = if stage == S::AttnSink { 0.02 } else { 0.1 };
            assert!(error > least && row.finding.is_some(), "{name}: {fault}: local error {error}");
            assert_eq!(row.worst_token, Some(token), "{name}: {fault}");
        }
        checked += 1;
    }
    assert!(checked >= least, "{name}: only {checked} stages checked");
}

#[test]
fn every_stage_fault_is_named_alone_on_tiny_moe() {
    every_stage_is_named_alone("tiny-moe");
}

#[test]
fn every_stage_fault_is_named_alone_on_tiny_dense() {
    every_stage_is_named_alone("tiny-dense");
}

#[test]
fn every_stage_fault_is_named_alone_on_tiny_mixtral() {
    // A family without q/k norm: its layers have no qk_norm stage, RoPE
    // reads the projections.
    every_stage_is_named_alone("tiny-mixtral");
}

#[test]
fn every_stage_fault_is_named_alone_on_tiny_qwen2_moe() {
    // q/k/v biases, and a shared expert's six stages beside the routed ones.
    every_stage_is_named_alone("tiny-qwen2-moe");
}

#[test]
fn every_stage_fault_is_named_alone_on_tiny_deepseek_v3() {
    // Multi-head latent attention: its six stages (mla_q_a .. mla_kv_b)
    // instead of qkv_matmul, and the attention stages in MLA's shapes.
    let dir = moetrace_tests::workspace_root().join("tests/fixtures/tiny-deepseek-v3-oracle/model");
    let config = pipeline::ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let model = format!("Path({dir:?})");
    every_stage_is_named_alone_in("tiny-deepseek-v3", &model, &config, "[1, 17, 42, 99, 5, 77, 3]", 22);
    // Its MoE layers: the grouped router, the routed and the shared experts.
    let dir = moetrace_tests::workspace_root().join("tests/fixtures/tiny-deepseek-v3-moe-oracle/model");
    let config = pipeline::ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let model = format!("Path({dir:?})");
    every_stage_is_named_alone_in("tiny-deepseek-v3-moe", &model, &config, "[1, 17, 42, 99, 5, 77, 3]", 37);
}

#[test]
fn every_stage_fault_is_named_alone_on_tiny_gpt_oss() {
    // Sinks, windows (layers 0 and 2 sliding, 1 full), biases, the clamp:
    // attn_window, attn_sink and moe_expert_clamp among the stages.
    let dir = moetrace_tests::workspace_root().join("tests/fixtures/tiny-gpt-oss-oracle/model");
    let config = pipeline::ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let model = format!("Path({dir:?})");
    every_stage_is_named_alone_in("tiny-gpt-oss", &model, &config, "[1, 17, 42, 99, 5, 77, 3]", 26);
}

#[test]
fn every_stage_fault_is_named_alone_on_the_fixture() {
    every_stage_is_named_alone("tiny-qwen3-moe");
}

#[test]
fn upstream_noise_is_flagged_where_it_enters_and_nowhere_after() {
    let model = "Synthetic(preset: \"tiny-moe\", seed: 5)";
    let fault = "(stage: \"embedding\", step: 0, token: 3, kind: Noise(std: 1e-3, seed: 2))";
    let free = free_bisect(model, 3, fault);
    let diverged = free.rows.iter().filter(|r| !r.verdict.is_ok() && r.stage != S::Embedding).count();
    assert!(diverged > 20, "free-running, the noise should make later stages diverge; {diverged} did");
    let local = local_bisect(model, 3, fault);
    assert_eq!(findings(&local), [(0, None, S::Embedding)], "{}", local.render(false));
    assert!(local.rows.iter().filter(|r| r.stage != S::Embedding).all(|r| r.rel_l2().is_none_or(|e| e == 0.0)));
}

#[test]
fn routing_flips_are_counted_with_margins_and_never_propagate() {
    let model = "Synthetic(preset: \"tiny-moe\", seed: 5)";
    // Noise on every token's router logits of layer 1: enough to flip the
    // closest top-k margins, too little to move a clear one.
    let faults: Vec<String> = (0..9)
        .map(|t| format!("(stage: \"moe_router_logits\", layer: 1, token: {t}, kind: Noise(std: 0.3, seed: {t}))"))
        .collect();
    let report = local_bisect(model, 1, &faults.join(", "));
    let flips = report.routing_flips();
    assert_eq!(flips.len(), 1, "{}", report.render(false));
    let (step, layer, count, near, margin) = flips[0];
    assert_eq!((step, layer), (0, 1));
    assert!(count >= 1 && near == count && margin.is_some(), "{}", report.render(false));
    let indices = report.rows.iter().find(|r| r.stage == S::MoeRouterIndices && r.layer == Some(1)).unwrap();
    assert_eq!(indices.verdict, Verdict::RoutingFlip);
    // The faulty logits and the router's weights are findings, the near-tie
    // flips are not; the experts ran on the reference's ids and weights, so
    // nothing after the router differs.
    let found = findings(&report);
    assert_eq!(found.first(), Some(&(0, Some(1), S::MoeRouterLogits)), "{}", report.render(false));
    assert!(found.iter().all(|f| f.2 == S::MoeRouterLogits || f.2 == S::MoeRouter), "{found:?}");
    let after = report.rows.iter().filter(|r| r.layer == Some(1) && r.stage > S::MoeRouter || r.layer > Some(1));
    assert!(after.into_iter().all(|r| r.rel_l2().is_none_or(|e| e == 0.0)));
}

/// A fault whose expert selector meets no routed slot changes nothing and
/// says so (step and layer named); the target's capture of a local run
/// says in its manifest that it holds outputs on forced inputs.
#[test]
fn an_expert_fault_that_hits_nothing_says_so_and_local_captures_say_they_were_forced() {
    let dir = moetrace_tests::scratch("local-expert-miss");
    let text = format!(
        "(model: Synthetic(preset: \"tiny-moe\", seed: 5), prompt: Tokens({PROMPT}), generate: 2, reference: Cpu, target: Cpu, threads: 1, mode: Local, capture: (stages: \"moe_router_indices\", layers: \"1\", steps: \"1\", out_dir: {:?}))",
        dir.join("cap")
    );
    let config = BisectConfig::parse(&text, Path::new("b.ron")).unwrap();
    bisect(&config, Path::new("b.ron"), &BisectOptions::default(), &mut |_, _| {}).unwrap();
    let target = compare::CaptureDir::open(&dir.join("cap/target")).unwrap();
    let reference = compare::CaptureDir::open(&dir.join("cap/reference")).unwrap();
    assert!(target.manifest.teacher_forced.as_deref().is_some_and(|t| t.contains("local mode")));
    assert!(reference.manifest.teacher_forced.is_none());
    let ids = reference.load(1, Some(1), S::MoeRouterIndices).unwrap().unwrap();
    let routed: Vec<usize> = ids.values().iter().map(|&x| x as usize).collect();
    let idle = (0..64).find(|e| !routed.contains(e)).unwrap();
    let fault = format!("(stage: \"moe_expert_out\", layer: 1, step: 1, expert: {idle}, kind: Scale(2.0))");
    let report = local_bisect("Synthetic(preset: \"tiny-moe\", seed: 5)", 2, &fault);
    assert!(report.findings().is_empty(), "{}", report.render(false));
    let note = report.notes.iter().find(|n| n.contains("nothing was changed")).expect("a note says the fault missed");
    assert!(note.contains("step 1 layer 1") && note.contains(&format!("expert {idle}")), "{note}");
    assert!(report.render(false).contains(note.as_str()));
}
