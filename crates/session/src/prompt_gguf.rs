//! A tokenizer from a GGUF file's metadata (`tokenizer.ggml.*` and
//! `tokenizer.chat_template`, as llama.cpp's convert_hf_to_gguf.py writes
//! them): the tokens by id with their types, the BPE merges, the
//! pre-tokenizer's name and the chat template. It becomes the tokenizer.json
//! the `tokenizers` crate reads: normal tokens the BPE vocabulary, control
//! tokens special added tokens, user-defined tokens plain added tokens,
//! unused ids left out, and the pre-tokenizer the name stands for, spelled
//! as Hugging Face's tokenizer.json spells it.
//!
//! Read: byte-level BPE (`tokenizer.ggml.model` "gpt2") with the "qwen2"
//! pre-tokenizer and no BOS added, which is what Qwen2, Qwen3 and Qwen3-MoE
//! GGUF files hold. Anything else is an error that names what the file has
//! and how to name a tokenizer.json instead.

use pipeline::weights::gguf::{GgufHeader, GgufValue};
use serde_json::{Map, Value, json};

/// Pre-tokenizer split patterns by `tokenizer.ggml.pre`, as the model's
/// tokenizer.json has them (Qwen3's `pre_tokenizer.pretokenizers[0]`).
const PRE_TOKENIZERS: &[(&str, &str)] = &[(
    "qwen2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)];

/// llama.cpp's token types (`llama_token_type`).
const NORMAL: i64 = 1;
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

/// What a GGUF file's metadata gives a prompt tokenizer.
pub(crate) struct GgufTokenizer {
    /// The equivalent tokenizer.json.
    pub json: Vec<u8>,
    /// `tokenizer.chat_template`, when the file has one.
    pub chat_template: Option<String>,
    /// The end-of-sequence token's text (for chat templates that use it).
    pub eos_token: Option<String>,
}

/// Builds the tokenizer `header`'s metadata describes; the error says what
/// is missing or not read.
pub(crate) fn tokenizer_of(header: &GgufHeader) -> Result<GgufTokenizer, String> {
    let text = |key: &str| header.get(key).and_then(GgufValue::as_str);
    let model =
        text("tokenizer.ggml.model").ok_or("it has no tokenizer (no `tokenizer.ggml.model` in its metadata)")?;
    let pre = text("tokenizer.ggml.pre").unwrap_or("default");
    let pattern = PRE_TOKENIZERS.iter().find(|(name, _)| *name == pre).map(|(_, p)| *p);
    let (true, Some(pattern)) = (model == "gpt2", pattern) else {
        let known: Vec<&str> = PRE_TOKENIZERS.iter().map(|(n, _)| *n).collect();
        return Err(format!(
            "its tokenizer is `{model}` with pre-tokenizer `{pre}`; moetrace builds byte-level BPE tokenizers (`gpt2`) \
             with pre-tokenizer {}; name the model's tokenizer.json with tokenizer: Path(\"...\")",
            known.join(", ")
        ));
    };
    if header.get("tokenizer.ggml.add_bos_token").is_some_and(|v| matches!(v, GgufValue::Bool(true))) {
        return Err("its tokenizer adds a BOS token, which moetrace's GGUF tokenizer does not; name the model's \
                    tokenizer.json with tokenizer: Path(\"...\")"
            .into());
    }
    let tokens = strings(header, "tokenizer.ggml.tokens")?;
    let merges = strings(header, "tokenizer.ggml.merges")?;
    let types: Vec<i64> = match header.get("tokenizer.ggml.token_type") {
        Some(GgufValue::Array(values)) => values.iter().map(|v| v.as_u64().map_or(-1, |t| t as i64)).collect(),
        Some(_) => return Err("`tokenizer.ggml.token_type` is not an array".into()),
        None => vec![NORMAL; tokens.len()],
    };
    if types.len() != tokens.len() {
        return Err(format!("{} token types for {} tokens", types.len(), tokens.len()));
    }
    let mut vocab = Map::new();
    let mut added = Vec::new();
    for (id, (token, &kind)) in tokens.iter().zip(&types).enumerate() {
        match kind {
            NORMAL => {
                vocab.insert(token.to_string(), json!(id));
            }
            CONTROL | USER_DEFINED => added.push(json!({
                "id": id, "content": token, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": false, "special": kind == CONTROL,
            })),
            // Unknown, unused and byte tokens: not part of a byte-level BPE.
            _ => {}
        }
    }
    let merges: Vec<Value> = merges
        .iter()
        .map(|m| m.split_once(' ').map(|(a, b)| json!([a, b])).ok_or_else(|| format!("merge `{m}` is not two tokens")))
        .collect::<Result<_, _>>()?;
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false});
    let document = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false},
            byte_level,
        ]},
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
            "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges,
        },
    });
    let token_at = |key: &str| {
        let id = header.get(key).and_then(GgufValue::as_u64)?;
        tokens.get(usize::try_from(id).ok()?).map(|t| t.to_string())
    };
    Ok(GgufTokenizer {
        json: serde_json::to_vec(&document).map_err(|e| e.to_string())?,
        chat_template: text("tokenizer.chat_template").map(str::to_string),
        eos_token: token_at("tokenizer.ggml.eos_token_id"),
    })
}

/// The strings of array `key`.
fn strings<'a>(header: &'a GgufHeader, key: &str) -> Result<Vec<&'a str>, String> {
    match header.get(key) {
        Some(GgufValue::Array(values)) => values
            .iter()
            .map(|v| v.as_str().ok_or_else(|| format!("`{key}` holds a value that is not a string")))
            .collect(),
        Some(_) => Err(format!("`{key}` is not an array")),
        None => Err(format!("its tokenizer metadata has no `{key}`")),
    }
}
