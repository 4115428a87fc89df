//! A report summed up per stage ([`stage_table`]): how far each stage is
//! from the reference over every step and layer compared (rel_l2, median
//! and largest), its worst row against that row's expected error (or its
//! distance from a replay of the target's arithmetic, against the floor),
//! and its findings. What a person reads first of a whole-model check.

use std::collections::BTreeMap;
use std::fmt::Write;

use stage_types::SaveTensorStage;

use crate::report::Report;

#[derive(Default)]
struct StageSummary {
    rel_l2: Vec<f64>,
    /// The row with the largest ratio: (ratio, error, expected).
    worst: Option<(f64, f64, f64)>,
    from_replay: bool,
    findings: usize,
}

/// A plain-text table, one line per stage compared, in execution order.
pub fn stage_table(report: &Report) -> String {
    let mut stages: BTreeMap<SaveTensorStage, StageSummary> = BTreeMap::new();
    for row in &report.rows {
        let Some(m) = &row.metrics else { continue };
        let s = stages.entry(row.stage).or_default();
        s.rel_l2.push(m.rel_l2);
        if let Some(e) = &row.expected {
            if s.worst.is_none_or(|w| e.ratio > w.0 || e.ratio.is_nan()) {
                s.worst = Some((e.ratio, e.error, e.expected));
            }
            s.from_replay |= e.from_replay;
        }
        s.findings += usize::from(row.finding.is_some());
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<20} {:>5} {:>10} {:>10} {:>12} {:>12} {:>8} {:>8}",
        "stage", "rows", "rel_l2 med", "rel_l2 max", "worst row", "expected", "ratio", "findings"
    );
    for (stage, s) in &mut stages {
        s.rel_l2.sort_by(f64::total_cmp);
        let median = s.rel_l2[s.rel_l2.len() / 2];
        let max = s.rel_l2.last().copied().unwrap_or(0.0);
        let (ratio, error, expected) = match s.worst {
            Some((r, e, x)) => (format!("{r:.2}"), format!("{e:.2e}"), format!("{x:.2e}")),
            None => ("-".into(), "-".into(), "-".into()),
        };
        let _ = writeln!(
            out,
            "{:<20} {:>5} {median:>10.2e} {max:>10.2e} {error:>12} {expected:>12} {ratio:>8} {:>8}",
            stage.name(),
            s.rel_l2.len(),
            s.findings
        );
    }
    if stages.values().any(|s| s.from_replay) {
        out.push_str(
            "(worst row: its distance from the CPU replaying the target's arithmetic; expected: the f32 floor)\n",
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::expected::Expected;
    use crate::row::Row;
    use crate::tensor_metrics;

    #[test]
    fn each_stage_gets_one_line_with_its_spread_worst_row_and_findings() {
        let mut report = Report::default();
        for (step, scale) in [(0usize, 1.0f64), (1, 3.0)] {
            let mut r = Row::new(step, Some(0), SaveTensorStage::AttnOut, 1e-4);
            r.set_metrics(tensor_metrics(
                crate::Elements::F64(&[1.0, 2.0]),
                crate::Elements::F64(&[1.0, 2.0 + 1e-3 * scale]),
                &[2],
                0,
            ));
            r.expected = Some(Expected {
                ratio: scale,
                row: 0,
                error: 1e-3 * scale,
                expected: 1e-3,
                floor: 1e-5,
                emulated_rel_l2: 0.0,
                accumulated_ratio: scale,
                from_replay: false,
            });
            if scale > 2.0 {
                r.finding = Some(crate::expected::FindingReason::AboveExpected);
            }
            report.rows.push(r);
        }
        let table = stage_table(&report);
        let line = table.lines().find(|l| l.starts_with("attn_out")).expect("a line for attn_out");
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(fields[1], "2", "{line}");
        assert_eq!(fields[4], "3.00e-3", "{line}");
        assert_eq!(fields[6], "3.00", "{line}");
        assert_eq!(fields[7], "1", "{line}");
        assert_eq!(table.lines().count(), 2, "{table}");
    }
}
