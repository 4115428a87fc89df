//! KV cache: prefill of prompt + continuation and prefill of the prompt
//! followed by cached decode steps give the same per-position tensors.

use std::path::Path;

use capture::CaptureDir;
use moetrace_tests::{rel_l2, scratch};
use session::RunConfig;
use stage_types::SaveTensorStage;

const TOLERANCE: f64 = 1e-5;

fn run(model: &str, prompt: &[u32], generate: usize, out: &Path) -> Vec<u32> {
    let text = format!(
        "(model: {model}, prompt: Tokens({prompt:?}), generate: {generate}, capture: (stages: \"all\", out_dir: {out:?}))"
    );
    let config = RunConfig::parse(&text, Path::new("kv.ron")).unwrap();
    session::run(&config, Path::new("kv.ron"), &mut |_| {}).unwrap().summary.generated
}

/// The rows of `values` (shape `shape`) that belong to positions
/// `rows` of the T axis, and for attention maps only the first `keys`
/// key positions.
fn position_rows(
    stage: SaveTensorStage,
    shape: &[usize],
    values: &[f64],
    rows: std::ops::Range<usize>,
    keys: usize,
) -> Vec<f64> {
    match stage {
        SaveTensorStage::AttnScores | SaveTensorStage::AttnSoftmax => {
            let (heads, t, p) = (shape[0], shape[1], shape[2]);
            let mut out = Vec::new();
            for h in 0..heads {
                for r in rows.clone() {
                    let row = &values[(h * t + r) * p..(h * t + r + 1) * p];
                    out.extend_from_slice(&row[..keys]);
                }
            }
            out
        }
        _ => {
            let width: usize = shape[1..].iter().product();
            values[rows.start * width..rows.end * width].to_vec()
        }
    }
}

fn check(model: &str, name: &str) {
    let prompt = [1u32, 17, 423, 45, 300, 5, 77, 100, 2];
    let dir = scratch(&format!("kv-{name}"));
    let generated = run(model, &prompt, 8, &dir.join("decode"));
    let mut full_prompt = prompt.to_vec();
    full_prompt.extend_from_slice(&generated[..7]);
    run(model, &full_prompt, 0, &dir.join("prefill"));
    let decode = CaptureDir::open(&dir.join("decode")).unwrap();
    let prefill = CaptureDir::open(&dir.join("prefill")).unwrap();

    let mut compared = 0;
    for (step, layer, stage) in decode.keys() {
        let a = decode.load(step, layer, stage).unwrap().unwrap();
        let b = prefill.load(0, layer, stage).unwrap().unwrap();
        let meta = &decode.manifest.steps[step];
        let rows_in_step = meta.tokens.len();
        let positions = meta.start_position..meta.start_position + rows_in_step;
        let keys = meta.start_position + rows_in_step;
        let ours = position_rows(stage, &a.shape, &a.values(), 0..rows_in_step, keys);
        let reference = position_rows(stage, &b.shape, &b.values(), positions, keys);
        if stage == SaveTensorStage::MoeRouterIndices {
            assert_eq!(ours, reference, "{name}: step {step} layer {layer:?} router indices");
        } else {
            let r = rel_l2(&reference, &ours);
            assert!(r <= TOLERANCE, "{name}: step {step} layer {layer:?} {stage}: rel_l2 {r:.3e}");
        }
        compared += 1;
    }
    assert!(compared > 100, "{name}: only {compared} tensors compared");
}

#[test]
fn decode_steps_match_a_full_prefill_on_tiny_moe() {
    check("Synthetic(preset: \"tiny-moe\", seed: 7)", "tiny-moe");
}

#[test]
fn decode_steps_match_a_full_prefill_on_tiny_dense() {
    check("Synthetic(preset: \"tiny-dense\", seed: 11)", "tiny-dense");
}
