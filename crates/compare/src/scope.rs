//! Comparing one (step, layer) scope stage by stage: per-tensor metrics,
//! MoE-aware routing and per-expert comparison, verdicts and tolerances.
//! Used by `diff` (two capture folders) and `bisect` (two backends in one
//! process).

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use stage_types::SaveTensorStage;

use crate::expected::Expected;
use crate::metrics::{rel_l2_of_rows, rms_row_norm, row_errors, tensor_metrics};
use crate::routing;
use crate::row::Row;
use crate::view::{Elements, TensorView};

/// Which run a finding is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    /// The reference run.
    Reference,
    /// The target run.
    Target,
    /// Both runs.
    Both,
}

/// The verdict on one tensor pair.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Verdict {
    /// Within tolerance.
    Ok,
    /// rel_l2 above tolerance.
    Diverged,
    /// NaN or Inf present.
    Nan {
        /// Where.
        side: Side,
    },
    /// Captured on one side only.
    Missing {
        /// The side that lacks it.
        side: Side,
    },
    /// Shapes differ.
    ShapeMismatch {
        /// Reference shape.
        reference: Vec<usize>,
        /// Target shape.
        target: Vec<usize>,
    },
    /// Expert sets differ only on tokens whose reference top-k margin is
    /// within the perturbation (a near-tie).
    RoutingFlip,
    /// Expert sets differ on a token with a clear margin.
    WrongRouter,
}

impl Verdict {
    /// True for `Ok`.
    pub fn is_ok(&self) -> bool {
        matches!(self, Verdict::Ok)
    }

    /// Short label for tables.
    pub fn label(&self) -> String {
        match self {
            Verdict::Ok => "ok".into(),
            Verdict::Diverged => "diverged".into(),
            Verdict::Nan { side } => format!("nan/inf ({})", side_name(*side)),
            Verdict::Missing { side } => format!("missing ({})", side_name(*side)),
            Verdict::ShapeMismatch { reference, target } => format!("shape {reference:?} vs {target:?}"),
            Verdict::RoutingFlip => "routing flip (near-tie)".into(),
            Verdict::WrongRouter => "wrong router".into(),
        }
    }
}

fn side_name(side: Side) -> &'static str {
    match side {
        Side::Reference => "reference",
        Side::Target => "target",
        Side::Both => "both",
    }
}

/// rel_l2 tolerances: a default from the runs' dtypes (the coarser) and per-stage
/// overrides.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Tolerances {
    /// Used for stages without an override; None = by the coarser dtype of the two runs.
    pub default: Option<f64>,
    /// Per-stage overrides.
    pub per_stage: HashMap<SaveTensorStage, f64>,
}

impl Tolerances {
    /// The default for a target activation dtype: 1e-4 for f32/f64, 3e-2
    /// for bf16/f16.
    pub fn for_dtype(dtype: &str) -> f64 {
        match dtype.to_ascii_lowercase().as_str() {
            "bf16" | "bfloat16" | "f16" | "float16" => 3e-2,
            _ => 1e-4,
        }
    }

    /// Of two runs' activation dtypes, the one whose default tolerance is
    /// larger: a bf16 run cannot agree with an f32 one beyond bf16
    /// precision, whichever side is the reference.
    pub fn coarser_dtype<'a>(a: &'a str, b: &'a str) -> &'a str {
        if Self::for_dtype(b) > Self::for_dtype(a) { b } else { a }
    }

    /// The tolerance of `stage` for a target of `dtype`. Integer stages
    /// (attn_window's positions) are exact whatever the precision: 0
    /// unless a tolerance names the stage.
    pub fn of(&self, stage: SaveTensorStage, dtype: &str) -> f64 {
        let default = if stage.is_integer() { Some(0.0) } else { self.default };
        self.per_stage.get(&stage).copied().or(default).unwrap_or_else(|| Self::for_dtype(dtype))
    }

    /// Parses `F` (every stage) or `stage=F` and adds it.
    pub fn add(&mut self, text: &str) -> Result<(), String> {
        let value = |v: &str| {
            v.trim().parse::<f64>().ok().filter(|x| *x >= 0.0).ok_or_else(|| {
                format!("bad tolerance `{text}`: `{v}` is not a non-negative number; write F or stage=F, e.g. 1e-3 or moe_router=1e-2")
            })
        };
        match text.split_once('=') {
            Some((stage, v)) => {
                let stage = stage.parse::<SaveTensorStage>().map_err(|e| format!("bad tolerance `{text}`: {e}"))?;
                self.per_stage.insert(stage, value(v)?);
            }
            None => self.default = Some(value(text)?),
        }
        Ok(())
    }
}

/// The tensors of one (step, layer) scope: stage → (reference, target),
/// borrowed from wherever they live.
pub type ScopeTensors<'a> = BTreeMap<SaveTensorStage, (Option<TensorView<'a>>, Option<TensorView<'a>>)>;

/// The expected side of a scope: each stage's output from an emulation of
/// the target's numeric contract on the same inputs (see
/// [`crate::expected`]).
pub type ExpectedTensors<'a> = BTreeMap<SaveTensorStage, Emulated<'a>>;

/// One stage's output from the emulation, and how the target's rows are
/// judged against it.
#[derive(Debug, Clone, Copy)]
pub struct Emulated<'a> {
    /// What the emulation computed.
    pub view: TensorView<'a>,
    /// The error floor of a row (relative to the tensor's RMS row norm).
    pub floor: f64,
    /// The emulation replicates the target's arithmetic (every rounding
    /// point determined by the inputs both sides share, as llama.cpp's
    /// activation quantization is): a correct target's row is within the
    /// floor of the emulation's, and is judged by that distance. Otherwise
    /// the emulation's error bounds the target's: a row is judged by its
    /// error against the reference over the emulation's.
    pub replicates: bool,
}

const PER_SLOT: [SaveTensorStage; 6] = [
    SaveTensorStage::MoeRouter,
    SaveTensorStage::MoeExpertGate,
    SaveTensorStage::MoeExpertUp,
    SaveTensorStage::MoeExpertClamp,
    SaveTensorStage::MoeExpertSwigl,
    SaveTensorStage::MoeExpertOut,
];

/// Which expert ids the target's per-expert stages ran on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertIds {
    /// Its own routing: per-expert tensors are aligned by each side's ids
    /// and compared on the tokens whose expert sets agree.
    EachSide,
    /// The reference's ids (routing replay, local errors): per-expert
    /// tensors are compared slot by slot on every token, while the
    /// router's own ids and weights are still compared with the
    /// reference's.
    Reference,
}

/// Compares every stage of one scope, in `ALL` order; with `expected`,
/// each row's errors are also judged against the emulation's
/// ([`Row::expected`]), and the worst token and expert are those of the
/// row furthest above its expected error.
pub fn compare_scope(
    step: usize,
    layer: Option<usize>,
    tensors: &ScopeTensors<'_>,
    tolerances: &Tolerances,
    target_dtype: &str,
    expert_ids: ExpertIds,
    expected: Option<&ExpectedTensors<'_>>,
) -> Vec<Row> {
    let emulated = |stage: SaveTensorStage, r: &TensorView<'_>| {
        expected.and_then(|x| x.get(&stage)).filter(|e| e.view.shape == r.shape).copied()
    };
    let get = |s: SaveTensorStage| tensors.get(&s).map(|(r, t)| (*r, *t));
    let indices = match get(SaveTensorStage::MoeRouterIndices) {
        Some((Some(r), Some(t))) if r.shape == t.shape && r.shape.len() == 2 => Some((r, t, r.shape[1])),
        _ => None,
    };
    // What chose the experts: DeepSeek's choice scores (with its group
    // choice where both sides hold it) where both sides hold them, else
    // the router logits.
    let both = |s: SaveTensorStage| match get(s) {
        Some((Some(r), Some(t))) if r.shape == t.shape => Some((r, t)),
        _ => None,
    };
    let group_scores = both(SaveTensorStage::MoeRouterGroupScores);
    let groups = match (group_scores, both(SaveTensorStage::MoeRouterGroups)) {
        (Some((rs, ts)), Some((rk, tk))) => {
            Some(routing::GroupChoice { scores: (rs.elements, ts.elements), kept: (rk.elements, tk.elements) })
        }
        _ => None,
    };
    let scores = match (both(SaveTensorStage::MoeRouterChoice), both(SaveTensorStage::MoeRouterLogits)) {
        (Some((r, t)), _) => Some(routing::RouterScores::Choice(r.elements, t.elements, groups)),
        (_, Some((r, t))) => Some(routing::RouterScores::Logits(r.elements, t.elements)),
        _ => None,
    };
    // What chose the groups: their scores, as they are.
    let group_margins = group_scores.map(|(r, t)| routing::RouterScores::Choice(r.elements, t.elements, None));
    let mut rows = Vec::new();
    for (&stage, (reference, target)) in tensors {
        let tolerance = tolerances.of(stage, target_dtype);
        let mut row = Row::new(step, layer, stage, tolerance);
        let mut ranks_of_expert = false;
        let (r, t) = match (*reference, *target) {
            (Some(r), Some(t)) => (r, t),
            (r, _) => {
                let side = if r.is_none() { Side::Reference } else { Side::Target };
                row.verdict = Verdict::Missing { side };
                rows.push(row);
                continue;
            }
        };
        if r.shape != t.shape {
            row.verdict = Verdict::ShapeMismatch { reference: r.shape.to_vec(), target: t.shape.to_vec() };
            rows.push(row);
            continue;
        }
        if stage.holds_ids() {
            let k = r.shape.get(1).copied().unwrap_or(1);
            let by = if stage == SaveTensorStage::MoeRouterGroups { group_margins } else { scores };
            row.flipped = routing::compare_indices(r.elements, t.elements, k, by);
            row.verdict = if row.flipped.is_empty() {
                Verdict::Ok
            } else if row.flipped.iter().all(|f| f.near_tie) {
                Verdict::RoutingFlip
            } else {
                Verdict::WrongRouter
            };
            row.worst_token = row.flipped.iter().find(|f| !f.near_tie).or(row.flipped.first()).map(|f| f.token);
            rows.push(row);
            continue;
        }
        if stage == SaveTensorStage::MoeExpertMap && r.shape.len() == 2 {
            crate::ranks::compare_map(&mut row, &r, &t);
            rows.push(row);
            continue;
        }
        if matches!(stage, SaveTensorStage::MoeDispatch | SaveTensorStage::MoeCombine) && r.shape.len() == 3 {
            // Tokens routed alike on both sides (all of them where the
            // target ran on the reference's ids).
            let agree: Vec<bool> = match indices {
                Some((ri, ti, k)) if expert_ids == ExpertIds::EachSide => (0..r.shape[1])
                    .map(|t| (t * k..(t + 1) * k).all(|i| ri.elements.get(i) == ti.elements.get(i)))
                    .collect(),
                _ => vec![true; r.shape[1]],
            };
            let expected = emulated(stage, &r).map(|e| (e.view, e.floor));
            crate::ranks::compare_ranks(&mut row, &r, &t, &agree, expected);
            rows.push(row);
            continue;
        }
        match indices.filter(|_| PER_SLOT.contains(&stage)) {
            Some((ri, ti, k)) => {
                let replayed = expert_ids == ExpertIds::Reference && stage != SaveTensorStage::MoeRouter;
                let ti = if replayed { ri } else { ti };
                let a = routing::align_by_expert(r.elements, t.elements, ri.elements, ti.elements, k);
                let (ar, at) = (Elements::F64(&a.reference), Elements::F64(&a.target));
                let mut m = tensor_metrics(ar, at, &[a.rows.len(), a.inner], 0);
                let worst = m.max_abs_index.first().and_then(|&i| a.rows.get(i)).copied();
                if let Some((token, slot, _)) = worst {
                    // Report the index in the reference's [T,k,...] layout.
                    let inner_index = crate::metrics::unravel(m.max_abs_index[1], &r.shape[2..]);
                    m.max_abs_index = [token, slot].into_iter().chain(inner_index).collect();
                }
                // Where: the row (token, expert slot) with the largest error.
                if let Some(&(token, _, expert)) = a.rows.get(m.worst_row).filter(|_| m.worst_row_error > 0.0) {
                    row.worst_token = Some(token);
                    row.worst_expert = Some(expert);
                }
                row.compared_tokens = Some(a.rows.iter().map(|r| r.0).collect::<std::collections::BTreeSet<_>>().len());
                ranks_of_expert = true;
                row.set_metrics(m);
                if let Some(Emulated { view: e, floor, replicates }) = emulated(stage, &r) {
                    // The emulation's own ids where the target's are its own.
                    let ei = match expected.and_then(|x| x.get(&SaveTensorStage::MoeRouterIndices)) {
                        Some(ei) if !replayed && ei.view.shape == ri.shape => ei.view,
                        _ => ri,
                    };
                    let norm = rms_row_norm(r.elements, a.inner);
                    // Row errors of an alignment, by (token, expert).
                    let by_place = |aligned: &routing::Aligned| -> (Vec<f64>, HashMap<(usize, i32), f64>) {
                        let errors = row_errors(
                            Elements::F64(&aligned.reference),
                            Elements::F64(&aligned.target),
                            aligned.inner,
                            norm,
                        );
                        let places = aligned.rows.iter().zip(&errors).map(|(&(t, _, x), &err)| ((t, x), err)).collect();
                        (errors, places)
                    };
                    let (emulated_rows, emulated) =
                        by_place(&routing::align_by_expert(r.elements, e.elements, ri.elements, ei.elements, k));
                    let emulated_rel_l2 = rel_l2_of_rows(&emulated_rows, r.elements.len() / a.inner.max(1));
                    // A replaying emulation: the target's rows against its.
                    let replayed = replicates.then(|| {
                        by_place(&routing::align_by_expert(e.elements, t.elements, ei.elements, ti.elements, k)).1
                    });
                    // Each row against the replay where it has that row, else
                    // against the reference with the emulation's error as its bound.
                    let (errors, ee): (Vec<f64>, Vec<Option<f64>>) = a
                        .rows
                        .iter()
                        .zip(row_errors(ar, at, a.inner, norm))
                        .map(|(&(t, _, x), to_reference)| match replayed.as_ref().and_then(|p| p.get(&(t, x))) {
                            Some(&distance) => (distance, Some(0.0)),
                            None => (to_reference, emulated.get(&(t, x)).copied()),
                        })
                        .unzip();
                    row.expected = Expected::from_rows(&errors, &ee, floor).map(|x| {
                        let (token, _, expert) = a.rows[x.row];
                        let from_replay = replayed.as_ref().is_some_and(|p| p.contains_key(&(token, expert)));
                        x.with_emulated_rel_l2(emulated_rel_l2).from_replay(from_replay)
                    });
                    if let Some(&(token, _, expert)) =
                        row.expected.as_ref().and_then(|x| a.rows.get(x.row)).filter(|_| m_error(&row) > 0.0)
                    {
                        row.worst_token = Some(token);
                        row.worst_expert = Some(expert);
                    }
                }
            }
            None => {
                let axis = usize::from(matches!(stage, SaveTensorStage::AttnScores | SaveTensorStage::AttnSoftmax));
                let m = tensor_metrics(r.elements, t.elements, r.shape, axis);
                // Where: the token of the row with the largest error.
                let row_dims = &r.shape[..r.shape.len().saturating_sub(1)];
                let mut worst_row = (m.worst_row_error > 0.0).then_some(m.worst_row);
                if let Some(Emulated { view: e, floor, replicates }) = emulated(stage, &r) {
                    let width = r.shape.last().copied().unwrap_or(1);
                    let norm = rms_row_norm(r.elements, width);
                    let emulated_rows = row_errors(r.elements, e.elements, width, norm);
                    let emulated_rel_l2 = rel_l2_of_rows(&emulated_rows, emulated_rows.len());
                    let (errors, ee): (Vec<f64>, Vec<Option<f64>>) = if replicates {
                        (row_errors(e.elements, t.elements, width, norm), vec![Some(0.0); emulated_rows.len()])
                    } else {
                        (row_errors(r.elements, t.elements, width, norm), emulated_rows.into_iter().map(Some).collect())
                    };
                    row.expected = Expected::from_rows(&errors, &ee, floor)
                        .map(|x| x.with_emulated_rel_l2(emulated_rel_l2).from_replay(replicates));
                    worst_row = row.expected.as_ref().filter(|x| x.error > 0.0).map(|x| x.row).or(worst_row);
                }
                row.worst_token =
                    worst_row.and_then(|w| crate::metrics::unravel(w, row_dims).get(axis).copied()).or(m.worst_token);
                // Expert-parallel ranks: the rank whose partial sum the
                // error equals (added twice, or left out).
                if let (SaveTensorStage::MoeFfnOut, Some(token), Some((Some(p), _))) =
                    (stage, row.worst_token, get(SaveTensorStage::MoeCombine))
                {
                    row.worst_rank = crate::ranks::rank_explaining(&r, &t, &p, token);
                }
                row.set_metrics(m);
                // Only a finding is explained: two more passes over every
                // compared tensor (the logits included) would be spent on
                // rows no report names.
                if r.shape.len() == 2 && axis == 0 && crate::findings::finding_of(&row).is_some() {
                    row.same_offset = crate::metrics::same_offset_on_every_row(r.elements, t.elements, r.shape[1]);
                }
            }
        }
        // Expert-parallel ranks: the rank holding the worst row's expert
        // (contiguous blocks of E / R experts).
        if let (true, Some(e), Some((Some(d), _)), Some((Some(l), _))) = (
            ranks_of_expert,
            row.worst_expert,
            get(SaveTensorStage::MoeDispatch),
            get(SaveTensorStage::MoeRouterLogits),
        ) {
            let (ranks, experts) = (d.shape[0], l.shape.last().copied().unwrap_or(0));
            if ranks > 0 && e >= 0 && experts % ranks == 0 && (e as usize) < experts {
                row.worst_rank = Some(e as usize / (experts / ranks));
            }
        }
        rows.push(row);
    }
    if let Some(row) = rows.iter_mut().find(|r| r.stage == SaveTensorStage::MoeExpertClamp) {
        let count = |side: usize| {
            let pick = |s: SaveTensorStage| get(s).and_then(|(r, t)| if side == 0 { r } else { t });
            match (pick(SaveTensorStage::MoeExpertGate), pick(SaveTensorStage::MoeExpertUp), pick(row.stage)) {
                (Some(g), Some(u), Some(c)) => clamp_changes(&g, &u, &c),
                _ => None,
            }
        };
        if let (Some(reference), Some(target)) = (count(0), count(1)) {
            row.clamp_changes = Some([reference, target]);
        }
    }
    rows
}

/// How many (slot, column)s a clamp changed: `clamped` (`[T,k,2I]`, each
/// slot's gate then up) against the `gate` and `up` it clamped
/// (`[T,k,I]` each). None where the shapes do not fit.
fn clamp_changes(gate: &TensorView<'_>, up: &TensorView<'_>, clamped: &TensorView<'_>) -> Option<usize> {
    let i = *gate.shape.last()?;
    let (n, c) = (gate.elements.len(), clamped.elements);
    if i == 0 || up.shape != gate.shape || c.len() != 2 * n {
        return None;
    }
    let differs = |a: f64, b: f64| a != b && !(a.is_nan() && b.is_nan());
    let changed = |s: usize, j: usize| {
        differs(gate.elements.get(s * i + j), c.get(s * 2 * i + j))
            || differs(up.elements.get(s * i + j), c.get(s * 2 * i + i + j))
    };
    Some((0..n / i).map(|s| (0..i).filter(|&j| changed(s, j)).count()).sum())
}

/// A row's worst row error (0 without metrics).
fn m_error(row: &Row) -> f64 {
    row.metrics.as_ref().map_or(0.0, |m| m.worst_row_error)
}

#[cfg(test)]
mod tests {
    use super::Tolerances;

    #[test]
    fn the_coarser_run_sets_the_default_tolerance_whichever_side_it_is() {
        assert_eq!(Tolerances::coarser_dtype("bfloat16", "f32"), "bfloat16");
        assert_eq!(Tolerances::coarser_dtype("f32", "bf16"), "bf16");
        assert_eq!(Tolerances::coarser_dtype("float64", "f32"), "float64");
        let t = Tolerances::default();
        let coarser = Tolerances::coarser_dtype("bfloat16", "f32");
        assert_eq!(t.of(stage_types::SaveTensorStage::AttnNorm, coarser), 3e-2);
    }
}
