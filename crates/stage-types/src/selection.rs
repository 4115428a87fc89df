//! Selections other tools reuse: [`StageList`] (which stages) and
//! [`IndexSet`] (which layers or steps).

use std::fmt;
use std::str::FromStr;

use crate::{ParseError, SaveTensorStage};

/// A set of stages: `all`, or a comma-separated list of names and aliases.
///
/// Stored as a bitset over [`SaveTensorStage::ALL`]; iteration is in
/// execution order whatever order the list was written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct StageList {
    bits: u64,
}

impl StageList {
    /// Every stage.
    pub fn all() -> Self {
        Self::from_stages(SaveTensorStage::ALL.iter().copied())
    }

    /// No stage.
    pub fn none() -> Self {
        Self { bits: 0 }
    }

    /// The set of the given stages.
    pub fn from_stages(stages: impl IntoIterator<Item = SaveTensorStage>) -> Self {
        let mut list = Self::none();
        for stage in stages {
            list.insert(stage);
        }
        list
    }

    /// Adds one stage.
    pub fn insert(&mut self, stage: SaveTensorStage) {
        self.bits |= 1 << stage.index();
    }

    /// Whether the stage is selected.
    pub fn contains(&self, stage: SaveTensorStage) -> bool {
        self.bits & (1 << stage.index()) != 0
    }

    /// True when nothing is selected.
    pub fn is_empty(&self) -> bool {
        self.bits == 0
    }

    /// Number of selected stages.
    pub fn len(&self) -> usize {
        self.bits.count_ones() as usize
    }

    /// Selected stages in execution order.
    pub fn iter(&self) -> impl Iterator<Item = SaveTensorStage> + '_ {
        SaveTensorStage::ALL.iter().copied().filter(|s| self.contains(*s))
    }
}

impl FromStr for StageList {
    type Err = ParseError;

    /// `all` (any case) or comma-separated stage names; whitespace around
    /// names and empty items between commas are ignored.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim().eq_ignore_ascii_case("all") {
            return Ok(Self::all());
        }
        let mut list = Self::none();
        for token in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            if token.eq_ignore_ascii_case("all") {
                list = Self::all();
            } else {
                list.insert(token.parse()?);
            }
        }
        if list.is_empty() {
            return Err(ParseError::EmptyStageList);
        }
        Ok(list)
    }
}

impl fmt::Display for StageList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if *self == Self::all() {
            return f.write_str("all");
        }
        let names: Vec<_> = self.iter().map(|s| s.name()).collect();
        f.write_str(&names.join(","))
    }
}

/// One span of indices, `start..end` with `end` exclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IndexSpan {
    /// First index in the span.
    pub start: usize,
    /// One past the last index.
    pub end: usize,
}

/// A selection of layer or step indices: `all`, one index `3`, a span `0..4`
/// (end exclusive), or a comma list of those (`0..2,7`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum IndexSet {
    /// Every index.
    All,
    /// The union of these spans, as written.
    Spans {
        /// The spans, each non-empty.
        spans: Vec<IndexSpan>,
        /// The text it was parsed from, for error messages.
        text: String,
    },
}

impl IndexSet {
    /// Parses a layer range (`what` = "layer" in error messages).
    pub fn parse_layers(s: &str) -> Result<Self, ParseError> {
        Self::parse(s, "layer")
    }

    /// Parses a step range (`what` = "step" in error messages).
    pub fn parse_steps(s: &str) -> Result<Self, ParseError> {
        Self::parse(s, "step")
    }

    /// Parses `all`, `N`, `A..B` or a comma list of them. `what` names the
    /// kind of index in error messages ("layer", "step").
    pub fn parse(s: &str, what: &'static str) -> Result<Self, ParseError> {
        let text = s.trim();
        if text.eq_ignore_ascii_case("all") {
            return Ok(IndexSet::All);
        }
        let bad = |token: &str, reason: &'static str| ParseError::BadRange { what, token: token.to_string(), reason };
        let number = |token: &str, whole: &str| -> Result<usize, ParseError> {
            let token = token.trim();
            token.parse::<usize>().map_err(|_| {
                if !token.is_empty() && token.bytes().all(|b| b.is_ascii_digit()) {
                    bad(whole, "an index too large for this machine")
                } else {
                    bad(whole, "not a non-negative integer")
                }
            })
        };
        let mut spans = Vec::new();
        for item in text.split(',').map(str::trim) {
            if item.is_empty() {
                return Err(bad(text, "empty item"));
            }
            if item.eq_ignore_ascii_case("all") {
                return Ok(IndexSet::All);
            }
            let span = match item.split_once("..") {
                Some((a, b)) => {
                    let start = number(a, item)?;
                    let end = number(b, item)?;
                    if end <= start {
                        return Err(bad(item, "the end must be greater than the start (end is exclusive)"));
                    }
                    IndexSpan { start, end }
                }
                None => {
                    let index = number(item, item)?;
                    let end = index.checked_add(1).ok_or_else(|| bad(item, "an index too large for this machine"))?;
                    IndexSpan { start: index, end }
                }
            };
            spans.push(span);
        }
        Ok(IndexSet::Spans { spans, text: text.to_string() })
    }

    /// Whether `index` is selected.
    pub fn contains(&self, index: usize) -> bool {
        match self {
            IndexSet::All => true,
            IndexSet::Spans { spans, .. } => spans.iter().any(|s| (s.start..s.end).contains(&index)),
        }
    }

    /// Checks that every selected index is below `count`; `what` names the
    /// kind of index in the error ("layer", "step").
    pub fn check_within(&self, count: usize, what: &'static str) -> Result<(), ParseError> {
        match self {
            IndexSet::All => Ok(()),
            IndexSet::Spans { spans, text } => {
                if spans.iter().any(|s| s.end > count) {
                    Err(ParseError::OutOfBounds { what, token: text.clone(), count })
                } else {
                    Ok(())
                }
            }
        }
    }
}

impl fmt::Display for IndexSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IndexSet::All => f.write_str("all"),
            IndexSet::Spans { text, .. } => f.write_str(text),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use SaveTensorStage as S;

    #[test]
    fn all_selects_every_stage_in_any_case() {
        for text in ["all", "ALL", " All "] {
            let list: StageList = text.parse().unwrap();
            assert_eq!(list.len(), S::ALL.len());
            assert_eq!(list.to_string(), "all");
        }
    }

    #[test]
    fn stage_lists_iterate_in_execution_order() {
        let list: StageList = "lm_head, Embedding,moe_router ,".parse().unwrap();
        let got: Vec<_> = list.iter().collect();
        assert_eq!(got, [S::Embedding, S::MoeRouter, S::LmHead]);
        assert_eq!(list.to_string(), "embedding,moe_router,lm_head");
        assert_eq!(list.to_string().parse::<StageList>(), Ok(list));
    }

    #[test]
    fn stage_list_accepts_the_alias() {
        let list: StageList = "layer_output".parse().unwrap();
        assert!(list.contains(S::PostFfnResidual));
        assert_eq!(list.len(), 1);
    }

    #[test]
    fn stage_list_rejects_unknown_and_empty() {
        let err = "ffn_norm,bogus".parse::<StageList>().unwrap_err();
        assert_eq!(err, ParseError::UnknownStage { token: "bogus".into() });
        assert_eq!(" , ".parse::<StageList>(), Err(ParseError::EmptyStageList));
        assert!(ParseError::EmptyStageList.to_string().contains("all"));
    }

    #[test]
    fn indices_too_large_are_errors_not_wrapped_spans() {
        for text in ["18446744073709551615", "99999999999999999999", "0..18446744073709551616"] {
            let err = IndexSet::parse_layers(text).unwrap_err().to_string();
            assert!(err.contains("too large"), "{text}: {err}");
        }
        let last = IndexSet::parse_layers("18446744073709551614").unwrap();
        assert!(last.contains(usize::MAX - 1) && !last.contains(usize::MAX));
    }

    #[test]
    fn index_sets_parse_all_single_span_and_lists() {
        assert_eq!(IndexSet::parse_layers("all"), Ok(IndexSet::All));
        let one = IndexSet::parse_layers("3").unwrap();
        assert!(one.contains(3) && !one.contains(2) && !one.contains(4));
        let span = IndexSet::parse_layers(" 0..4 ").unwrap();
        assert!((0..4).all(|i| span.contains(i)) && !span.contains(4));
        let list = IndexSet::parse_steps("0..2, 7").unwrap();
        assert!(list.contains(0) && list.contains(1) && !list.contains(2) && list.contains(7));
        assert_eq!(list.to_string(), "0..2, 7");
        assert!(IndexSet::All.contains(usize::MAX));
    }

    #[test]
    fn index_sets_reject_bad_tokens_with_the_token_and_the_forms() {
        for (text, token) in
            [("a..3", "a..3"), ("4..2", "4..2"), ("3..3", "3..3"), ("-1", "-1"), ("1,,2", "1,,2"), ("", "")]
        {
            let err = IndexSet::parse_layers(text).unwrap_err();
            match &err {
                ParseError::BadRange { what, token: t, .. } => {
                    assert_eq!(*what, "layer");
                    assert_eq!(t, token, "{text}");
                }
                other => panic!("{text}: {other:?}"),
            }
            let msg = err.to_string();
            assert!(msg.contains("0..4") && msg.contains("all"), "{msg}");
        }
    }

    #[test]
    fn index_sets_check_bounds_against_the_count() {
        let set = IndexSet::parse_layers("2..6").unwrap();
        assert!(set.check_within(6, "layer").is_ok());
        let err = set.check_within(4, "layer").unwrap_err();
        assert_eq!(err, ParseError::OutOfBounds { what: "layer", token: "2..6".into(), count: 4 });
        let msg = err.to_string();
        assert!(msg.contains("`2..6`") && msg.contains("0..4"), "{msg}");
        assert!(IndexSet::All.check_within(0, "step").is_ok());
        assert!(IndexSet::parse_steps("0").unwrap().check_within(0, "step").is_err());
    }
}
