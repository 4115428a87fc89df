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
    /// DeepSeek's kept groups differ for this token: the margin and
    /// perturbation are the group choice's, which the experts followed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub group_flip: bool,
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
    /// bias, `moe_router_choice`, or its group scores): margins are their
    /// own gaps. With `groups`, only the experts of the kept groups
    /// competed: a token whose kept groups differ owes its flip to the
    /// group choice and is judged by the group margin; one whose groups
    /// agree is judged by the gap among the experts of those groups.
    /// Without, every expert counts as a candidate (a margin that can be
    /// too small or too large where groups were masked).
    Choice(Elements<'a>, Elements<'a>, Option<GroupChoice<'a>>),
}

/// DeepSeek's group choice of both runs: the group scores `[T,G]` and the
/// kept groups `[T,topk_group]` of (reference, target). Group g holds the
/// experts `g*E/G .. (g+1)*E/G`.
#[derive(Debug, Clone, Copy)]
pub struct GroupChoice<'a> {
    /// Group scores of (reference, target).
    pub scores: (Elements<'a>, Elements<'a>),
    /// Kept groups of (reference, target).
    pub kept: (Elements<'a>, Elements<'a>),
}

impl GroupChoice<'_> {
    /// Groups per token and groups kept per token, for `tokens` tokens.
    fn dims(&self, tokens: usize) -> (usize, usize) {
        let t = tokens.max(1);
        (self.scores.0.len() / t, self.kept.0.len() / t)
    }

    /// Token `t`'s kept groups of (reference, target), each sorted.
    fn kept_sets(&self, t: usize, kept: usize) -> (Vec<i64>, Vec<i64>) {
        let set = |e: &Elements<'_>| {
            let mut v: Vec<i64> = e.slice(t * kept..(t + 1) * kept).to_ids();
            v.sort_unstable();
            v
        };
        (set(&self.kept.0), set(&self.kept.1))
    }

    /// (reference margin, perturbation) of token `t`'s group choice.
    fn margin(&self, t: usize, n_group: usize, kept: usize) -> (Option<f64>, Option<f64>) {
        let (mut r, mut g) = (Vec::new(), Vec::new());
        self.scores.0.row_into(t * n_group..(t + 1) * n_group, &mut r);
        self.scores.1.row_into(t * n_group..(t + 1) * n_group, &mut g);
        (top_k_gap(&r, kept), Some(largest_change(&r, &g)))
    }
}

/// The gap between the k-th and (k+1)-th largest of scores that choose
/// as they are.
pub fn top_k_gap(scores: &[f64], k: usize) -> Option<f64> {
    let mut p = scores.to_vec();
    p.sort_by(|a, b| b.total_cmp(a));
    (k < p.len()).then(|| p[k - 1] - p[k])
}

/// The largest change of any score, over the finite pairs.
fn largest_change(reference: &[f64], target: &[f64]) -> f64 {
    reference
        .iter()
        .zip(target)
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// Compares `[T,k]` ids (experts, or DeepSeek's kept groups). `scores`
/// are what (reference, target) chose by, when both were captured.
pub fn compare_indices(
    ref_ids: Elements<'_>,
    target_ids: Elements<'_>,
    k: usize,
    scores: Option<RouterScores<'_>>,
) -> Vec<FlippedToken> {
    let (logits, as_probabilities, groups) = match scores {
        Some(RouterScores::Logits(r, t)) => (Some((r, t)), true, None),
        Some(RouterScores::Choice(r, t, groups)) => (Some((r, t)), false, groups),
        None => (None, true, None),
    };
    let (ref_ids, target_ids) = (ref_ids.to_ids(), target_ids.to_ids());
    let k = k.max(1);
    let tokens = ref_ids.len().min(target_ids.len()) / k;
    let experts = logits.map(|(r, _)| r.len() / tokens.max(1)).unwrap_or(0);
    let (n_group, kept) = groups.map(|g| g.dims(tokens)).unwrap_or((0, 0));
    let groups = groups.filter(|_| n_group > 0 && kept > 0 && experts.is_multiple_of(n_group));
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
        let scored = match logits {
            Some((rl, tl)) if experts > 0 => {
                rl.row_into(t * experts..(t + 1) * experts, &mut rr);
                tl.row_into(t * experts..(t + 1) * experts, &mut tr);
                if as_probabilities {
                    (rr, tr) = (softmax(&rr), softmax(&tr));
                }
                true
            }
            _ => false,
        };
        let (ref_margin, perturbation, group_flip) = match (scored, groups) {
            (false, _) => (None, None, false),
            (true, None) => (top_k_gap(&rr, k), Some(largest_change(&rr, &tr)), false),
            (true, Some(g)) => {
                let (ref_kept, target_kept) = g.kept_sets(t, kept);
                if ref_kept != target_kept {
                    // The experts followed the groups: the group choice's
                    // own margin judges the flip.
                    let (margin, change) = g.margin(t, n_group, kept);
                    (margin, change, true)
                } else {
                    // Only the kept groups' experts competed.
                    let per_group = experts / n_group;
                    for (e, (x, y)) in rr.iter_mut().zip(tr.iter_mut()).enumerate() {
                        if ref_kept.binary_search(&((e / per_group) as i64)).is_err() {
                            (*x, *y) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
                        }
                    }
                    (top_k_gap(&rr, k), Some(largest_change(&rr, &tr)), false)
                }
            }
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
            group_flip,
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
            Some(RouterScores::Choice(F64(&reference), F64(&target), None)),
        );
        let f = &flipped[0];
        assert!((f.ref_margin.unwrap() - 5e-4).abs() < 1e-12, "{f:?}");
        assert!((f.perturbation.unwrap() - 6e-4).abs() < 1e-12 && f.near_tie, "{f:?}");
        // The same ids with a clear gap: a wrong router.
        let far = compare_indices(
            F64(&[0.0, 1.0]),
            F64(&[0.0, 2.0]),
            2,
            Some(RouterScores::Choice(F64(&[-0.6, -0.62, -0.7, -0.9]), F64(&[-0.6, -0.62, -0.7, -0.9]), None)),
        );
        assert!(!far[0].near_tie && (far[0].ref_margin.unwrap() - 0.08).abs() < 1e-12);
    }

    #[test]
    fn grouped_margins_count_only_the_kept_groups_and_a_group_flip_is_judged_by_its_groups() {
        // 3 groups of 2 experts, 1 kept, top-2 (one token). The kept group
        // 1 holds experts 2 and 3; group 0's experts score higher but were
        // masked. The target chose expert 4 of group 2 in place of expert 3.
        let choice = [0.9, 0.8, 0.5, 0.3, 0.29, 0.0];
        let target_choice = [0.9, 0.8, 0.5, 0.3, 0.2905, 0.0];
        let scores = [1.7, 0.8, 0.29];
        let (kept, target_kept) = ([1.0], [1.0]);
        let groups = GroupChoice { scores: (F64(&scores), F64(&scores)), kept: (F64(&kept), F64(&target_kept)) };
        let ids = (F64(&[2.0, 3.0]), F64(&[2.0, 4.0]));
        let flip = |groups| {
            compare_indices(ids.0, ids.1, 2, Some(RouterScores::Choice(F64(&choice), F64(&target_choice), groups)))
                .remove(0)
        };
        // Blind to the groups the gap looks like 0.8 - 0.5 (a wrong
        // router); among the kept group's experts it is 0.3 - (-inf): expert
        // 4 could not have been chosen at all, so the flip is a wrong router
        // for the right reason, with an infinite margin.
        let blind = flip(None);
        assert!((blind.ref_margin.unwrap() - 0.3).abs() < 1e-12 && !blind.near_tie, "{blind:?}");
        let aware = flip(Some(groups));
        assert_eq!(aware.ref_margin, Some(f64::INFINITY), "{aware:?}");
        assert!(!aware.near_tie && !aware.group_flip);
        // With groups 1 and 2 kept, experts 3 and 4 are 0.3 and 0.29: a
        // near-tie the blind margin (0.8 - 0.5) would call a wrong router.
        let two = ([1.0, 2.0], [1.0, 2.0]);
        let groups = GroupChoice { scores: (F64(&scores), F64(&scores)), kept: (F64(&two.0), F64(&two.1)) };
        let choice_t = [0.9, 0.8, 0.5, 0.2899, 0.2905, 0.0];
        let near = compare_indices(
            ids.0,
            ids.1,
            2,
            Some(RouterScores::Choice(F64(&[0.9, 0.8, 0.5, 0.3, 0.29, 0.0]), F64(&choice_t), Some(groups))),
        )
        .remove(0);
        assert!(near.near_tie && (near.ref_margin.unwrap() - 0.01).abs() < 1e-12, "{near:?}");
        // Kept groups that differ: the group scores' margin and change judge.
        let group_scores_t = [1.7, 0.7999, 0.8001];
        let flipped_groups = GroupChoice {
            scores: (F64(&[1.7, 0.8, 0.7995]), F64(&group_scores_t)),
            kept: (F64(&[0.0, 1.0]), F64(&[0.0, 2.0])),
        };
        let f = compare_indices(
            F64(&[0.0, 2.0]),
            F64(&[0.0, 4.0]),
            2,
            Some(RouterScores::Choice(F64(&choice), F64(&target_choice), Some(flipped_groups))),
        )
        .remove(0);
        assert!(f.group_flip && f.near_tie, "{f:?}");
        assert!((f.ref_margin.unwrap() - 5e-4).abs() < 1e-12 && (f.perturbation.unwrap() - 6e-4).abs() < 1e-9, "{f:?}");
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
