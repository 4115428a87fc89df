//! Text prompts: Qwen3's real tokenizer (../shared/fixtures/qwen3-tokenizer)
//! gives exactly the ids Hugging Face transformers gives for texts and chat
//! templates (recorded by tests/python/record_tokenizer_ids.py into
//! tests/data/qwen3-tokenizer-ids.json); text and chat prompts run end to
//! end, the manifest records them and diff names tokens by their text;
//! every misuse is a clear error.

use std::path::Path;

use compare::diff::{DiffOptions, diff};
use moetrace_tests::{scratch, tokenizer_fixture};
use session::RunConfig;
use session::prompt::PromptTokenizer;

#[test]
fn token_ids_and_chat_templates_equal_hugging_face_transformers() {
    let Some(dir) = tokenizer_fixture() else { return };
    let tok = PromptTokenizer::load(&dir).unwrap();
    moetrace_tests::check_recorded_qwen3_ids(&tok);
}

fn config(dir: &Path, body: &str) -> session::Result<RunConfig> {
    let path = dir.join("text.ron");
    std::fs::write(&path, body).unwrap();
    RunConfig::load(&path)
}

#[test]
fn text_and_chat_prompts_run_and_are_recorded_and_diff_names_tokens() {
    let Some(tok) = tokenizer_fixture() else { return };
    let dir = scratch("text-prompts");
    let run = |name: &str, prompt: &str, fault: &str| {
        let body = format!(
            "(model: Synthetic(preset: \"tiny-moe-qwen3-vocab\", seed: 2), prompt: {prompt}, tokenizer: Path({tok:?}), generate: 4, faults: [{fault}], capture: (stages: \"moe_router_indices,post_ffn_residual\", out_dir: {name:?}))"
        );
        let config = config(&dir, &body).unwrap();
        let out = session::run(&config, &dir.join("text.ron"), &mut |_| {}).unwrap();
        (config, out)
    };
    let (config, out) = run("text", r#"Text("The router picks 专家 🔀")"#, "");
    let expected = PromptTokenizer::load(&tok).unwrap();
    assert_eq!(config.prompt_tokens(), expected.encode_text("The router picks 专家 🔀").unwrap());
    let text = out.summary.generated_text.expect("the generated text is reported");
    assert_eq!(text, expected.decode(&out.summary.generated));
    let manifest = compare::Manifest::read(&dir.join("text")).unwrap();
    assert_eq!(manifest.prompt_text.as_ref().unwrap().text, "The router picks 专家 🔀");
    assert_eq!(manifest.token_texts.len(), manifest.prompt.len() + manifest.generated.len());

    let chat = r#"Chat([(role: "system", content: "Be brief."), (role: "user", content: "Why NaN?")])"#;
    let (config, _) = run("chat", chat, "");
    let manifest = compare::Manifest::read(&dir.join("chat")).unwrap();
    let rendered = manifest.prompt_text.unwrap().rendered.unwrap();
    assert!(rendered.ends_with("<|im_start|>assistant\n"), "{rendered:?}");
    assert_eq!(config.prompt_tokens(), &manifest.prompt[..]);
    assert_eq!(manifest.token_texts[0], "<|im_start|>");

    // A routing fault at step 1: diff names the token by its text.
    let (_, _) = run("chat-fault", chat, "(stage: \"moe_router_indices\", layer: 1, step: 1, kind: Zero)");
    let report = diff(&dir.join("chat"), &dir.join("chat-fault"), &DiffOptions::default()).unwrap();
    let first = report.first_divergence().expect("the fault is found");
    let position = manifest.steps[1].start_position + first.worst_token.unwrap();
    assert_eq!(first.worst_token_text.as_deref(), Some(manifest.token_texts[position].as_str()));
    assert!(report.render(false).contains(&format!("{:?}", manifest.token_texts[position])));
}

#[test]
fn bisect_with_a_text_prompt_names_tokens_by_their_text() {
    let Some(tok) = tokenizer_fixture() else { return };
    let text = format!(
        "(model: Synthetic(preset: \"tiny-moe-qwen3-vocab\", seed: 2), prompt: Text(\"Experts 专家\"), tokenizer: Path({tok:?}), generate: 3, reference: Cpu, target: Cpu, threads: 1, faults: [(stage: \"moe_ffn_out\", layer: 1, step: 1, kind: Scale(1.5))])"
    );
    let bisect_config = session::bisect::BisectConfig::parse(&text, Path::new("b.ron")).unwrap();
    let report = session::bisect::bisect(
        &bisect_config,
        Path::new("b.ron"),
        &session::bisect::BisectOptions::default(),
        &mut |_, _| {},
    )
    .unwrap();
    let first = report.first_divergence().expect("the fault is found");
    assert_eq!((first.step, first.layer), (1, Some(1)));
    let text = first.worst_token_text.clone().expect("the token is named");
    let rendered = report.render(false);
    assert!(rendered.contains(&format!("{text:?}")), "{rendered}");
    // Step 1 feeds the first generated token: the name is that token's text.
    let dir = scratch("bisect-text");
    let run = config(
        &dir,
        &format!(
            "(model: Synthetic(preset: \"tiny-moe-qwen3-vocab\", seed: 2), prompt: Text(\"Experts 专家\"), tokenizer: Path({tok:?}), generate: 3)"
        ),
    )
    .unwrap();
    let out = session::run(&run, &dir.join("text.ron"), &mut |_| {}).unwrap();
    let tokenizer = PromptTokenizer::load(&tok).unwrap();
    assert_eq!(text, tokenizer.decode(&out.summary.generated[..1]));
}

#[test]
fn text_prompt_misuse_is_a_clear_error() {
    let dir = scratch("text-errors");
    let err = |body: &str| config(&dir, body).err().map(|e| e.to_string()).unwrap_or_default();
    let msg = err(r#"(model: Synthetic(preset: "tiny-moe", seed: 1), prompt: Text("hi"))"#);
    assert!(msg.contains("tokenizer: Path") && msg.contains("synthetic"), "{msg}");
    let msg = err(r#"(model: Synthetic(preset: "tiny-moe", seed: 1), prompt: Text("hi"), tokenizer: Path("nowhere"))"#);
    assert!(msg.contains("nowhere") && msg.contains("cannot read"), "{msg}");
    std::fs::write(dir.join("broken.json"), "{\"not\": \"a tokenizer\"}").unwrap();
    let msg =
        err(r#"(model: Synthetic(preset: "tiny-moe", seed: 1), prompt: Text("hi"), tokenizer: Path("broken.json"))"#);
    assert!(msg.contains("broken.json") && msg.contains("tokenizer.json"), "{msg}");
    let Some(tok) = tokenizer_fixture() else { return };
    let msg =
        err(&format!(r#"(model: Synthetic(preset: "tiny-moe", seed: 1), prompt: Chat([]), tokenizer: Path({tok:?}))"#));
    assert!(msg.contains("Chat([])"), "{msg}");
    let msg =
        err(&format!(r#"(model: Synthetic(preset: "tiny-moe", seed: 1), prompt: Text(""), tokenizer: Path({tok:?}))"#));
    assert!(msg.contains("no tokens"), "{msg}");
    // Qwen3's ids do not fit tiny-moe's 512-token vocabulary: the tokenizer
    // is named as not this model's (when the run checks it against the model).
    let path = dir.join("vocab.ron");
    std::fs::write(
        &path,
        format!(r#"(model: Synthetic(preset: "tiny-moe", seed: 1), prompt: Text("Mixture of experts"), tokenizer: Path({tok:?}))"#),
    )
    .unwrap();
    let config = RunConfig::load(&path).unwrap();
    let msg = session::run(&config, &path, &mut |_| {}).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(msg.contains("does not belong to this model") && msg.contains("tokenizer.json"), "{msg}");
}

/// A chat template is input like any other: one that loops without bound
/// (nested ranges), floods its output or recurses is an error naming the
/// tokenizer folder, within seconds, not a hang with memory growing.
#[test]
fn a_looping_chat_template_is_an_error_not_a_hang() {
    let Some(tok) = tokenizer_fixture() else { return };
    let dir = scratch("looping-template");
    let templates = [
        (
            "nested",
            "{% for i in range(10000) %}{% for j in range(10000) %}{% for k in range(10000) %}x{% endfor %}{% endfor %}{% endfor %}",
            "did not finish",
        ),
        (
            "flood",
            "{% for i in range(10000) %}{% for j in range(100) %}{{ 'y' * 90000 }}{% endfor %}{% endfor %}",
            "MiB",
        ),
        ("recursion", "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(1) }}", "chat template"),
    ];
    for (name, template, expect) in templates {
        let folder = dir.join(name);
        std::fs::create_dir_all(&folder).unwrap();
        std::fs::copy(tok.join("tokenizer.json"), folder.join("tokenizer.json")).unwrap();
        let config_json = serde_json::json!({ "chat_template": template, "eos_token": "<|im_end|>" });
        std::fs::write(folder.join("tokenizer_config.json"), config_json.to_string()).unwrap();
        let body = format!(
            "(model: Synthetic(preset: \"tiny-moe-qwen3-vocab\", seed: 2), prompt: Chat([(role: \"user\", content: \"hi\")]), tokenizer: Path({folder:?}), generate: 1)"
        );
        let start = std::time::Instant::now();
        let err = config(&dir, &body).expect_err(name).to_string();
        assert!(start.elapsed().as_secs() < 20, "{name}: took {:?}", start.elapsed());
        assert!(err.contains(expect) && err.contains(name), "{name}: {err}");
    }
}
