//! The per-rank stages of expert-parallel runs, moe_expert_map `[R,E]`
//! (each rank's view, compared exactly), moe_dispatch `[R,T,k]` and
//! moe_combine `[R,T,H]`: compared per (rank, token) row on the tokens
//! both sides routed to the same experts (a token routed otherwise is a
//! routing flip, judged at moe_router_indices; its slots go to other
//! ranks by design). moe_dispatch is compared as which rank received each
//! slot (1) or not (0): the row a slot lands in within a rank's receive
//! buffer is the engine's own layout. The worst row names its rank.

use crate::expected::Expected;
use crate::metrics::{rel_l2_of_rows, rms_row_norm, row_errors, tensor_metrics};
use crate::row::Row;
use crate::view::{Elements, TensorView};
use stage_types::SaveTensorStage;

/// The (rank, token) rows compared and their values, as f64.
struct Picked {
    rows: Vec<(usize, usize)>,
    inner: usize,
}

impl Picked {
    fn values(&self, stage: SaveTensorStage, v: &TensorView<'_>) -> Vec<f64> {
        let t_len = v.shape[1];
        let mut out = Vec::with_capacity(self.rows.len() * self.inner);
        for &(rank, token) in &self.rows {
            let start = (rank * t_len + token) * self.inner;
            for i in start..start + self.inner {
                let x = v.elements.get(i);
                out.push(if stage == SaveTensorStage::MoeDispatch { f64::from(u8::from(x >= 0.0)) } else { x });
            }
        }
        out
    }
}

/// Fills `row` for a per-rank stage; `agree[t]`: token t's experts are the
/// same on both sides; `emulated`: the expected side's tensor and its
/// rows' error floor.
pub(crate) fn compare_ranks(
    row: &mut Row,
    r: &TensorView<'_>,
    t: &TensorView<'_>,
    agree: &[bool],
    emulated: Option<(TensorView<'_>, f64)>,
) {
    let (ranks, t_len, inner) = (r.shape[0], r.shape[1], r.shape[2]);
    let rows: Vec<(usize, usize)> = (0..ranks)
        .flat_map(|q| (0..t_len).map(move |token| (q, token)))
        .filter(|&(_, token)| agree.get(token).copied().unwrap_or(true))
        .collect();
    let picked = Picked { rows, inner };
    let (rv, tv) = (picked.values(row.stage, r), picked.values(row.stage, t));
    let (re, te) = (Elements::F64(&rv), Elements::F64(&tv));
    let m = tensor_metrics(re, te, &[picked.rows.len(), inner], 0);
    let mut worst = (m.worst_row_error > 0.0).then_some(m.worst_row);
    row.compared_tokens = Some(agree.iter().filter(|a| **a).count());
    if let Some((e, floor)) = emulated.filter(|(e, _)| e.shape == r.shape) {
        let ev = picked.values(row.stage, &e);
        let norm = rms_row_norm(re, inner);
        let emulated_rows = row_errors(re, Elements::F64(&ev), inner, norm);
        let errors = row_errors(re, te, inner, norm);
        let ee: Vec<Option<f64>> = emulated_rows.iter().copied().map(Some).collect();
        let emulated_rel_l2 = rel_l2_of_rows(&emulated_rows, emulated_rows.len());
        row.expected = Expected::from_rows(&errors, &ee, floor).map(|x| x.with_emulated_rel_l2(emulated_rel_l2));
        worst = row.expected.as_ref().filter(|x| x.error > 0.0).map(|x| x.row).or(worst);
    }
    if let Some(&(rank, token)) = worst.and_then(|w| picked.rows.get(w)) {
        row.worst_token = Some(token);
        row.worst_rank = Some(rank);
    }
    row.set_metrics(m);
}

/// Fills `row` for moe_expert_map `[R,E]`: each rank's view compared as
/// exact values; the worst row is its rank.
pub(crate) fn compare_map(row: &mut Row, r: &TensorView<'_>, t: &TensorView<'_>) {
    let m = tensor_metrics(r.elements, t.elements, r.shape, 0);
    if m.worst_row_error > 0.0 {
        row.worst_rank = Some(m.worst_row);
    }
    row.set_metrics(m);
}

/// The rank whose partial sum (moe_combine, the reference's) explains the
/// error of moe_ffn_out's row `token`: the target's row minus the
/// reference's is that partial once more (a rank added twice) or its
/// negative (a rank left out), to within a tenth of the error. None where
/// no rank explains it (a correct run's rounding never does: a partial is
/// far larger than a rounding error).
pub(crate) fn rank_explaining(
    reference: &TensorView<'_>,
    target: &TensorView<'_>,
    partials: &TensorView<'_>,
    token: usize,
) -> Option<usize> {
    let h = *reference.shape.last()?;
    let (ranks, t_len) = (*partials.shape.first()?, reference.shape[0]);
    if partials.shape[..] != [ranks, t_len, h] || token >= t_len {
        return None;
    }
    let delta: Vec<f64> =
        (0..h).map(|d| target.elements.get(token * h + d) - reference.elements.get(token * h + d)).collect();
    let norm = delta.iter().map(|x| x * x).sum::<f64>().sqrt();
    if norm == 0.0 || !norm.is_finite() {
        return None;
    }
    let residual = |r: usize, sign: f64| {
        let p = |d: usize| partials.elements.get((r * t_len + token) * h + d);
        (0..h).map(|d| (delta[d] - sign * p(d)).powi(2)).sum::<f64>().sqrt()
    };
    (0..ranks)
        .flat_map(|r| [(r, residual(r, 1.0)), (r, residual(r, -1.0))])
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .filter(|(_, res)| *res < 0.1 * norm)
        .map(|(r, _)| r)
}
