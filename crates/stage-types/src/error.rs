//! Parse errors for stage names, stage lists and index ranges.

use std::fmt;

/// Why a stage name, stage list, layer range or step range did not parse,
/// or does not fit the model.
///
/// Every variant names the bad token and the valid choices, so the message
/// alone is enough to fix the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    /// A stage name that is not one of the canonical names or aliases.
    UnknownStage {
        /// The token as the user wrote it.
        token: String,
    },
    /// A stage list with no stage in it (empty string or only commas).
    EmptyStageList,
    /// A layer or step range that is not `all`, `N`, `A..B` or a comma list
    /// of those.
    BadRange {
        /// What was being parsed: `"layer"` or `"step"`.
        what: &'static str,
        /// The offending token.
        token: String,
        /// Why it is wrong.
        reason: &'static str,
    },
    /// A range that parses but reaches past the end of the model (or run).
    OutOfBounds {
        /// What was being checked: `"layer"` or `"step"`.
        what: &'static str,
        /// The offending token.
        token: String,
        /// How many there are; valid indices are `0..count`.
        count: usize,
    },
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::UnknownStage { token } => write!(
                f,
                "unknown stage `{token}`; valid stages: all, {}, and the alias layer_output (= post_ffn_residual)",
                crate::SaveTensorStage::ALL.iter().map(|s| s.name()).collect::<Vec<_>>().join(", ")
            ),
            ParseError::EmptyStageList => {
                write!(f, "empty stage list; write `all` or comma-separated stage names such as `ffn_norm,moe_router`")
            }
            ParseError::BadRange { what, token, reason } => write!(
                f,
                "bad {what} range `{token}`: {reason}; write `all`, one index such as `3`, a span such as `0..4` (end exclusive), or a comma list such as `0..2,7`"
            ),
            ParseError::OutOfBounds { what, token, count } => {
                if *count == 0 {
                    write!(f, "{what} range `{token}` selects {what}s that do not exist: there are none")
                } else {
                    write!(
                        f,
                        "{what} range `{token}` is outside the valid {what}s 0..{count} (there are {count}; valid: `all`, 0..{count}, or any index 0 to {})",
                        count - 1
                    )
                }
            }
        }
    }
}

impl std::error::Error for ParseError {}
