//! Text prompts for GGUF models: the tokenizer built from a GGUF file's
//! metadata. Qwen3's real tokenizer written into a GGUF as llama.cpp's
//! convert_hf_to_gguf.py writes it (tokens by id with their types, merges,
//! pre-tokenizer "qwen2", the chat template) gives exactly the ids Hugging
//! Face transformers gives (tests/data/qwen3-tokenizer-ids.json); the
//! Q4_K_M fixture's own tokenizer round-trips text and runs a text prompt
//! end to end; tokenizers moetrace does not build are clear errors.

use std::path::{Path, PathBuf};

use moetrace_tests::{check_recorded_qwen3_ids, gguf_bytes, gguf_fixture, gguf_string, scratch, tokenizer_fixture};
use serde_json::Value;
use session::RunConfig;
use session::prompt::{ChatMessage, PromptTokenizer};

/// GGUF value types.
const U32: u32 = 4;
const I32: u32 = 5;
const BOOL: u32 = 7;
const STRING: u32 = 8;
const ARRAY: u32 = 9;

fn array(kind: u32, items: &[Vec<u8>]) -> Vec<u8> {
    let mut out = kind.to_le_bytes().to_vec();
    out.extend_from_slice(&(items.len() as u64).to_le_bytes());
    items.iter().for_each(|i| out.extend(i));
    out
}

/// Tokenizer metadata as convert_hf_to_gguf.py writes it.
struct Vocab {
    model: &'static str,
    pre: &'static str,
    tokens: Vec<String>,
    types: Vec<i32>,
    merges: Vec<String>,
    eos: u32,
    template: Option<String>,
}

impl Vocab {
    fn write(&self, path: &Path) {
        let strings = |v: &[String]| array(STRING, &v.iter().map(|s| gguf_string(s)).collect::<Vec<_>>());
        let mut kvs = vec![
            ("general.architecture".to_string(), STRING, gguf_string("qwen3moe")),
            ("tokenizer.ggml.model".into(), STRING, gguf_string(self.model)),
            ("tokenizer.ggml.pre".into(), STRING, gguf_string(self.pre)),
            ("tokenizer.ggml.tokens".into(), ARRAY, strings(&self.tokens)),
            (
                "tokenizer.ggml.token_type".into(),
                ARRAY,
                array(I32, &self.types.iter().map(|t| t.to_le_bytes().to_vec()).collect::<Vec<_>>()),
            ),
            ("tokenizer.ggml.merges".into(), ARRAY, strings(&self.merges)),
            ("tokenizer.ggml.eos_token_id".into(), U32, self.eos.to_le_bytes().to_vec()),
            ("tokenizer.ggml.add_bos_token".into(), BOOL, vec![0]),
        ];
        if let Some(t) = &self.template {
            kvs.push(("tokenizer.chat_template".into(), STRING, gguf_string(t)));
        }
        std::fs::write(path, gguf_bytes(3, &kvs, &[], 0)).unwrap();
    }
}

/// Qwen3's tokenizer.json and chat template as GGUF metadata: the BPE
/// vocabulary NORMAL (1), special added tokens CONTROL (3), the others
/// USER_DEFINED (4), ids up to the model's 151936 `[PAD{id}]` UNUSED (5).
fn qwen3_vocab(dir: &Path) -> Vocab {
    let json: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer.json")).unwrap()).unwrap();
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap()).unwrap();
    let n = 151_936;
    let mut tokens: Vec<String> = (0..n).map(|i| format!("[PAD{i}]")).collect();
    let mut types = vec![5i32; n];
    for (token, id) in json["model"]["vocab"].as_object().unwrap() {
        let id = id.as_u64().unwrap() as usize;
        (tokens[id], types[id]) = (token.clone(), 1);
    }
    for t in json["added_tokens"].as_array().unwrap() {
        let id = t["id"].as_u64().unwrap() as usize;
        let special = t["special"].as_bool().unwrap();
        (tokens[id], types[id]) = (t["content"].as_str().unwrap().to_string(), if special { 3 } else { 4 });
    }
    let merges = json["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| match m {
            Value::String(s) => s.clone(),
            pair => format!("{} {}", pair[0].as_str().unwrap(), pair[1].as_str().unwrap()),
        })
        .collect();
    let eos = tokens.iter().position(|t| t == "<|im_end|>").unwrap() as u32;
    let template = config["chat_template"].as_str().map(str::to_string);
    Vocab { model: "gpt2", pre: "qwen2", tokens, types, merges, eos, template }
}

#[test]
fn a_gguf_holding_qwen3s_tokenizer_gives_hugging_faces_ids() {
    let Some(dir) = tokenizer_fixture() else { return };
    let out = scratch("gguf-qwen3-tokenizer");
    let path = out.join("qwen3-tokenizer.gguf");
    qwen3_vocab(&dir).write(&path);
    let tok = PromptTokenizer::load(&path).unwrap();
    check_recorded_qwen3_ids(&tok);
}

fn run_config(dir: &Path, body: &str) -> session::Result<(RunConfig, PathBuf)> {
    let path = dir.join("gguf-text.ron");
    std::fs::write(&path, body).unwrap();
    RunConfig::load(&path).map(|c| (c, path))
}

#[test]
fn the_q4km_fixture_tokenizes_text_and_runs_a_text_prompt() {
    let Some(model) = gguf_fixture("tiny-qwen3-moe-q4km") else { return };
    let gguf = model.join("model/model.gguf");
    let tok = PromptTokenizer::load(&gguf).unwrap();
    // The fixture's vocabulary: 256 bytes, merges of common letters, then
    // <|endoftext|>, <|im_start|>, <|im_end|> (ids 509..511).
    let text = "the router sent it to expert 7 <|im_end|> 专家";
    let ids = tok.encode_text(text).unwrap();
    assert_eq!(tok.decode(&ids), text);
    assert!(ids.contains(&511), "<|im_end|> is one control token: {ids:?}");
    assert!(ids.iter().any(|&i| (256..509).contains(&i)), "merges apply: {ids:?}");
    let err = tok.encode_chat(&[ChatMessage { role: "user".into(), content: "hi".into() }]).unwrap_err();
    assert!(err.to_string().contains("tokenizer.chat_template"), "{err}");

    let dir = scratch("gguf-text-run");
    let body = format!("(model: Path({gguf:?}), prompt: Text(\"the router sent it\"), generate: 3, threads: 2)");
    let (config, path) = run_config(&dir, &body).unwrap();
    assert_eq!(config.prompt_tokens(), tok.encode_text("the router sent it").unwrap());
    let out = session::run(&config, &path, &mut |_| {}).unwrap();
    let generated = out.summary.generated_text.expect("the generated text is reported");
    assert_eq!(generated, tok.decode(&out.summary.generated));
}

#[test]
fn gguf_tokenizers_moetrace_does_not_build_are_clear_errors() {
    let dir = scratch("gguf-tokenizer-errors");
    let small = || Vocab {
        model: "gpt2",
        pre: "qwen2",
        tokens: vec!["a".into(), "b".into(), "ab".into()],
        types: vec![1, 1, 1],
        merges: vec!["a b".into()],
        eos: 2,
        template: None,
    };
    let load = |vocab: Vocab, name: &str| {
        let path = dir.join(name);
        vocab.write(&path);
        PromptTokenizer::load(&path).map(|_| ()).map_err(|e| e.to_string())
    };
    assert_eq!(load(small(), "ok.gguf"), Ok(()));
    let err = load(Vocab { model: "llama", ..small() }, "spm.gguf").unwrap_err();
    assert!(err.contains("spm.gguf") && err.contains("`llama`") && err.contains("tokenizer: Path"), "{err}");
    let err = load(Vocab { pre: "deepseek-llm", ..small() }, "pre.gguf").unwrap_err();
    assert!(err.contains("deepseek-llm") && err.contains("qwen2"), "{err}");
    let err = load(Vocab { types: vec![1, 1], ..small() }, "types.gguf").unwrap_err();
    assert!(err.contains("2 token types for 3 tokens"), "{err}");
    let err = load(Vocab { merges: vec!["ab".into()], ..small() }, "merge.gguf").unwrap_err();
    assert!(err.contains("merge `ab`"), "{err}");
    // A model folder's GGUF without tokenizer metadata.
    let path = dir.join("bare.gguf");
    std::fs::write(&path, gguf_bytes(3, &[("general.architecture".into(), STRING, gguf_string("qwen3"))], &[], 0))
        .unwrap();
    let err = PromptTokenizer::load(&path).map(|_| ()).unwrap_err().to_string();
    assert!(err.contains("bare.gguf") && err.contains("tokenizer.ggml.model"), "{err}");
}
