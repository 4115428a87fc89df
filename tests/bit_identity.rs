//! Capture never changes what is computed, and neither does the thread
//! count: logits (and every captured tensor) are bit-identical.

use std::path::Path;

use capture::{CaptureDir, RunConfig};
use moetrace_tests::scratch;

fn run(threads: usize, out: Option<&Path>) -> (Vec<u32>, Vec<u32>) {
    let capture = out.map(|o| format!("capture: (stages: \"all\", out_dir: {o:?}),")).unwrap_or_default();
    let text = format!(
        "(model: Synthetic(preset: \"tiny-moe\", seed: 3), prompt: Tokens([5, 9, 200, 31, 7]), generate: 4, threads: {threads}, {capture})"
    );
    let config = RunConfig::parse(&text, Path::new("bits.ron")).unwrap();
    let output = capture::run(&config, Path::new("bits.ron"), &mut |_| {}).unwrap();
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
        let same = a.values.iter().zip(&b.values).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same && a.shape == b.shape, "step {step} layer {layer:?} {stage} differs");
    }
}
