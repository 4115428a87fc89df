//! Text prompts: `prompt: Text("...")` and `prompt: Chat([...])` become
//! token ids through the model's own tokenizer (tokenizer.json, read by the
//! `tokenizers` crate) and chat template (tokenizer_config.json's
//! `chat_template`, rendered by minijinja as Hugging Face renders it:
//! blocks trimmed, `add_generation_prompt` on, Python's string methods
//! available). The tokenizer is the checkpoint folder's, a GGUF model's
//! own (built from its metadata: prompt_gguf.rs), or the one
//! `tokenizer: Path("...")` names (the synthetic presets have none).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use stage_types::input::{MIB, read_regular, read_regular_text};

use crate::error::{Result, SessionError};

/// One message of a chat prompt.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The message text.
    pub content: String,
}

/// Where the tokenizer is: a tokenizer.json file, or a folder holding one
/// (and, for chat prompts, tokenizer_config.json with the template).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub enum TokenizerSpec {
    /// The path (relative to the config file).
    Path(PathBuf),
}

/// Largest tokenizer.json read (Qwen3's is 11 MB).
const MAX_TOKENIZER_BYTES: u64 = 256 * MIB;
/// Largest tokenizer_config.json read.
const MAX_TOKENIZER_CONFIG_BYTES: u64 = 16 * MIB;

/// A loaded tokenizer and its chat template.
pub struct PromptTokenizer {
    tokenizer: tokenizers::Tokenizer,
    chat_template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    /// The tokenizer.json it came from.
    pub path: PathBuf,
}

impl fmt::Debug for PromptTokenizer {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.debug_struct("PromptTokenizer").field("path", &self.path).finish_non_exhaustive()
    }
}

impl PromptTokenizer {
    /// Loads `path` (tokenizer.json, or a folder holding it) and, beside
    /// it, tokenizer_config.json when there is one.
    pub fn load(path: &Path) -> Result<Self> {
        if is_gguf(path) {
            return Self::load_gguf(path);
        }
        let file = if path.is_dir() { path.join("tokenizer.json") } else { path.to_path_buf() };
        let bad = |message: String| SessionError::Tokenizer { path: file.clone(), message };
        let bytes = read_regular(&file, MAX_TOKENIZER_BYTES).map_err(|e| bad(format!("cannot read it: {e}")))?;
        let config_path = file.with_file_name("tokenizer_config.json");
        let config = if config_path.is_file() {
            Some(read_regular_text(&config_path, MAX_TOKENIZER_CONFIG_BYTES).map_err(|e| SessionError::Tokenizer {
                path: config_path.clone(),
                message: format!("cannot read it: {e}"),
            })?)
        } else {
            None
        };
        Self::from_parts(&file, &bytes, config.as_deref())
    }

    /// A tokenizer from the bytes of its tokenizer.json (read from `file`,
    /// which errors name) and the text of tokenizer_config.json beside it,
    /// if any (its chat template and special tokens).
    pub fn from_parts(file: &Path, tokenizer_json: &[u8], config: Option<&str>) -> Result<Self> {
        let bad = |message: String| SessionError::Tokenizer { path: file.to_path_buf(), message };
        let tokenizer = tokenizers::Tokenizer::from_bytes(tokenizer_json)
            .map_err(|e| bad(format!("not a Hugging Face tokenizer.json: {e}")))?;
        let (mut chat_template, mut bos_token, mut eos_token) = (None, None, None);
        if let Some(text) = config {
            let json: serde_json::Value = serde_json::from_str(text).map_err(|e| SessionError::Tokenizer {
                path: file.with_file_name("tokenizer_config.json"),
                message: format!("not JSON: {e}"),
            })?;
            chat_template = template_of(&json);
            bos_token = token_string(json.get("bos_token"));
            eos_token = token_string(json.get("eos_token"));
        }
        Ok(Self { tokenizer, chat_template, bos_token, eos_token, path: file.to_path_buf() })
    }

    /// The tokenizer a GGUF file's metadata describes (prompt_gguf.rs), its
    /// chat template `tokenizer.chat_template`.
    fn load_gguf(path: &Path) -> Result<Self> {
        let bad = |message: String| SessionError::Tokenizer { path: path.to_path_buf(), message };
        let header = pipeline::weights::read_gguf_header(path).map_err(|e| bad(e.to_string()))?;
        let built = crate::prompt_gguf::tokenizer_of(&header).map_err(bad)?;
        let tokenizer = tokenizers::Tokenizer::from_bytes(&built.json)
            .map_err(|e| bad(format!("its tokenizer metadata does not make a tokenizer: {e}")))?;
        Ok(Self {
            tokenizer,
            chat_template: built.chat_template,
            bos_token: None,
            eos_token: built.eos_token,
            path: path.to_path_buf(),
        })
    }

    /// Token ids of `text` as Hugging Face's `tokenizer(text)` gives them
    /// (special tokens in the text recognised, the tokenizer's own added as
    /// it adds them).
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>> {
        self.encode(text, true)
    }

    /// The chat template rendered for `messages` with the generation prompt,
    /// and its token ids (as `apply_chat_template(..., tokenize=True)`:
    /// the rendered text, no special tokens added).
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<(String, Vec<u32>)> {
        let rendered = self.render_chat(messages)?;
        let ids = self.encode(&rendered, false)?;
        Ok((rendered, ids))
    }

    /// The chat template rendered for `messages`.
    pub fn render_chat(&self, messages: &[ChatMessage]) -> Result<String> {
        self.render_chat_with_fuel(messages, TEMPLATE_FUEL)
    }

    /// [`Self::render_chat`] within `fuel` template instructions.
    pub fn render_chat_with_fuel(&self, messages: &[ChatMessage], fuel: u64) -> Result<String> {
        let bad = |message: String| SessionError::Tokenizer { path: self.path.clone(), message };
        let template = self.chat_template.as_deref().ok_or_else(|| {
            let source = if is_gguf(&self.path) {
                "its metadata has no `tokenizer.chat_template`"
            } else {
                "tokenizer_config.json beside it has no `chat_template`"
            };
            bad(format!("no chat template: {source}; use prompt: Text(..) or Tokens([..])"))
        })?;
        let mut env = minijinja::Environment::new();
        // A template is input: its work and its output are bounded (a
        // looping template is an error, not a hang).
        env.set_fuel(Some(fuel));
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, message))
        });
        env.add_template("chat", template).map_err(|e| bad(format!("its chat template does not parse: {e}")))?;
        let messages: Vec<minijinja::Value> = messages
            .iter()
            .map(|m| minijinja::context! { role => m.role.clone(), content => m.content.clone() })
            .collect();
        let mut out = BoundedText::default();
        env.get_template("chat")
            .and_then(|t| {
                t.render_captured_to(
                    minijinja::context! {
                        messages => messages,
                        add_generation_prompt => true,
                        bos_token => self.bos_token.clone(),
                        eos_token => self.eos_token.clone(),
                    },
                    &mut out,
                )
                .map(|_| ())
            })
            .map_err(|e| match e.kind() {
                minijinja::ErrorKind::OutOfFuel => bad(format!(
                    "rendering its chat template did not finish within {fuel} template instructions (a loop without bound?)"
                )),
                _ if out.overflowed => bad(format!(
                    "rendering its chat template wrote more than {} MiB (a loop without bound?)",
                    TEMPLATE_MAX_OUTPUT >> 20
                )),
                _ => bad(format!("rendering its chat template failed: {e}")),
            })?;
        String::from_utf8(out.bytes).map_err(|_| bad("its chat template rendered invalid UTF-8".into()))
    }

    fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self.tokenizer.encode(text, add_special_tokens).map_err(|e| SessionError::Tokenizer {
            path: self.path.clone(),
            message: format!("cannot tokenize the prompt: {e}"),
        })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The text of `ids` (special tokens kept, as a person reads a run).
    pub fn decode(&self, ids: &[u32]) -> String {
        self.tokenizer.decode(ids, false).unwrap_or_else(|e| format!("<undecodable: {e}>"))
    }

    /// Each token's own text, for naming tokens in reports.
    pub fn token_texts(&self, ids: &[u32]) -> Vec<String> {
        ids.iter().map(|&id| self.decode(&[id])).collect()
    }
}

/// `chat_template` of a tokenizer_config.json: a string, or a list of
/// named templates (the `default` one).
fn template_of(json: &serde_json::Value) -> Option<String> {
    match json.get("chat_template")? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(list) => list
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
        _ => None,
    }
}

/// A special token of tokenizer_config.json: a string or `{content: ..}`.
fn token_string(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        other => other.get("content")?.as_str().map(str::to_string),
    }
}

/// A prompt given as text: where its ids came from.
#[derive(Debug, Clone)]
pub struct PromptText {
    /// The tokenizer that made the ids (and decodes the generated ones).
    pub tokenizer: Arc<PromptTokenizer>,
    /// The text as given (`Text`), or the messages as JSON (`Chat`).
    pub text: String,
    /// The rendered chat template (`Chat` only).
    pub rendered: Option<String>,
}

impl PartialEq for PromptText {
    fn eq(&self, other: &Self) -> bool {
        self.tokenizer.path == other.tokenizer.path && self.text == other.text && self.rendered == other.rendered
    }
}

/// Whether `path` is a GGUF file (by its extension, or its first bytes).
fn is_gguf(path: &Path) -> bool {
    if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
        return true;
    }
    let mut magic = [0u8; 4];
    path.is_file()
        && std::fs::File::open(path).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic)).is_ok()
        && &magic == b"GGUF"
}

/// Where a text prompt's tokenizer is: the one named, else the checkpoint's
/// (a GGUF file's metadata, or tokenizer.json in the checkpoint folder); a
/// synthetic model has none.
pub fn locate_tokenizer(named: Option<&Path>, checkpoint: Option<&Path>, config_path: &Path) -> Result<PathBuf> {
    if let Some(p) = named {
        return Ok(p.to_path_buf());
    }
    match checkpoint {
        Some(file) if is_gguf(file) => Ok(file.to_path_buf()),
        Some(dir) if dir.join("tokenizer.json").is_file() => Ok(dir.join("tokenizer.json")),
        Some(dir) => Err(SessionError::ConfigValue {
            path: config_path.to_path_buf(),
            message: format!(
                "a text prompt needs a tokenizer: {} has no tokenizer.json; name one with tokenizer: Path(\"...\")",
                dir.display()
            ),
        }),
        None => Err(SessionError::ConfigValue {
            path: config_path.to_path_buf(),
            message: "a text prompt needs a tokenizer and the synthetic presets have none: add tokenizer: Path(\"...\") (a folder with tokenizer.json, e.g. Qwen3's, whose vocabulary fits qwen3-30b-a3b), or give prompt: Tokens([..])".into(),
        }),
    }
}

/// Template instructions a chat template may run: a real template spends a
/// few hundred per message; a looping one stops here, in well under a
/// second.
pub const TEMPLATE_FUEL: u64 = 5_000_000;

/// Bytes a rendered chat template may hold (far beyond any context
/// window's worth of text).
pub const TEMPLATE_MAX_OUTPUT: usize = 16 << 20;

/// A writer that refuses to grow past [`TEMPLATE_MAX_OUTPUT`].
#[derive(Default)]
struct BoundedText {
    bytes: Vec<u8>,
    overflowed: bool,
}

impl std::io::Write for BoundedText {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + buf.len() > TEMPLATE_MAX_OUTPUT {
            self.overflowed = true;
            return Err(std::io::Error::other("the rendered template is too long"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
