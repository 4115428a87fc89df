//! Compare and bisect find injected faults exactly: for every stage a model
//! has, a fault at a chosen layer and step is reported by `diff` and by
//! `bisect` as that (step, layer, stage), and the graft check calls the
//! stage itself wrong. Plus: no false positives, routing flips on near-ties,
//! NaN/Inf sides.

use std::path::Path;

use capture::CaptureDir;
use compare::diff::{DiffOptions, diff};
use compare::{Report, Side, Verdict};
use moetrace_tests::{fixture, model_spec, scratch};
use session::RunConfig;
use session::bisect::{BisectConfig, BisectOptions, bisect};
use stage_types::SaveTensorStage as S;

const PROMPT: &str = "[1, 17, 423, 45, 300, 5, 77, 100, 2]";

fn capture_run(model: &str, generate: usize, faults: &str, out: &Path) {
    let text = format!(
        "(model: {model}, prompt: Tokens({PROMPT}), generate: {generate}, threads: 1, faults: [{faults}], capture: (out_dir: {out:?}))"
    );
    let config = RunConfig::parse(&text, Path::new("t.ron")).unwrap();
    session::run(&config, Path::new("t.ron"), &mut |_| {}).unwrap();
}

fn bisect_run(model: &str, generate: usize, faults: &str) -> Report {
    let text = format!(
        "(model: {model}, prompt: Tokens({PROMPT}), generate: {generate}, reference: Cpu, target: Cpu, threads: 1, faults: [{faults}])"
    );
    let config = BisectConfig::parse(&text, Path::new("b.ron")).unwrap();
    bisect(&config, Path::new("b.ron"), &BisectOptions::default(), &mut |_, _| {}).unwrap()
}

/// Every stage of the model gets one fault; diff and bisect must name it.
fn localise_every_stage(name: &str) {
    let Some((model, config)) = model_spec(name) else { return };
    let dir = scratch(&format!("faults-{name}"));
    let clean = dir.join("clean");
    capture_run(&model, 2, "", &clean);
    let mut checked = 0;
    for (i, &stage) in S::ALL.iter().enumerate() {
        // A layer that has the stage, spread over the model; decode step 1
        // for every third stage.
        let layer = stage.is_layer_stage().then(|| {
            (0..config.num_layers)
                .map(|l| (l + i) % config.num_layers)
                .find(|&l| stage.applies_to(config.layer_traits(l)))
        });
        let layer = match layer {
            Some(None) => continue, // no layer of this model has the stage
            Some(Some(l)) => Some(l),
            None => None,
        };
        let (step, token) = if i % 3 == 0 { (1, 0) } else { (0, 2) };
        let kind = match stage {
            S::MoeRouterIndices => "Zero",
            _ => "Scale(1.5)",
        };
        let layer_field = layer.map(|l| format!("layer: {l}, ")).unwrap_or_default();
        let fault = format!("(stage: {:?}, {layer_field}step: {step}, token: {token}, kind: {kind})", stage.name());
        let expected = (step, layer, stage);

        let faulty = dir.join(format!("fault-{}", stage.name()));
        capture_run(&model, 2, &fault, &faulty);
        let report = diff(&clean, &faulty, &DiffOptions::default()).unwrap();
        let first = report.first_divergence().unwrap_or_else(|| panic!("{name}: diff missed {fault}"));
        assert_eq!(
            (first.step, first.layer, first.stage),
            expected,
            "{name}: diff of {fault}\n{}",
            report.render(false)
        );

        let report = bisect_run(&model, 2, &fault);
        let first = report.first_divergence().unwrap_or_else(|| panic!("{name}: bisect missed {fault}"));
        assert_eq!(
            (first.step, first.layer, first.stage),
            expected,
            "{name}: bisect of {fault}\n{}",
            report.render(false)
        );
        let graft = report.graft.as_ref().expect("graft check ran");
        assert!(graft.stage_is_wrong, "{name}: graft of {fault} should call the stage wrong\n{}", report.render(false));
        checked += 1;
    }
    assert!(checked >= 20, "{name}: only {checked} stages checked");
}

#[test]
fn every_stage_fault_is_localised_on_tiny_moe() {
    localise_every_stage("tiny-moe");
}

#[test]
fn every_stage_fault_is_localised_on_tiny_dense() {
    localise_every_stage("tiny-dense");
}

#[test]
fn every_stage_fault_is_localised_on_the_tiny_qwen3_moe_fixture() {
    localise_every_stage("tiny-qwen3-moe");
}

#[test]
fn no_false_positives_against_the_oracle_or_across_thread_counts() {
    for name in ["tiny-qwen3-moe", "tiny-qwen3"] {
        let Some(dir) = fixture(name) else { continue };
        let out = scratch(&format!("nofp-{name}")).join("cpu");
        capture_run(&format!("Path({:?})", dir.join("model")), 8, "", &out);
        let report = diff(&dir.join("activations"), &out, &DiffOptions::default()).unwrap();
        assert!(report.first_divergence().is_none(), "{name}:\n{}", report.render(false));
        assert!(report.rows.len() > 50);
    }
    let dir = scratch("nofp-threads");
    for threads in [1, 2] {
        let text = format!(
            "(model: Synthetic(preset: \"tiny-moe\", seed: 2), prompt: Tokens({PROMPT}), generate: 3, threads: {threads}, capture: (out_dir: {:?}))",
            dir.join(format!("t{threads}"))
        );
        let config = RunConfig::parse(&text, Path::new("t.ron")).unwrap();
        session::run(&config, Path::new("t.ron"), &mut |_| {}).unwrap();
    }
    let report = diff(&dir.join("t1"), &dir.join("t2"), &DiffOptions::default()).unwrap();
    assert!(report.first_divergence().is_none(), "{}", report.render(false));
    let report = bisect_run("Synthetic(preset: \"tiny-moe\", seed: 2)", 3, "");
    assert!(report.first_divergence().is_none(), "{}", report.render(false));
}

#[test]
fn nan_and_inf_are_reported_with_their_side() {
    let model = "Synthetic(preset: \"tiny-moe\", seed: 4)";
    let dir = scratch("nan-side");
    capture_run(model, 0, "", &dir.join("clean"));
    capture_run(model, 0, "(stage: \"attn_out\", layer: 1, token: 3, kind: Nan)", &dir.join("nan"));
    capture_run(model, 0, "(stage: \"attn_out\", layer: 1, token: 3, kind: Inf)", &dir.join("inf"));
    for (reference, target, side) in [
        ("clean", "nan", Side::Target),
        ("nan", "clean", Side::Reference),
        ("clean", "inf", Side::Target),
        ("inf", "clean", Side::Reference),
    ] {
        let report = diff(&dir.join(reference), &dir.join(target), &DiffOptions::default()).unwrap();
        let first = report.first_divergence().unwrap();
        assert_eq!((first.layer, first.stage), (Some(1), S::AttnOut));
        assert_eq!(first.verdict, Verdict::Nan { side }, "{reference} vs {target}");
        assert_eq!(first.worst_token, Some(3));
        let m = first.metrics.as_ref().unwrap();
        assert!(
            m.max_abs_diff.is_infinite()
                && m.rel_l2.is_infinite()
                && (m.min_row_cosine.is_nan() || m.min_row_cosine < 1.0)
        );
    }
}

#[test]
fn a_perturbation_across_a_near_tie_is_a_routing_flip_not_a_wrong_router() {
    let model = "Synthetic(preset: \"tiny-moe\", seed: 6)";
    let dir = scratch("flip");
    capture_run(model, 0, "", &dir.join("clean"));
    let clean = CaptureDir::open(&dir.join("clean")).unwrap();
    // The (layer, token) whose top-4 margin is smallest.
    let mut best = (f64::INFINITY, 0, 0, 0.0);
    for layer in 0..4 {
        let logits = clean.load(0, Some(layer), S::MoeRouterLogits).unwrap().unwrap();
        let e = logits.shape[1];
        for t in 0..logits.shape[0] {
            let row = &logits.values()[t * e..(t + 1) * e];
            let margin = compare::routing::top_k_margin(row, 4).unwrap();
            let mut sorted = row.to_vec();
            sorted.sort_by(|a, b| b.total_cmp(a));
            if margin < best.0 {
                best = (margin, layer, t, sorted[3] - sorted[4]);
            }
        }
    }
    let (margin, layer, token, logit_gap) = best;
    // Scaling logits keeps their order, so it can never flip a set: a small
    // seeded noise of about the logit gap can.
    for seed in 0..40 {
        let fault = format!(
            "(stage: \"moe_router_logits\", layer: {layer}, token: {token}, kind: Noise(std: {}, seed: {seed}))",
            logit_gap * 1.5
        );
        let out = dir.join(format!("noise-{seed}"));
        capture_run(model, 0, &fault, &out);
        let report = diff(&dir.join("clean"), &out, &DiffOptions::default()).unwrap();
        let Some(indices) = report.rows.iter().find(|r| r.stage == S::MoeRouterIndices && r.layer == Some(layer))
        else {
            continue;
        };
        if indices.flipped.is_empty() {
            continue;
        }
        assert_eq!(indices.verdict, Verdict::RoutingFlip, "margin {margin:e}\n{}", report.render(false));
        let flip = &indices.flipped[0];
        assert_eq!(flip.token, token);
        assert!((flip.ref_margin.unwrap() - margin).abs() < 1e-12 && flip.near_tie);
        let text = report.render(false);
        assert!(text.contains("routing flip") && text.contains("ref margin"), "{text}");
        let report = bisect_run(model, 0, &fault);
        let indices = report.rows.iter().find(|r| r.stage == S::MoeRouterIndices && r.layer == Some(layer)).unwrap();
        assert_eq!(indices.verdict, Verdict::RoutingFlip);
        return;
    }
    panic!("no seed flipped the near-tie token (margin {margin:e}, logit gap {logit_gap:e})");
}

#[test]
fn a_stage_that_only_amplifies_upstream_drift_is_told_apart_from_a_wrong_one() {
    // attn_norm is perturbed within its (loosened) tolerance; qkv_matmul,
    // computed correctly from it, is the first divergence but not wrong.
    let text = format!(
        "(model: Synthetic(preset: \"tiny-moe\", seed: 5), prompt: Tokens({PROMPT}), reference: Cpu, target: Cpu, threads: 1, \
         faults: [(stage: \"attn_norm\", layer: 1, token: 2, kind: Scale(1.002))])"
    );
    let config = BisectConfig::parse(&text, Path::new("b.ron")).unwrap();
    let mut options = BisectOptions::default();
    options.tolerances.add("attn_norm=1e-2").unwrap();
    let report = bisect(&config, Path::new("b.ron"), &options, &mut |_, _| {}).unwrap();
    let first = report.first_divergence().unwrap();
    assert_eq!((first.step, first.layer, first.stage), (0, Some(1), S::QkvMatmul), "{}", report.render(false));
    let graft = report.graft.as_ref().unwrap();
    assert!(!graft.stage_is_wrong && graft.rel_l2 < 1e-6, "{}", report.render(false));
    // The embedding is exact: no infinite jump from it; the drift enters
    // at attn_norm.
    let (place, _) = graft.first_error.as_ref().unwrap();
    assert_eq!(place, "step 0 layer 1 attn_norm");
    assert!(graft.largest_jump.as_ref().is_none_or(|(_, ratio)| ratio.is_finite()), "{graft:?}");
    assert!(report.render(false).contains("only amplifies upstream drift"));
}

#[test]
fn bisect_can_capture_both_runs_and_diff_agrees_with_it() {
    let dir = scratch("bisect-capture");
    let text = format!(
        "(model: Synthetic(preset: \"tiny-dense\", seed: 5), prompt: Tokens({PROMPT}), generate: 3, reference: Cpu, target: Cpu, \
         faults: [(stage: \"ffn_up\", layer: 2, step: 1, kind: Noise(std: 0.5, seed: 3))], capture: (out_dir: {:?}))",
        dir.join("both")
    );
    let config = BisectConfig::parse(&text, Path::new("b.ron")).unwrap();
    let options = BisectOptions { all: true, ..BisectOptions::default() };
    let report = bisect(&config, Path::new("b.ron"), &options, &mut |_, _| {}).unwrap();
    let first = report.first_divergence().unwrap();
    assert_eq!((first.step, first.layer, first.stage), (1, Some(2), S::FfnUp));
    let diffed = diff(&dir.join("both/reference"), &dir.join("both/target"), &DiffOptions::default()).unwrap();
    let d = diffed.first_divergence().unwrap();
    assert_eq!((d.step, d.layer, d.stage), (1, Some(2), S::FfnUp));
    let target = CaptureDir::open(&dir.join("both/target")).unwrap();
    assert_eq!(target.manifest.faults.len(), 1);
    assert_eq!(target.manifest.steps.len(), 3);
}
