//! Local errors judged against the error a correct implementation makes.
//!
//! bisect runs a third pass beside the reference and the target: the CPU
//! emulating the target's numeric contract (its rounding points), fed the
//! same inputs. Each row of each (step, layer, stage) tensor then has two
//! errors against the reference: the target's, and the emulation's (what
//! the contract's precision explains, measured on that very row). A row is
//! judged by their ratio, above an error floor, so rows of a prompt and of
//! a decode step, of any stage, layer or kernel path, are on one scale and
//! need no shared distribution: a clean run's ratios sit near 1.
//!
//! Which rows that makes findings, and how they are grouped: findings.rs.

use serde::{Deserialize, Serialize};

/// A row whose error is more than this many times its expected error is
/// a finding. A correct implementation's rows sit near 1 (the emulation
/// rounds the same values); 0.5% noise on a bf16 row of ~1.7e-3 rounding
/// error gives about 3.2.
pub const RATIO_THRESHOLD: f64 = 2.0;

/// Findings of one stage and phase in at least this many places are one
/// systematic finding.
pub const SYSTEMATIC_MIN: usize = 3;

/// How a tensor's rows stand against their expected errors: its worst row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Expected {
    /// The largest ratio over the rows: the row's error over its expected
    /// error (at least the floor).
    #[serde(with = "crate::json_float::float")]
    pub ratio: f64,
    /// That row (flat index over all dimensions but the last; for
    /// per-expert stages, the compared (token, slot) rows in order).
    pub row: usize,
    /// That row's error, relative to the tensor's RMS row norm.
    #[serde(with = "crate::json_float::float")]
    pub error: f64,
    /// That row's expected error on the same scale (the emulation's, or
    /// the floor).
    #[serde(with = "crate::json_float::float")]
    pub expected: f64,
    /// The floor applied to every row's expected error.
    #[serde(with = "crate::json_float::float")]
    pub floor: f64,
    /// The emulation's whole-tensor rel_l2.
    #[serde(default, with = "crate::json_float::float")]
    pub emulated_rel_l2: f64,
    /// The largest ratio with the floor raised [`ACCUMULATED_FLOOR_FACTOR`]
    /// times: what free-running verdicts judge (an f32 contract's emulation
    /// is the reference itself, and errors accumulated in f32 over a run
    /// are above one stage's).
    #[serde(default, with = "crate::json_float::float")]
    pub accumulated_ratio: f64,
    /// The emulation replicates the target's arithmetic: `error` is the
    /// row's distance from the emulation's, and `expected` the floor.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub from_replay: bool,
}

impl Expected {
    /// The worst ratio of rows with errors `target[i]`, expected errors
    /// `expected[i]` (None where the emulation has no such row, e.g. a
    /// token it routed differently: then the median of the others), and
    /// `floor`. None for a tensor without rows.
    pub fn from_rows(target: &[f64], expected: &[Option<f64>], floor: f64) -> Option<Expected> {
        let mut known: Vec<f64> = expected.iter().flatten().copied().filter(|e| e.is_finite()).collect();
        known.sort_by(f64::total_cmp);
        let fallback = known.get(known.len() / 2).copied().unwrap_or(0.0);
        let mut worst: Option<Expected> = None;
        let mut accumulated_ratio = 0.0f64;
        for (row, &error) in target.iter().enumerate() {
            let own = expected.get(row).copied().flatten().filter(|e| e.is_finite()).unwrap_or(fallback);
            let over = |floor: f64| if error == 0.0 { 0.0 } else { error / own.max(floor) };
            let ratio = over(floor);
            let accumulated = over(floor * ACCUMULATED_FLOOR_FACTOR);
            if accumulated > accumulated_ratio || accumulated.is_nan() {
                accumulated_ratio = accumulated;
            }
            if worst.as_ref().is_none_or(|w| ratio > w.ratio || (ratio.is_nan() && !w.ratio.is_nan())) {
                let expected = own.max(floor);
                worst = Some(Expected {
                    ratio,
                    row,
                    error,
                    expected,
                    floor,
                    emulated_rel_l2: 0.0,
                    accumulated_ratio: 0.0,
                    from_replay: false,
                });
            }
        }
        worst.map(|w| Expected { accumulated_ratio, ..w })
    }

    /// Sets [`Expected::emulated_rel_l2`].
    pub fn with_emulated_rel_l2(mut self, rel_l2: f64) -> Self {
        self.emulated_rel_l2 = rel_l2;
        self
    }

    /// Marks the errors as distances from a replaying emulation
    /// ([`Expected::from_replay`]).
    pub fn from_replay(mut self, replay: bool) -> Self {
        self.from_replay = replay;
        self
    }
}

/// In free-running comparisons a tensor has diverged when a row's error
/// is more than this many times the emulation's on that row: errors
/// accumulated over the run vary more between two correct implementations
/// (each rounds its own inputs) than one stage's own error does.
pub const ACCUMULATED_RATIO_THRESHOLD: f64 = 4.0;

/// Free-running verdicts raise each row's error floor this many times
/// (1e-4 of a row for an f32 contract, the old f32 tolerance).
pub const ACCUMULATED_FLOOR_FACTOR: f64 = 10.0;

/// Why a row is a finding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FindingReason {
    /// A value is NaN or Inf on the target where the reference has none
    /// (or fewer).
    NonFinite,
    /// A row's error is more than [`RATIO_THRESHOLD`] times its expected
    /// error.
    AboveExpected,
    /// No expected error is known (no emulation) and the tensor's rel_l2
    /// is above the fixed tolerance.
    AboveTolerance,
    /// Expert sets differ on a token with a clear margin.
    WrongRouter,
}

impl FindingReason {
    /// Short label for text and HTML.
    pub fn label(self) -> &'static str {
        match self {
            FindingReason::NonFinite => "non-finite",
            FindingReason::AboveExpected => "above expected",
            FindingReason::AboveTolerance => "above tolerance",
            FindingReason::WrongRouter => "wrong router",
        }
    }
}
