//! The parts of a RON config (`moetrace run --config FILE`): which model,
//! the prompt, the capture selection, and the RON reading itself (syntax
//! errors at file:line:col with the valid choices). How they compose into
//! run and bisect configs: spec.rs.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::{self, Deserializer};

pub use capture::selection::CaptureSpec;

use crate::error::{Result, SessionError};
use crate::prompt::{ChatMessage, PromptText, PromptTokenizer, TokenizerSpec, locate_tokenizer};

/// Which model to run.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub enum ModelSpec {
    /// A synthetic model: a preset (`tiny-moe`, `tiny-dense`,
    /// `qwen3-30b-a3b`) with seeded weights, optionally cut to `layers`.
    Synthetic {
        /// Preset name.
        preset: String,
        /// Weight seed.
        seed: u64,
        /// Build only the first N layers (for presets too big for memory).
        #[serde(default)]
        layers: Option<usize>,
    },
    /// A Hugging Face checkpoint folder (relative to the config file).
    Path(PathBuf),
}

/// The prompt.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub enum PromptSpec {
    /// Token ids.
    Tokens(Vec<u32>),
    /// Text, tokenized with the model's tokenizer (`tokenizer(text)`).
    Text(String),
    /// Messages, rendered with the tokenizer's chat template (generation
    /// prompt on) and tokenized.
    Chat(Vec<ChatMessage>),
}

/// A prompt made into token ids (what every run and bisect works from).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ResolvedPrompt {
    /// The ids fed.
    pub ids: Vec<u32>,
    /// For Text and Chat prompts: the text and its tokenizer.
    pub text: Option<PromptText>,
}

impl PromptSpec {
    /// The ids: as given, or through the tokenizer (named, or the
    /// checkpoint's). Empty prompts and prompts that tokenize to nothing are
    /// errors naming the field.
    pub fn resolve(&self, tokenizer: Option<&TokenizerSpec>, model: &ModelSpec, path: &Path) -> Result<ResolvedPrompt> {
        let bad = |message: String| SessionError::ConfigValue { path: path.to_path_buf(), message };
        let tokenizer = || -> Result<std::sync::Arc<PromptTokenizer>> {
            let named = tokenizer.map(|TokenizerSpec::Path(p)| p.as_path());
            let checkpoint = match model {
                ModelSpec::Path(p) => Some(p.as_path()),
                ModelSpec::Synthetic { .. } => None,
            };
            Ok(std::sync::Arc::new(PromptTokenizer::load(&locate_tokenizer(named, checkpoint, path)?)?))
        };
        let resolved = match self {
            PromptSpec::Tokens(ids) => ResolvedPrompt { ids: ids.clone(), text: None },
            PromptSpec::Text(text) => {
                let tok = tokenizer()?;
                let ids = tok.encode_text(text)?;
                ResolvedPrompt { ids, text: Some(PromptText { tokenizer: tok, text: text.clone(), rendered: None }) }
            }
            PromptSpec::Chat(messages) => {
                if messages.is_empty() {
                    return Err(bad("prompt: Chat([]) has no messages".into()));
                }
                let tok = tokenizer()?;
                let (rendered, ids) = tok.encode_chat(messages)?;
                let json: Vec<serde_json::Value> =
                    messages.iter().map(|m| serde_json::json!({"role": m.role, "content": m.content})).collect();
                let text = serde_json::Value::Array(json).to_string();
                ResolvedPrompt { ids, text: Some(PromptText { tokenizer: tok, text, rendered: Some(rendered) }) }
            }
        };
        if resolved.ids.is_empty() {
            let what = match self {
                PromptSpec::Tokens(_) => "prompt: Tokens([]) is empty; give at least one token id",
                _ => "the prompt tokenizes to no tokens; give some text",
            };
            return Err(bad(what.into()));
        }
        Ok(resolved)
    }
}

/// Deserialises `generate`, a count of tokens; `1.5`, `-1` or `"3"` get
/// a message that says so (RON's own names only the type).
pub(crate) fn whole_number<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    struct Whole;
    impl de::Visitor<'_> for Whole {
        type Value = usize;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("generate: a whole number of tokens (0, 1, 2, ...)")
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<usize, E> {
            usize::try_from(v).map_err(|_| E::custom(format!("generate: {v} is too large")))
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<usize, E> {
            usize::try_from(v)
                .map_err(|_| E::custom(format!("generate: {v} is not a whole number of tokens (0, 1, 2, ...)")))
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<usize, E> {
            Err(E::custom(format!("generate: {v} is not a whole number of tokens (0, 1, 2, ...)")))
        }
    }
    d.deserialize_any(Whole)
}

/// Largest config file read.
const MAX_CONFIG_BYTES: u64 = 16 * stage_types::input::MIB;

/// Parses a RON config (`Some(..)` may be left out), reporting errors at
/// file:line:col.
pub(crate) fn parse_ron<T: serde::de::DeserializeOwned>(text: &str, path: &Path) -> Result<T> {
    let options = ron::Options::default().with_default_extension(ron::extensions::Extensions::IMPLICIT_SOME);
    options.from_str(text).map_err(|e| {
        use ron::error::Error as E;
        let (line, col) = (e.span.start.line, e.span.start.col);
        let what = match &e.code {
            E::ExpectedFloat => "expected a number, e.g. 1.5".to_string(),
            E::ExpectedInteger => "expected a whole number".to_string(),
            E::ExpectedString => "expected a string in double quotes".to_string(),
            other => other.to_string(),
        };
        let message = match near(text, line, col) {
            Some(snippet) => format!("{what} (near `{snippet}`)"),
            None => what,
        };
        SessionError::ConfigSyntax { path: path.to_path_buf(), line, col, message }
    })
}

/// Up to 24 characters of `text` before (1-based) line:col and 8 after,
/// on that line, trimmed: where a syntax error points.
fn near(text: &str, line: usize, col: usize) -> Option<String> {
    let chars: Vec<char> = text.lines().nth(line.checked_sub(1)?)?.chars().collect();
    let at = col.saturating_sub(1).min(chars.len());
    let snippet: String = chars[at.saturating_sub(24)..(at + 8).min(chars.len())].iter().collect();
    let snippet = snippet.trim();
    (!snippet.is_empty()).then(|| snippet.to_string())
}

/// Reads a config file.
pub(crate) fn read_config(path: &Path) -> Result<String> {
    stage_types::input::read_regular_text(path, MAX_CONFIG_BYTES)
        .map_err(|source| SessionError::ReadConfig { path: path.to_path_buf(), source })
}
