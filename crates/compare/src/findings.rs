//! Findings from the expected-error model ([`crate::expected`]): which
//! rows are findings and why, free-running verdicts, findings that share a
//! cause grouped (the same stage and phase flagged in
//! [`SYSTEMATIC_MIN`] or more places is one systematic finding, listed
//! after the lone ones), and a clean run's margins.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use stage_types::SaveTensorStage;

use crate::Verdict;
use crate::expected::{
    ACCUMULATED_FLOOR_FACTOR, ACCUMULATED_RATIO_THRESHOLD, FindingReason, RATIO_THRESHOLD, SYSTEMATIC_MIN,
};
use crate::row::Row;

/// Free-running verdicts from the expected-error model: every row with an
/// expected error and finite values is `Diverged` exactly when a row is
/// more than [`ACCUMULATED_RATIO_THRESHOLD`] times the emulation's error on
/// that row (at least [`ACCUMULATED_FLOOR_FACTOR`] times the floor:
/// [`Expected::accumulated_ratio`]), not when its rel_l2 passes a
/// fixed tolerance; `tolerance` becomes the bound on rel_l2 that the same
/// ratio gives the emulation's rel_l2, for the reader. A stage for which
/// `user_tolerance` gives one (set by the user) keeps its fixed verdict.
pub fn judge_accumulated(rows: &mut [Row], user_tolerance: &dyn Fn(SaveTensorStage) -> Option<f64>) {
    for row in rows {
        let (Some(e), Some(m)) = (&row.expected, &row.metrics) else { continue };
        if !matches!(row.verdict, Verdict::Ok | Verdict::Diverged)
            || m.has_non_finite()
            || user_tolerance(row.stage).is_some()
        {
            continue;
        }
        row.tolerance = ACCUMULATED_RATIO_THRESHOLD * e.emulated_rel_l2.max(e.floor * ACCUMULATED_FLOOR_FACTOR);
        let ratio = e.accumulated_ratio;
        row.verdict =
            if ratio.is_nan() || ratio > ACCUMULATED_RATIO_THRESHOLD { Verdict::Diverged } else { Verdict::Ok };
    }
}

/// Sets `row.finding` on every row (None on the others).
pub fn mark_findings(rows: &mut [Row]) {
    for row in rows {
        row.finding = finding_of(row);
    }
}

/// Why `row` is a finding, if it is one.
pub(crate) fn finding_of(row: &Row) -> Option<FindingReason> {
    if matches!(row.verdict, Verdict::WrongRouter) {
        return Some(FindingReason::WrongRouter);
    }
    let m = row.metrics.as_ref()?;
    if m.target_nan + m.target_inf > m.ref_nan + m.ref_inf {
        return Some(FindingReason::NonFinite);
    }
    match &row.expected {
        Some(e) if e.ratio.is_nan() || e.ratio > RATIO_THRESHOLD => Some(FindingReason::AboveExpected),
        Some(_) => None,
        None if m.rel_l2.is_nan() || m.rel_l2 > row.tolerance => Some(FindingReason::AboveTolerance),
        None => None,
    }
}

/// Where a step stands: the prompt (step 0) or a decode step. Kernel paths
/// differ between them (many rows against one), so findings and margins
/// are kept per phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Step 0: the whole prompt.
    Prompt,
    /// A step after the prompt: one token.
    Decode,
}

impl Phase {
    /// The phase of `step`.
    pub fn of(step: usize) -> Phase {
        if step == 0 { Phase::Prompt } else { Phase::Decode }
    }

    /// `prompt step` or `decode steps`.
    pub fn label(self) -> &'static str {
        match self {
            Phase::Prompt => "prompt step",
            Phase::Decode => "decode steps",
        }
    }
}

/// Findings grouped by cause: lone ones in run order, then one per stage
/// and phase flagged in many places.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Findings {
    /// Indices (into the report's rows) of findings that stand alone.
    pub lone: Vec<usize>,
    /// Stages flagged in [`SYSTEMATIC_MIN`] or more places of one phase.
    pub systematic: Vec<Systematic>,
}

/// One stage of one phase flagged in many places: one cause (a kernel
/// path that departs from the contract), one line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Systematic {
    /// The stage.
    #[serde(with = "crate::row::stage_name")]
    pub stage: SaveTensorStage,
    /// The phase.
    pub phase: Phase,
    /// The places flagged, as (step, layer), in run order.
    pub places: Vec<(usize, Option<usize>)>,
    /// How many (step, layer) places of this stage and phase were compared.
    pub compared: usize,
    /// Distinct layers flagged.
    pub layers: Vec<usize>,
    /// Distinct layers of this stage and phase compared.
    pub layers_compared: usize,
    /// The smallest and largest ratio to the expected error among them.
    #[serde(with = "crate::json_float::float")]
    pub min_ratio: f64,
    /// See `min_ratio`.
    #[serde(with = "crate::json_float::float")]
    pub max_ratio: f64,
    /// Indices of the rows (into the report's rows).
    pub rows: Vec<usize>,
}

/// Groups the flagged rows of `rows` (those with `finding` set).
pub fn group_findings(rows: &[Row]) -> Findings {
    let mut by_cause: BTreeMap<(SaveTensorStage, Phase), Vec<usize>> = BTreeMap::new();
    for (i, r) in rows.iter().enumerate().filter(|(_, r)| r.finding.is_some()) {
        by_cause.entry((r.stage, Phase::of(r.step))).or_default().push(i);
    }
    let mut out = Findings::default();
    for ((stage, phase), members) in by_cause {
        if members.len() < SYSTEMATIC_MIN {
            out.lone.extend(members);
            continue;
        }
        let same = |r: &&Row| r.stage == stage && Phase::of(r.step) == phase;
        let compared = rows.iter().filter(same).count();
        let mut layers_compared: Vec<usize> = rows.iter().filter(same).filter_map(|r| r.layer).collect();
        layers_compared.sort_unstable();
        layers_compared.dedup();
        let mut layers: Vec<usize> = members.iter().filter_map(|&i| rows[i].layer).collect();
        layers.sort_unstable();
        layers.dedup();
        let ratios: Vec<f64> = members.iter().map(|&i| ratio_of(&rows[i])).collect();
        out.systematic.push(Systematic {
            stage,
            phase,
            places: members.iter().map(|&i| (rows[i].step, rows[i].layer)).collect(),
            compared,
            layers,
            layers_compared: layers_compared.len(),
            min_ratio: ratios.iter().copied().fold(f64::INFINITY, f64::min),
            max_ratio: ratios.iter().copied().fold(0.0, f64::max),
            rows: members,
        });
    }
    out.lone.sort_unstable();
    out
}

/// A row's ratio to its expected error (infinite for a non-finite or
/// wrong-router finding without one; 0 without metrics).
pub fn ratio_of(row: &Row) -> f64 {
    match (&row.expected, row.finding) {
        (Some(e), _) => e.ratio,
        (None, Some(_)) => f64::INFINITY,
        (None, None) => 0.0,
    }
}

/// The largest ratio to the expected error seen for one stage in one
/// phase: the margin a clean run keeps to [`RATIO_THRESHOLD`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Margin {
    /// The stage.
    #[serde(with = "crate::row::stage_name")]
    pub stage: SaveTensorStage,
    /// The phase.
    pub phase: Phase,
    /// The largest ratio.
    #[serde(with = "crate::json_float::float")]
    pub ratio: f64,
    /// Where it was.
    pub step: usize,
    /// Where it was.
    pub layer: Option<usize>,
}

/// The largest ratio per stage and phase, in stage order.
pub fn margins(rows: &[Row]) -> Vec<Margin> {
    let mut best: BTreeMap<(usize, Phase), Margin> = BTreeMap::new();
    for r in rows {
        let Some(e) = &r.expected else { continue };
        let key = (r.stage.index(), Phase::of(r.step));
        let entry = best.entry(key).or_insert(Margin {
            stage: r.stage,
            phase: key.1,
            ratio: f64::NEG_INFINITY,
            step: r.step,
            layer: r.layer,
        });
        if e.ratio > entry.ratio || e.ratio.is_nan() {
            *entry = Margin { stage: r.stage, phase: key.1, ratio: e.ratio, step: r.step, layer: r.layer };
        }
    }
    best.into_values().collect()
}

#[cfg(test)]
mod tests {
    use stage_types::SaveTensorStage as S;

    use super::*;
    use crate::expected::Expected;
    use crate::tensor_metrics;

    fn row(step: usize, stage: S, layer: usize, ratio: f64) -> Row {
        let mut r = Row::new(step, Some(layer), stage, 3e-2);
        r.set_metrics(tensor_metrics(
            crate::Elements::F64(&[1.0, 2.0]),
            crate::Elements::F64(&[1.0, 2.0 + 1e-3 * ratio]),
            &[2],
            0,
        ));
        r.expected = Some(Expected {
            ratio,
            row: 0,
            error: 1e-3 * ratio,
            expected: 1e-3,
            floor: 1e-4,
            emulated_rel_l2: 1e-3,
            accumulated_ratio: ratio,
            from_replay: false,
        });
        r
    }

    #[test]
    fn the_worst_row_is_judged_over_its_own_expectation_and_the_floor() {
        // Row 0: twice its expectation; row 1: large but expected; row 2:
        // exact in the emulation, so judged over the floor; row 3: missing
        // in the emulation, judged over the median of the others.
        let e =
            Expected::from_rows(&[2e-3, 9e-3, 5e-5, 1e-3], &[Some(1e-3), Some(1e-2), Some(0.0), None], 1e-4).unwrap();
        assert_eq!(e.row, 0);
        assert!((e.ratio - 2.0).abs() < 1e-12, "{e:?}");
        let e = Expected::from_rows(&[0.0, 4e-4], &[Some(0.0), Some(0.0)], 1e-4).unwrap();
        assert_eq!((e.row, e.expected), (1, 1e-4));
        assert!((e.ratio - 4.0).abs() < 1e-12);
        assert!(Expected::from_rows(&[], &[], 1e-4).is_none());
    }

    #[test]
    fn a_stage_flagged_in_every_layer_is_one_systematic_finding_after_the_lone_ones() {
        // The old false-positive shape: the prompt's router logits from a
        // kernel path of coarser precision than the decode path's, in all
        // 48 layers; plus one real fault at a decode step.
        let mut rows = Vec::new();
        for layer in 0..48 {
            rows.push(row(0, S::MoeRouterLogits, layer, 40.0 + layer as f64 * 0.1));
            rows.push(row(0, S::AttnOut, layer, 1.0));
            for step in 1..4 {
                rows.push(row(step, S::MoeRouterLogits, layer, 1.1));
                let ratio = if step == 2 && layer == 37 { 13.0 } else { 1.05 };
                rows.push(row(step, S::MoeExpertOut, layer, ratio));
            }
        }
        mark_findings(&mut rows);
        let found = group_findings(&rows);
        assert_eq!(found.lone.len(), 1);
        let lone = &rows[found.lone[0]];
        assert_eq!((lone.step, lone.layer, lone.stage), (2, Some(37), S::MoeExpertOut));
        assert_eq!(found.systematic.len(), 1);
        let s = &found.systematic[0];
        assert_eq!((s.stage, s.phase, s.layers.len(), s.layers_compared), (S::MoeRouterLogits, Phase::Prompt, 48, 48));
        assert!(s.min_ratio >= 40.0 && s.max_ratio < 45.0);
        let m = margins(&rows);
        let decode_logits = m.iter().find(|m| m.stage == S::MoeRouterLogits && m.phase == Phase::Decode).unwrap();
        assert!((decode_logits.ratio - 1.1).abs() < 1e-12);
    }

    #[test]
    fn nan_and_wrong_router_are_findings_without_an_expectation() {
        let mut nan = Row::new(0, Some(0), S::AttnOut, 3e-2);
        nan.set_metrics(tensor_metrics(
            crate::Elements::F64(&[1.0, 2.0]),
            crate::Elements::F64(&[1.0, f64::NAN]),
            &[2],
            0,
        ));
        let mut clean = row(0, S::AttnOut, 1, 1.9);
        clean.expected.as_mut().unwrap().ratio = 1.9;
        let mut rows = vec![nan, clean];
        mark_findings(&mut rows);
        assert_eq!(rows[0].finding, Some(FindingReason::NonFinite));
        assert_eq!(rows[1].finding, None);
    }
}
