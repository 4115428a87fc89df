//! MoE-aware comparison: router indices compared as sets per token, flipped
//! tokens with the reference's top-k margin (so a flip on a near-tie is told
//! from a wrong router), and per-expert tensors aligned by expert id on the
//! tokens whose expert set agrees.

use serde::{Deserialize, Serialize};

use crate::view::Elements;

/// A token whose expert set differs between the runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlippedToken {
    /// Token index within the step.
    pub token: usize,
    /// The token's text, when the capture recorded token texts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// Reference experts, in top-k order.
    pub ref_experts: Vec<i32>,
    /// Target experts, in top-k order.
    pub target_experts: Vec<i32>,
    /// Reference gap between the k-th and (k+1)-th router probability.
    #[serde(with = "crate::json_float::opt_float")]
    pub ref_margin: Option<f64>,
    /// Largest change of any router probability of this token (target vs
    /// reference), when both runs captured the logits.
    #[serde(with = "crate::json_float::opt_float")]
    pub perturbation: Option<f64>,
    /// The flip is explained by a near-tie: margin <= 2 x perturbation, or
    /// margin <= 1e-3 when the perturbation is unknown.
    pub near_tie: bool,
}

/// Margin at or below which a flip counts as a near-tie when the
/// perturbation of the probabilities is unknown.
pub const NEAR_TIE_MARGIN: f64 = 1e-3;

fn softmax(row: &[f64]) -> Vec<f64> {
    let max = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x));
    let e: Vec<f64> = row.iter().map(|x| (x - max).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|x| x / s).collect()
}

/// The gap between the k-th and (k+1)-th largest probability of a logits row.
pub fn top_k_margin(logits: &[f64], k: usize) -> Option<f64> {
    top_k_gap(&softmax(logits), k)
}

/// What a router chose experts by, `[T,E]` of (reference, target), for
/// the margins of flipped tokens.
#[derive(Debug, Clone, Copy)]
pub enum RouterScores<'a> {
    /// Router logits: experts chosen by their softmax probability.
    Logits(Elements<'a>, Elements<'a>),
    /// Scores that choose as they are (DeepSeek's sigmoid plus correction
    /// bias, `moe_router_choice`): margins are their own gaps. Its group
    /// choice is not modelled: a gap to an expert of a masked group is
    /// counted as if that expert could have been chosen, which can only
    /// make a margin smaller (a flip more readily a near-tie).
    Choice(Elements<'a>, Elements<'a>),
}

/// The gap between the k-th and (k+1)-th largest of scores that choose
/// as they are.
pub fn top_k_gap(scores: &[f64], k: usize) -> Option<f64> {
    let mut p = scores.to_vec();
    p.sort_by(|a, b| b.total_cmp(a));
    (k < p.len()).then(|| p[k - 1] - p[k])
}

/// Compares `[T,k]` expert ids. `scores` are what (reference, target)
/// chose by, when both were captured.
pub fn compare_indices(
    ref_ids: Elements<'_>,
    target_ids: Elements<'_>,
    k: usize,
    scores: Option<RouterScores<'_>>,
) -> Vec<FlippedToken> {
    let (logits, as_probabilities) = match scores {
        Some(RouterScores::Logits(r, t)) => (Some((r, t)), true),
        Some(RouterScores::Choice(r, t)) => (Some((r, t)), false),
        None => (None, true),
    };
    let (ref_ids, target_ids) = (ref_ids.to_ids(), target_ids.to_ids());
    let k = k.max(1);
    let tokens = ref_ids.len().min(target_ids.len()) / k;
    let experts = logits.map(|(r, _)| r.len() / tokens.max(1)).unwrap_or(0);
    let (mut rr, mut tr) = (Vec::with_capacity(experts), Vec::with_capacity(experts));
    let mut flipped = Vec::new();
    for t in 0..tokens {
        let (a, b) = (&ref_ids[t * k..(t + 1) * k], &target_ids[t * k..(t + 1) * k]);
        let mut sa = a.to_vec();
        let mut sb = b.to_vec();
        sa.sort_unstable();
        sb.sort_unstable();
        if sa == sb {
            continue;
        }
        let (ref_margin, perturbation) = match logits {
            Some((rl, tl)) if experts > 0 => {
                rl.row_into(t * experts..(t + 1) * experts, &mut rr);
                tl.row_into(t * experts..(t + 1) * experts, &mut tr);
                if as_probabilities {
                    (rr, tr) = (softmax(&rr), softmax(&tr));
                }
                let change = rr.iter().zip(&tr).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
                (top_k_gap(&rr, k), Some(change))
            }
            _ => (None, None),
        };
        let near_tie = match (ref_margin, perturbation) {
            (Some(m), Some(p)) => m <= 2.0 * p,
            (Some(m), None) => m <= NEAR_TIE_MARGIN,
            _ => false,
        };
        flipped.push(FlippedToken {
            text: None,
            token: t,
            ref_experts: a.iter().map(|&x| x as i32).collect(),
            target_experts: b.iter().map(|&x| x as i32).collect(),
            ref_margin,
            perturbation,
            near_tie,
        });
    }
    flipped
}

/// Per-slot tensors (`[T,k,...]`) of both runs aligned by expert id on the
/// tokens whose expert sets agree.
pub struct Aligned {
    /// Reference values, `[rows, inner]`.
    pub reference: Vec<f64>,
    /// Target values, `[rows, inner]`.
    pub target: Vec<f64>,
    /// (token, reference slot, expert) of each row.
    pub rows: Vec<(usize, usize, i32)>,
    /// Elements per row.
    pub inner: usize,
}

/// Aligns `[T,k,inner]` tensors by expert id using each side's `[T,k]` ids.
pub fn align_by_expert(
    reference: Elements<'_>,
    target: Elements<'_>,
    ref_ids: Elements<'_>,
    target_ids: Elements<'_>,
    k: usize,
) -> Aligned {
    let (ref_ids, target_ids) = (ref_ids.to_ids(), target_ids.to_ids());
    let k = k.max(1);
    let tokens = ref_ids.len().min(target_ids.len()) / k;
    let inner = reference.len() / (tokens * k).max(1);
    let mut out = Aligned { reference: Vec::new(), target: Vec::new(), rows: Vec::new(), inner };
    for t in 0..tokens {
        let (a, b) = (&ref_ids[t * k..(t + 1) * k], &target_ids[t * k..(t + 1) * k]);
        let mut sa = a.to_vec();
        let mut sb = b.to_vec();
        sa.sort_unstable();
        sb.sort_unstable();
        if sa != sb {
            continue;
        }
        for (j, e) in a.iter().enumerate() {
            let Some(jt) = b.iter().position(|x| x == e) else { continue };
            let (ra, rb) = ((t * k + j) * inner, (t * k + jt) * inner);
            reference.slice(ra..ra + inner).append_to(&mut out.reference);
            target.slice(rb..rb + inner).append_to(&mut out.target);
            out.rows.push((t, j, *e as i32));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::Elements::{F64, I32};

    #[test]
    fn sets_not_order_decide_a_flip_and_margins_classify_it() {
        // token 0: same set, other order; token 1: expert 3 replaced by 2.
        let ref_ids = [0.0, 1.0, 1.0, 3.0];
        let tgt_ids = [1.0, 0.0, 1.0, 2.0];
        let ref_logits = [5.0, 4.0, 0.0, -9.0, 0.0, 3.0, 1.0, 1.0001];
        let tgt_logits = [5.0, 4.0, 0.0, -9.0, 0.0, 3.0, 1.0002, 1.0001];
        let flipped = compare_indices(
            F64(&ref_ids),
            F64(&tgt_ids),
            2,
            Some(RouterScores::Logits(F64(&ref_logits), F64(&tgt_logits))),
        );
        assert_eq!(flipped.len(), 1);
        assert_eq!(flipped[0].token, 1);
        assert!(flipped[0].near_tie, "{:?}", flipped[0]);
        // A flip across a wide margin is a wrong router.
        let far = compare_indices(
            F64(&[0.0, 1.0]),
            F64(&[0.0, 3.0]),
            2,
            Some(RouterScores::Logits(F64(&[9.0, 8.0, 0.0, -5.0]), F64(&[9.0, 8.0, 0.0, -5.0]))),
        );
        assert!(!far[0].near_tie);
    }

    #[test]
    fn choice_scores_give_their_own_gaps_not_softmax_ones() {
        // DeepSeek's biased sigmoid scores (negative: the bias is larger
        // than any score): experts 0 and 1 chosen, expert 2 a hair below.
        let reference = [-0.60, -0.62, -0.6205, -0.9];
        let target = [-0.60, -0.6206, -0.6204, -0.9];
        let flipped = compare_indices(
            F64(&[0.0, 1.0]),
            F64(&[0.0, 2.0]),
            2,
            Some(RouterScores::Choice(F64(&reference), F64(&target))),
        );
        let f = &flipped[0];
        assert!((f.ref_margin.unwrap() - 5e-4).abs() < 1e-12, "{f:?}");
        assert!((f.perturbation.unwrap() - 6e-4).abs() < 1e-12 && f.near_tie, "{f:?}");
        // The same ids with a clear gap: a wrong router.
        let far = compare_indices(
            F64(&[0.0, 1.0]),
            F64(&[0.0, 2.0]),
            2,
            Some(RouterScores::Choice(F64(&[-0.6, -0.62, -0.7, -0.9]), F64(&[-0.6, -0.62, -0.7, -0.9]))),
        );
        assert!(!far[0].near_tie && (far[0].ref_margin.unwrap() - 0.08).abs() < 1e-12);
    }

    #[test]
    fn per_expert_rows_align_by_id_and_skip_flipped_tokens() {
        // [T=2,k=2,inner=1]: token 0 swapped slots, token 1 flipped.
        let aligned = align_by_expert(
            F64(&[10.0, 20.0, 30.0, 40.0]),
            F64(&[20.0, 10.0, 31.0, 40.0]),
            I32(&[4, 7, 1, 2]),
            I32(&[7, 4, 1, 5]),
            2,
        );
        assert_eq!(aligned.rows, [(0, 0, 4), (0, 1, 7)]);
        assert_eq!(aligned.reference, aligned.target);
    }
}
