//! Capture never changes what is computed, and neither does the thread
//! count: logits (and every captured tensor) are bit-identical.

use std::path::Path;

use capture::CaptureDir;
use moetrace_tests::scratch;
use session::RunConfig;

fn run(threads: usize, out: Option<&Path>) -> (Vec<u32>, Vec<u32>) {
    let capture = out.map(|o| format!("capture: (stages: \"all\", out_dir: {o:?}),")).unwrap_or_default();
    let text = format!(
        "(model: Synthetic(preset: \"tiny-moe\", seed: 3), prompt: Tokens([5, 9, 200, 31, 7]), generate: 4, threads: {threads}, {capture})"
    );
    let config = RunConfig::parse(&text, Path::new("bits.ron")).unwrap();
    let output = session::run(&config, Path::new("bits.ron"), &mut |_| {}).unwrap();
    let bits = output.last_logits.as_f32().unwrap().iter().map(|x| x.to_bits()).collect();
    (output.summary.generated, bits)
}

#[test]
fn logits_are_bit_identical_with_capture_on_and_off_and_for_one_and_two_threads() {
    let dir = scratch("bits");
    let reference = run(1, None);
    assert_eq!(reference.0.len(), 4);
    for (threads, capture) in [(1, true), (2, false), (2, true)] {
        let out = dir.join(format!("t{threads}"));
        let got = run(threads, capture.then_some(out.as_path()));
        assert_eq!(got.0, reference.0, "generated tokens, {threads} threads, capture {capture}");
        assert!(got.1 == reference.1, "logits differ: {threads} threads, capture {capture}");
    }
}

#[test]
fn every_captured_tensor_is_bit_identical_for_one_and_two_threads() {
    let dir = scratch("bits-all");
    run(1, Some(&dir.join("one")));
    run(2, Some(&dir.join("two")));
    let one = CaptureDir::open(&dir.join("one")).unwrap();
    let two = CaptureDir::open(&dir.join("two")).unwrap();
    assert_eq!(one.keys(), two.keys());
    for (step, layer, stage) in one.keys() {
        let a = one.load(step, layer, stage).unwrap().unwrap();
        let b = two.load(step, layer, stage).unwrap().unwrap();
        let same = a.values().iter().zip(&b.values()).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same && a.shape == b.shape, "step {step} layer {layer:?} {stage} differs");
    }
}

#[test]
fn every_captured_tensor_has_the_shape_the_model_config_predicts() {
    // ModelConfig::stage_shape sizes capture buffers before the first step;
    // every stage of a MoE and a dense model, prefill and decode.
    let dir = scratch("stage-shapes");
    for preset in ["tiny-moe", "tiny-dense"] {
        let out = dir.join(preset);
        let text = format!(
            "(model: Synthetic(preset: {preset:?}, seed: 3), prompt: Tokens([5, 9, 200, 31, 7]), generate: 3, capture: (stages: \"all\", out_dir: {out:?}))"
        );
        let config = RunConfig::parse(&text, Path::new("shapes.ron")).unwrap();
        session::run(&config, Path::new("shapes.ron"), &mut |_| {}).unwrap();
        let model = pipeline::Model::synthetic(preset, 3, None).unwrap();
        let capture = CaptureDir::open(&out).unwrap();
        // The element counts planned for steps 0, 1 and 2 name exactly the
        // tensors those steps captured, and the reserve holds all three.
        let session =
            capture::lifecycle::CaptureSession::start(config.session.capture.as_ref().unwrap(), &dir.join("plan"))
                .unwrap();
        for (step, tokens, positions) in [(0, 5, 5), (1, 1, 6), (2, 1, 7)] {
            let mut planned = session.step_elements(&model.config, step, tokens, positions);
            let mut captured: Vec<usize> = capture
                .keys()
                .into_iter()
                .filter(|k| k.0 == step)
                .map(|(s, l, st)| capture.load(s, l, st).unwrap().unwrap().values().len())
                .collect();
            planned.sort_unstable();
            captured.sort_unstable();
            assert_eq!(planned, captured, "{preset}: step {step} plan");
        }
        let reserved = session.reserve_elements(&model.config, 5).len();
        assert_eq!(reserved, capture.keys().iter().filter(|k| k.0 <= 2).count(), "{preset}: reserve");
        drop(session);
        assert!(capture.keys().len() > 50, "{preset}: {} tensors", capture.keys().len());
        for (step, layer, stage) in capture.keys() {
            let (t, positions) = if step == 0 { (5, 5) } else { (1, 5 + step) };
            let tensor = capture.load(step, layer, stage).unwrap().unwrap();
            assert_eq!(
                tensor.shape,
                model.config.stage_shape(stage, t, positions),
                "{preset} step {step} layer {layer:?} {stage}"
            );
        }
    }
}
