//! [`Report`]: the rows of a comparison, its first divergence (free
//! running) or its findings (local errors), the graft check (bisect), and
//! the human and JSON renderings. The JSON reads back
//! ([`Report::from_json`]) for `moetrace report`.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use stage_types::SaveTensorStage;

use crate::Verdict;
use crate::expected::FindingReason;
use crate::findings::{Findings, Margin, group_findings, margins};
use crate::row::{Row, ratio_text};

/// The `format` of report JSON; [`Report::from_json`] refuses others.
pub const REPORT_FORMAT: &str = "moetrace-report/2";

/// The most layers a report's rows may name (a model's bound, as
/// `pipeline::config::MAX_LAYERS`).
pub const MAX_REPORT_LAYERS: usize = 1024;

/// The most steps a report's rows may name (one per position at most,
/// `pipeline::config::MAX_POSITIONS`).
pub const MAX_REPORT_STEPS: usize = 1 << 24;

/// What the errors of a report mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Both runs free-running: each error is accumulated from everything
    /// upstream (diff, bisect).
    #[default]
    Accumulated,
    /// Each stage compared on the same inputs, teacher forcing stage by
    /// stage: the target fed the reference's (bisect --local), or the
    /// reference fed a capture's own (check): each error is what that
    /// stage adds.
    Local,
}

/// The margins of a local run in one line: the largest ratio to the
/// expected error overall (with its place), then per stage as
/// prompt/decode. None without expected errors.
pub(crate) fn margins_text(margins: &[Margin]) -> Option<String> {
    use crate::findings::Phase;
    let top = margins.iter().max_by(|a, b| a.ratio.total_cmp(&b.ratio))?;
    let mut stages: Vec<(SaveTensorStage, [Option<f64>; 2])> = Vec::new();
    for m in margins {
        if stages.last().is_none_or(|s| s.0 != m.stage) {
            stages.push((m.stage, [None, None]));
        }
        if let Some(last) = stages.last_mut() {
            last.1[usize::from(m.phase == Phase::Decode)] = Some(m.ratio);
        }
    }
    let each = |r: Option<f64>| r.map_or("-".into(), |r| if r.is_finite() { format!("{r:.2}") } else { "inf".into() });
    let per_stage: Vec<String> = stages.iter().map(|(s, [p, d])| format!("{s} {}/{}", each(*p), each(*d))).collect();
    Some(format!(
        "largest ratio to the expected error: {} at step {}{} {} (threshold {}x); per stage, prompt/decode: {}",
        ratio_text(top.ratio),
        top.step,
        top.layer.map(|l| format!(" layer {l}")).unwrap_or_default(),
        top.stage,
        crate::expected::RATIO_THRESHOLD,
        per_stage.join(", ")
    ))
}

/// Why a row is a finding, with its numbers.
pub(crate) fn finding_reason(r: &Row) -> String {
    let reason = r.finding.map_or("finding", FindingReason::label);
    match &r.expected {
        Some(e) if e.from_replay => format!(
            "{reason}: worst row {:.3e} from the replay of the target's arithmetic, {} the floor {:.0e}",
            e.error,
            ratio_text(e.ratio),
            e.expected
        ),
        Some(e) => format!(
            "{reason}: worst row error {:.3e} is {} its expected {:.3e}",
            e.error,
            ratio_text(e.ratio),
            e.expected
        ),
        None => format!("{reason}: {}", r.verdict.label()),
    }
}

/// `step 0 layer 1, step 0 layer 2, ...` (at most `max`, then a count).
pub(crate) fn places_text(places: &[(usize, Option<usize>)], max: usize) -> String {
    let mut parts: Vec<String> = places
        .iter()
        .take(max)
        .map(|(s, l)| match l {
            Some(l) => format!("step {s} layer {l}"),
            None => format!("step {s}"),
        })
        .collect();
    if places.len() > max {
        parts.push(format!("... {} in all", places.len()));
    }
    parts.join(", ")
}

fn table(rows: &[&Row]) -> String {
    let mut out = String::new();
    if !rows.is_empty() {
        out += &format!("\n{:<40} {:<26} details\n", "where", "verdict");
        for r in rows {
            out += &format!("{:<40} {:<26} {}\n", r.place(), r.verdict.label(), r.detail());
        }
    }
    out
}

/// What the graft check found at the first divergence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Graft {
    /// rel_l2 of the target's stage recomputed from the reference's inputs.
    #[serde(with = "crate::json_float::float")]
    pub rel_l2: f64,
    /// The verdict on that recomputation.
    pub verdict: Verdict,
    /// True when the stage itself is wrong (the recomputation diverges).
    pub stage_is_wrong: bool,
    /// When the stage only amplifies upstream drift: the stage with the
    /// largest jump in rel_l2 over the stage before it, and the ratio.
    pub largest_jump: Option<(String, f64)>,
    /// When the stage only amplifies upstream drift: the first row with a
    /// nonzero error (where the drift entered) and its rel_l2.
    #[serde(default)]
    pub first_error: Option<(String, f64)>,
}

/// The result of a comparison.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    /// Accumulated (free-running) or local errors.
    #[serde(default)]
    pub mode: Mode,
    /// What the reference was.
    pub reference: String,
    /// What the target was.
    pub target: String,
    /// Every row compared, in order.
    pub rows: Vec<Row>,
    /// Things the reader should know (steps not compared, forced runs...).
    #[serde(default)]
    pub notes: Vec<String>,
    /// The graft check, when bisect made one.
    pub graft: Option<Graft>,
}

impl Report {
    /// Puts each named token's text beside its index: `texts` holds every
    /// position's token text (prompt, then generated), `starts` each
    /// step's first position (a token index counts within its step).
    pub fn name_tokens(&mut self, texts: &[String], starts: &[(usize, usize)]) {
        if texts.is_empty() {
            return;
        }
        let text = |step: usize, token: usize| {
            let begin = starts.iter().find(|(s, _)| *s == step)?.1;
            texts.get(begin + token).cloned()
        };
        for row in &mut self.rows {
            row.worst_token_text = row.worst_token.and_then(|t| text(row.step, t));
            for f in &mut row.flipped {
                f.text = text(row.step, f.token);
            }
        }
    }

    /// The first row that is neither ok nor missing on one side (a tensor
    /// captured by one run only is a difference of selection, reported in
    /// the rows and notes, not a divergence of the computation).
    pub fn first_divergence(&self) -> Option<&Row> {
        self.rows.iter().find(|r| !r.verdict.is_ok() && !matches!(r.verdict, Verdict::Missing { .. }))
    }

    /// What a person must look at: for local errors, every row marked a
    /// finding (above its expected error, non-finite, or a wrong router; a
    /// routing flip on a near-tie is not one), in run order; for
    /// accumulated errors, the first divergence.
    pub fn findings(&self) -> Vec<&Row> {
        match self.mode {
            Mode::Local => self.rows.iter().filter(|r| r.finding.is_some()).collect(),
            Mode::Accumulated => self.first_divergence().into_iter().collect(),
        }
    }

    /// Local findings grouped by cause: lone ones first, then one per stage
    /// and phase flagged in many places ([`crate::expected::group_findings`]).
    pub fn grouped_findings(&self) -> Findings {
        group_findings(&self.rows)
    }

    /// The expert-parallel rank every member of a systematic group names,
    /// if they all name the same one.
    pub fn shared_rank(&self, group: &crate::findings::Systematic) -> Option<usize> {
        let ranks: std::collections::BTreeSet<Option<usize>> =
            group.rows.iter().map(|&i| self.rows[i].worst_rank).collect();
        match ranks.into_iter().collect::<Vec<_>>()[..] {
            [Some(r)] => Some(r),
            _ => None,
        }
    }

    /// How a systematic group reads: the rank its members share (`, rank
    /// r in each`, or nothing) and its one cause (a kernel path, that
    /// rank's part of the work, or a constant: each member's error the same
    /// vector on every token).
    pub fn group_cause(&self, group: &crate::findings::Systematic) -> (String, String) {
        // Every row's error the same vector on all its tokens: a constant.
        let constant = !group.rows.is_empty() && group.rows.iter().all(|&i| self.rows[i].same_offset.is_some());
        // A decode step has one token: what the prompt's flagged rows of
        // the same stage showed is all there is to say.
        let at_prompt = group.phase == crate::findings::Phase::Decode
            && self
                .rows
                .iter()
                .any(|r| r.stage == group.stage && r.step == 0 && r.finding.is_some() && r.same_offset.is_some());
        match self.shared_rank(group) {
            Some(r) => (format!(", rank {r} in each"), format!("what rank {r} computes departs from the contract")),
            None if constant => (
                String::new(),
                "the same error vector on every token in each: a constant added, as a bias is, or one left out".into(),
            ),
            None if at_prompt => (
                String::new(),
                "one token a step; at the prompt this stage's error is the same vector on every token: a constant added, as a bias is, or one left out"
                    .into(),
            ),
            None => (String::new(), "a kernel path that departs from the contract".into()),
        }
    }

    /// The largest ratio to the expected error per stage and phase.
    pub fn margins(&self) -> Vec<Margin> {
        margins(&self.rows)
    }

    /// Reads a report written by [`Report::to_json`] (of this format
    /// version); `path` names it in errors.
    pub fn from_json(text: &str, path: &std::path::Path) -> crate::Result<Report> {
        let bad = |message: String| crate::CompareError::BadReport { path: path.to_path_buf(), message };
        let value: Value = serde_json::from_str(text).map_err(|e| bad(format!("not JSON: {e}")))?;
        match value.get("format").and_then(Value::as_str) {
            Some(REPORT_FORMAT) => {}
            Some(other) => {
                return Err(bad(format!(
                    "format is `{other}`; this moetrace reads `{REPORT_FORMAT}` (write it again with this version's --json)"
                )));
            }
            None => return Err(bad(format!("no `format` field; expected a `{REPORT_FORMAT}` report from --json"))),
        }
        let report: Report = serde_json::from_value(value).map_err(|e| bad(e.to_string()))?;
        report.check_sizes().map_err(bad)?;
        Ok(report)
    }

    /// Checks every number a reader sizes anything by (the map draws a
    /// row per layer up to the largest, a panel per step) against what a
    /// run can hold, before anything is drawn: the layers and steps of a
    /// run moetrace could have made, worst rows and slots within their
    /// tensors.
    fn check_sizes(&self) -> Result<(), String> {
        for (i, r) in self.rows.iter().enumerate() {
            if let Some(l) = r.layer.filter(|&l| l >= MAX_REPORT_LAYERS) {
                return Err(format!("rows[{i}].layer is {l}; a model has at most {MAX_REPORT_LAYERS} layers"));
            }
            if r.step >= MAX_REPORT_STEPS {
                return Err(format!("rows[{i}].step is {}; a run has at most {MAX_REPORT_STEPS} steps", r.step));
            }
            if let Some(m) = &r.metrics
                && m.max_abs_index.len() > 8
            {
                return Err(format!(
                    "rows[{i}].metrics.max_abs_index has {} dimensions; a stage has at most 3",
                    m.max_abs_index.len()
                ));
            }
        }
        Ok(())
    }

    /// The JSON report; its top level has `first_divergence` (null or an
    /// object with step, layer, stage, verdict, rel_l2, ...).
    pub fn to_json(&self) -> Value {
        let first = self.first_divergence().map(|r| {
            json!({
                "step": r.step, "layer": r.layer, "stage": r.stage.name(), "verdict": r.verdict,
                "rel_l2": r.rel_l2(), "max_abs_diff": r.metrics.as_ref().map(|m| m.max_abs_diff),
                "max_abs_index": r.metrics.as_ref().map(|m| m.max_abs_index.clone()),
                "token": r.worst_token, "expert": r.worst_expert, "rank": r.worst_rank, "flipped": r.flipped,
            })
        });
        let not_ok = self.rows.iter().filter(|r| !r.verdict.is_ok()).count();
        let grouped = self.grouped_findings();
        let finding = |r: &Row| {
            json!({"step": r.step, "layer": r.layer, "stage": r.stage.name(), "token": r.worst_token,
                "expert": r.worst_expert, "rank": r.worst_rank, "verdict": r.verdict, "reason": r.finding,
                "expected": r.expected})
        };
        let findings: Vec<Value> = match self.mode {
            Mode::Local => grouped.lone.iter().map(|&i| finding(&self.rows[i])).collect(),
            Mode::Accumulated => self.findings().into_iter().map(finding).collect(),
        };
        json!({
            "format": REPORT_FORMAT,
            "mode": self.mode,
            "reference": self.reference, "target": self.target,
            "first_divergence": first,
            "findings": findings,
            "systematic_findings": grouped.systematic,
            "margins": self.margins(),
            "ratio_threshold": crate::expected::RATIO_THRESHOLD,
            "graft": self.graft,
            "summary": {"compared": self.rows.len(), "ok": self.rows.len() - not_ok, "not_ok": not_ok},
            "notes": self.notes,
            "rows": self.rows,
        })
    }

    /// The human report: a summary, the first divergence, and the non-ok
    /// rows (every row with `all`).
    pub fn render(&self, all: bool) -> String {
        if self.mode == Mode::Local {
            return self.render_local(all);
        }
        let mut out = format!("reference: {}\ntarget:    {}\n", self.reference, self.target);
        // Rows on one side only were not compared: they are counted apart,
        // never as compared tensors.
        let one_sided = self.rows.iter().filter(|r| matches!(r.verdict, Verdict::Missing { .. })).count();
        let compared = self.rows.len() - one_sided;
        let ok = self.rows.iter().filter(|r| r.verdict.is_ok()).count();
        out += &format!("compared {compared} tensors: {ok} ok, {} not ok", compared - ok);
        if one_sided > 0 {
            out += &format!("; {one_sided} on one side only, not compared");
        }
        out += "\n";
        for note in &self.notes {
            out += &format!("note: {note}\n");
        }
        match self.first_divergence() {
            None => out += "no divergence\n",
            Some(r) => out += &format!("first divergence: {}: {}; {}\n", r.place(), r.verdict.label(), r.detail()),
        }
        if let Some(g) = &self.graft {
            if g.stage_is_wrong {
                out += &format!(
                    "graft: recomputed on the target from the reference's inputs, this stage still diverges (rel_l2 {:.3e}, {}): the stage itself is wrong\n",
                    g.rel_l2,
                    g.verdict.label()
                );
            } else {
                out += &format!(
                    "graft: recomputed on the target from the reference's inputs, this stage agrees (rel_l2 {:.3e}): it only amplifies upstream drift",
                    g.rel_l2
                );
                if let Some((place, e)) = &g.first_error {
                    out += &format!("; the error first appears at {place} (rel_l2 {e:.3e})");
                }
                match &g.largest_jump {
                    Some((place, ratio)) => out += &format!("; largest jump in error: {place} (x{ratio:.1})\n"),
                    None => out += "\n",
                }
            }
        }
        let shown: Vec<&Row> =
            if all { self.rows.iter().collect() } else { self.rows.iter().filter(|r| !r.verdict.is_ok()).collect() };
        out += &table(&shown);
        out
    }

    /// Routing flips per (step, layer): (step, layer, flips, near-ties,
    /// smallest reference margin). Tokens whose experts flipped: a flip
    /// of DeepSeek's kept groups counts where it changed the experts.
    pub fn routing_flips(&self) -> Vec<(usize, usize, usize, usize, Option<f64>)> {
        self.rows
            .iter()
            .filter(|r| !r.flipped.is_empty() && r.stage != SaveTensorStage::MoeRouterGroups)
            .map(|r| {
                let near = r.flipped.iter().filter(|f| f.near_tie).count();
                let margin = r.flipped.iter().filter_map(|f| f.ref_margin).min_by(f64::total_cmp);
                (r.step, r.layer.unwrap_or(0), r.flipped.len(), near, margin)
            })
            .collect()
    }

    fn render_local(&self, all: bool) -> String {
        let mut out = format!(
            "reference: {}\ntarget:    {} (each stage compared on the same inputs)\n",
            self.reference, self.target
        );
        let grouped = self.grouped_findings();
        let flips = self.routing_flips();
        let flipped: usize = flips.iter().map(|f| f.2).sum();
        let near: usize = flips.iter().map(|f| f.3).sum();
        let judged = self.rows.iter().filter(|r| r.expected.is_some()).count();
        let lone = grouped.lone.len();
        let (finding, token) =
            (if lone == 1 { "finding" } else { "findings" }, if flipped == 1 { "token" } else { "tokens" });
        out += &format!(
            "local errors of {} tensors ({judged} against their expected error, threshold {}x): {lone} lone {finding}, {} systematic; routing: {flipped} flipped {token} in {} (step, layer)s, {near} of them near-ties\n",
            self.rows.len(),
            crate::expected::RATIO_THRESHOLD,
            grouped.systematic.len(),
            flips.len(),
        );
        for note in &self.notes {
            out += &format!("note: {note}\n");
        }
        for &i in &grouped.lone {
            let r = &self.rows[i];
            out += &format!("finding: {}: {}; {}\n", r.place(), finding_reason(r), r.detail());
        }
        for s in &grouped.systematic {
            let (rank, cause) = self.group_cause(s);
            out += &format!(
                "systematic: {}, {}, {} of {} layers{}{rank}, {} to {} expected (one cause: {cause}); at {}\n",
                s.stage,
                s.phase.label(),
                s.layers.len(),
                s.layers_compared,
                if s.places.len() > s.layers.len() { format!(" ({} places)", s.places.len()) } else { String::new() },
                ratio_text(s.min_ratio),
                ratio_text(s.max_ratio),
                places_text(&s.places, 12)
            );
        }
        if grouped.lone.is_empty() && grouped.systematic.is_empty() {
            out += "no finding: every stage's local error is within what the target's precision explains\n";
        }
        // A clamp that changed other values than the reference's did.
        let clamps = self.rows.iter().filter_map(|r| r.clamp_changes.filter(|[a, b]| a != b).map(|c| (r, c)));
        for (r, [reference, target]) in clamps.take(12) {
            out += &format!(
                "clamp: {}: the clamp changed {reference} (slot, column)s in the reference, {target} in the target\n",
                r.place()
            );
        }
        if let Some(line) = margins_text(&self.margins()) {
            out += &format!("{line}\n");
        }
        for (step, layer, n, near, margin) in flips.iter().take(12) {
            let margin = margin.map(|m| format!("{m:.2e}")).unwrap_or_else(|| "?".into());
            out += &format!(
                "routing: step {step} layer {layer}: {n} flipped tokens ({near} near-ties; smallest reference margin {margin}); the reference's experts were used\n"
            );
        }
        if flips.len() > 12 {
            out += &format!("routing: ... {} (step, layer)s with flips in all\n", flips.len());
        }
        let shown: Vec<&Row> = if all { self.rows.iter().collect() } else { Vec::new() };
        out += &table(&shown);
        out
    }
}
