//! Model families as plug-ins (pipeline's `families`): a Mixtral checkpoint
//! as the hub ships it runs with its own names in messages, its layers have
//! exactly the stages its family has (no qk_norm), faults and routing
//! replay work on it as on Qwen3-MoE. Its oracle test is in oracle.rs, its
//! local-mode and expected-error tests in local_mode.rs and
//! expected_errors.rs.

use capture::CaptureDir;
use moetrace_tests::{scratch, workspace_root};
use stage_types::SaveTensorStage as S;

const PROMPT: &str = "Tokens([1, 17, 42, 99, 5, 77])";

use moetrace_tests::run_config_text as run;

fn mixtral() -> String {
    format!("Path({:?})", workspace_root().join("tests/fixtures/tiny-mixtral-oracle/model"))
}

#[test]
fn a_mixtral_layer_has_every_stage_but_qk_norm_and_a_replay_reproduces_it() {
    let dir = scratch("families-mixtral");
    let reference =
        run(&dir, "ref", &format!("model: {}, prompt: {PROMPT}, generate: 3, capture: (out_dir: \"ref\")", mixtral()))
            .unwrap();
    let capture = CaptureDir::open(&dir.join("ref")).unwrap();
    let layer0: Vec<S> = capture.keys().into_iter().filter(|k| k.0 == 0 && k.1 == Some(0)).map(|k| k.2).collect();
    // An MoE layer with none of the optional parts (no q/k norm, bias or
    // shared expert): whatever stages other families add.
    let mixtral_layer = stage_types::LayerTraits { dense: false, ..Default::default() };
    let expected: Vec<S> =
        S::ALL.iter().copied().filter(|s| s.is_layer_stage() && s.applies_to(mixtral_layer)).collect();
    assert_eq!(layer0, expected);
    assert!(!layer0.contains(&S::QkNorm) && layer0.contains(&S::MoeExpertOut));
    // Routing replayed from the capture: the same tokens.
    let replayed = run(
        &dir,
        "replayed",
        &format!("model: {}, prompt: {PROMPT}, generate: 3, routing: Replay(\"ref\")", mixtral()),
    )
    .unwrap();
    assert_eq!(replayed.summary.generated, reference.summary.generated);
}

#[test]
fn mixtral_faults_and_missing_tensors_speak_its_language() {
    let dir = scratch("families-mixtral-errors");
    let msg = run(
        &dir,
        "qk",
        &format!("model: {}, prompt: {PROMPT}, faults: [(stage: \"qk_norm\", layer: 0, kind: Nan)]", mixtral()),
    )
    .unwrap_err()
    .to_string();
    assert!(msg.contains("MixtralForCausalLM without a qk_norm stage"), "{msg}");
    // A checkpoint missing an expert names the tensor as the file does.
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    let source = workspace_root().join("tests/fixtures/tiny-mixtral-oracle/model");
    std::fs::copy(source.join("config.json"), model.join("config.json")).unwrap();
    let bytes = std::fs::read(source.join("model.safetensors")).unwrap();
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(bytes[8..8 + len].to_vec()).unwrap();
    // Rename one expert's w3 in the header (same length, so offsets stay).
    let renamed = header.replacen("block_sparse_moe.experts.5.w3.weight", "block_sparse_moe.experts.5.w9.weight", 1);
    assert_ne!(header, renamed);
    let mut out = bytes[..8].to_vec();
    out.extend_from_slice(renamed.as_bytes());
    out.extend_from_slice(&bytes[8 + len..]);
    std::fs::write(model.join("model.safetensors"), out).unwrap();
    let msg = run(&dir, "missing", &format!("model: Path({model:?}), prompt: {PROMPT}")).unwrap_err().to_string();
    assert!(
        msg.contains("block_sparse_moe.experts.5.w3.weight") && msg.contains("mlp.experts.5.up_proj.weight"),
        "{msg}"
    );
    // A sliding window is refused beyond its length (within it, full
    // attention is the model's).
    let windowed = dir.join("windowed");
    std::fs::create_dir_all(&windowed).unwrap();
    std::fs::copy(source.join("model.safetensors"), windowed.join("model.safetensors")).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(source.join("config.json")).unwrap()).unwrap();
    config["sliding_window"] = 8.into();
    std::fs::write(windowed.join("config.json"), config.to_string()).unwrap();
    let body = |generate: usize| format!("model: Path({windowed:?}), prompt: {PROMPT}, generate: {generate}");
    assert!(run(&dir, "within", &body(3)).is_ok(), "8 positions fit a window of 8");
    let msg = run(&dir, "beyond", &body(4)).unwrap_err().to_string();
    assert!(msg.contains("sliding_window 8") && msg.contains("9 positions"), "{msg}");
}
