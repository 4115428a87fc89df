//! Outliers among local errors. A stage's local error (what it adds when
//! fed exactly the reference's inputs) is judged against the same stage's
//! errors over every layer and step of the run, robustly (median and MAD
//! of log10 of the worst row error), as well as against the dtype
//! tolerance. The row-level error is the unit because a real bug often
//! hits one token or one expert slot: 5% wrong on one expert of one token
//! among 64 moves a whole-tensor rel_l2 less than bf16 rounding does.

use serde::{Deserialize, Serialize};

use crate::report::Row;

/// Robust z above which a row error is an outlier (with the floors below).
pub const Z_THRESHOLD: f64 = 6.0;

/// Smallest spread assumed, in decades: errors within a factor of
/// 10^(Z_THRESHOLD * this) = 4x of a stage's median are never outliers,
/// however tight its distribution.
pub const MIN_SPREAD_DECADES: f64 = 0.1;

/// Below this fraction of the tolerance an error is never an outlier by
/// its z alone: a stage that is exact almost everywhere does not flag a
/// rounding-sized difference.
pub const TOLERANCE_FLOOR: f64 = 1.0 / 30.0;

/// Why a row is an outlier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutlierReason {
    /// A value is NaN or Inf on the target only, or on both sides where
    /// they differ.
    NonFinite,
    /// The worst row error is above the stage's rel_l2 tolerance.
    AboveTolerance,
    /// Far above the stage's own distribution over the run.
    FarAboveStage,
}

/// How a row's local error stands against its stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outlier {
    /// Why it is an outlier.
    pub reason: OutlierReason,
    /// Robust z of log10(worst row error) within the stage.
    #[serde(with = "crate::json_float::float")]
    pub z: f64,
    /// The stage's median worst row error over the run.
    #[serde(with = "crate::json_float::float")]
    pub stage_median: f64,
}

fn median(sorted: &[f64]) -> f64 {
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => 0.5 * (sorted[n / 2 - 1] + sorted[n / 2]),
    }
}

/// log10 of an error, with exact agreement (0) taken as 1e-12.
fn decades(e: f64) -> f64 {
    e.max(1e-12).log10()
}

/// Marks every row whose worst row error is an outlier for its stage
/// (sets `row.outlier`; clears it elsewhere). Rows without metrics are
/// left alone.
pub fn mark_outliers(rows: &mut [Row]) {
    let mut stages: Vec<_> = rows.iter().filter(|r| r.metrics.is_some()).map(|r| r.stage).collect();
    stages.sort();
    stages.dedup();
    for stage in stages {
        let mut logs: Vec<f64> = rows
            .iter()
            .filter(|r| r.stage == stage)
            .filter_map(|r| r.metrics.as_ref())
            .map(|m| m.worst_row_error)
            .filter(|e| e.is_finite())
            .map(decades)
            .collect();
        logs.sort_by(f64::total_cmp);
        let center = median(&logs);
        let mut deviations: Vec<f64> = logs.iter().map(|x| (x - center).abs()).collect();
        deviations.sort_by(f64::total_cmp);
        let spread = (1.4826 * median(&deviations)).max(MIN_SPREAD_DECADES);
        for row in rows.iter_mut().filter(|r| r.stage == stage) {
            let Some(m) = &row.metrics else { continue };
            let e = m.worst_row_error;
            let z = if e.is_finite() { (decades(e) - center) / spread } else { f64::INFINITY };
            let reason = if !e.is_finite() || m.target_nan + m.target_inf > m.ref_nan + m.ref_inf {
                Some(OutlierReason::NonFinite)
            } else if e > row.tolerance {
                Some(OutlierReason::AboveTolerance)
            } else if z > Z_THRESHOLD && e > row.tolerance * TOLERANCE_FLOOR {
                Some(OutlierReason::FarAboveStage)
            } else {
                None
            };
            row.outlier = reason.map(|reason| Outlier { reason, z, stage_median: 10f64.powf(center) });
        }
    }
}

#[cfg(test)]
mod tests {
    use stage_types::SaveTensorStage as S;

    use super::*;
    use crate::tensor_metrics;

    fn row(stage: S, layer: usize, error: f64, tolerance: f64) -> Row {
        let mut r = Row::new(0, Some(layer), stage, tolerance);
        let a = vec![1.0; 8];
        let b: Vec<f64> =
            a.iter().enumerate().map(|(i, x)| if i == 0 { x + error * 8f64.sqrt() } else { *x }).collect();
        r.set_metrics(tensor_metrics(&a, &b, &[8], 0));
        r
    }

    #[test]
    fn one_stage_far_above_its_own_layers_is_an_outlier_and_nothing_else_is() {
        let mut rows: Vec<Row> = (0..48)
            .flat_map(|l| {
                let jitter = 1.0 + 0.3 * ((l * 7 % 5) as f64 / 5.0);
                [row(S::AttnOut, l, 3e-3 * jitter, 3e-2), row(S::MoeExpertOut, l, 2e-3 * jitter, 3e-2)]
            })
            .collect();
        // Layer 30's expert output 5% off on one row: below the tolerance,
        // far above the stage.
        rows[61] = row(S::MoeExpertOut, 30, 2.4e-2, 3e-2);
        mark_outliers(&mut rows);
        let flagged: Vec<(S, Option<usize>)> =
            rows.iter().filter(|r| r.outlier.is_some()).map(|r| (r.stage, r.layer)).collect();
        assert_eq!(flagged, [(S::MoeExpertOut, Some(30))]);
        let o = rows[61].outlier.as_ref().unwrap();
        assert_eq!(o.reason, OutlierReason::FarAboveStage);
        assert!(o.z > Z_THRESHOLD && (o.stage_median - 2.4e-3).abs() < 1e-3, "{o:?}");
    }

    #[test]
    fn exact_stages_do_not_flag_rounding_and_tolerance_and_nan_always_flag() {
        let mut rows: Vec<Row> = (0..10).map(|l| row(S::Embedding, l, 0.0, 3e-2)).collect();
        rows.push(row(S::Embedding, 10, 1e-4, 3e-2));
        rows.push(row(S::Embedding, 11, 5e-2, 3e-2));
        mark_outliers(&mut rows);
        assert!(rows[10].outlier.is_none());
        assert_eq!(rows[11].outlier.as_ref().unwrap().reason, OutlierReason::AboveTolerance);
        let mut nan = Row::new(0, Some(0), S::AttnOut, 3e-2);
        nan.set_metrics(tensor_metrics(&[1.0, 2.0], &[1.0, f64::NAN], &[2], 0));
        let mut rows = vec![nan];
        mark_outliers(&mut rows);
        assert_eq!(rows[0].outlier.as_ref().unwrap().reason, OutlierReason::NonFinite);
    }
}
