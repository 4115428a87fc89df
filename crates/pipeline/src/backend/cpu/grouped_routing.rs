//! DeepSeek-V3's router (`noaux_tc`), as Hugging Face transformers'
//! `DeepseekV3TopkRouter` and DeepSeek's reference compute it: sigmoid
//! scores of the router logits; the correction bias
//! (`e_score_correction_bias`) added to choose, never to weight; experts in
//! `n_group` groups, each group scored by the sum of its two best biased
//! scores, the best `topk_group` groups kept and the others masked to -inf
//! (never 0: with negative biased scores a 0 would win); the `top_k`
//! experts of the kept groups; their unbiased scores as weights,
//! renormalised (over their sum + 1e-20) when `norm_topk_prob`, times
//! `routed_scaling_factor`. In f64; ties go to the lower index; with
//! [`KnownBug`]s of the router where a CPU target names one.

/// The router's hyper-parameters (config.json's names).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GroupedTopK {
    /// `n_group`: groups of consecutive experts.
    pub n_group: usize,
    /// `topk_group`: groups kept.
    pub topk_group: usize,
    /// `num_experts_per_tok`.
    pub top_k: usize,
    /// `norm_topk_prob`.
    pub normalise: bool,
    /// `routed_scaling_factor`.
    pub scaling: f64,
}

use super::known_bugs::KnownBug;

/// One token's routing.
#[derive(Debug, Clone, PartialEq)]
pub struct Routed {
    /// The chosen experts, best biased score first.
    pub experts: Vec<i32>,
    /// Their weights.
    pub weights: Vec<f32>,
    /// The kept groups, best first.
    pub groups: Vec<i32>,
    /// Every group's score: the sum of its two best biased scores.
    pub group_scores: Vec<f64>,
}

impl GroupedTopK {
    /// Why these parameters cannot route `experts` experts, if they cannot.
    pub fn check(&self, experts: usize) -> Result<(), String> {
        if self.n_group == 0 || !experts.is_multiple_of(self.n_group) {
            return Err(format!("n_group {} does not divide the {experts} routed experts", self.n_group));
        }
        if self.topk_group == 0 || self.topk_group > self.n_group {
            return Err(format!("topk_group {} must be between 1 and n_group {}", self.topk_group, self.n_group));
        }
        let kept = self.topk_group * experts / self.n_group;
        if self.top_k == 0 || self.top_k > kept {
            return Err(format!(
                "num_experts_per_tok {} must be between 1 and the {kept} experts of the topk_group {} groups kept",
                self.top_k, self.topk_group
            ));
        }
        Ok(())
    }

    /// Routes one token with router logits `logits` and correction `bias`
    /// (one per expert). The parameters must pass [`GroupedTopK::check`].
    pub fn route(&self, logits: &[f32], bias: &[f32]) -> Routed {
        self.route_as(logits, bias, None)
    }

    /// [`GroupedTopK::route`], or the same with one of the public routing
    /// bugs ([`KnownBug`]) where `bug` names one (a stand-in target for
    /// testing that moetrace finds it; other bugs route correctly).
    pub fn route_as(&self, logits: &[f32], bias: &[f32], bug: Option<KnownBug>) -> Routed {
        let scores: Vec<f64> = logits.iter().map(|&x| 1.0 / (1.0 + (-(x as f64)).exp())).collect();
        let biased: Vec<f64> = scores.iter().zip(bias).map(|(s, &b)| s + b as f64).collect();
        let per_group = logits.len() / self.n_group;
        let group_score = |g: usize| {
            let mut best = best_first(&biased[g * per_group..(g + 1) * per_group]);
            best.truncate(2);
            best.iter().map(|&i| biased[g * per_group + i]).sum::<f64>()
        };
        let group_scores: Vec<f64> = (0..self.n_group).map(group_score).collect();
        let mut groups = best_first(&group_scores);
        groups.truncate(self.topk_group);
        let masked: Vec<f64> = biased
            .iter()
            .enumerate()
            .map(|(i, &s)| match (groups.contains(&(i / per_group)), bug) {
                (true, _) => s,
                (false, Some(KnownBug::MaskedGroupsAtZero)) => 0.0,
                (false, _) => f64::NEG_INFINITY,
            })
            .collect();
        let mut experts = best_first(&masked);
        experts.truncate(self.top_k);
        let weighing = if bug == Some(KnownBug::BiasInCombineWeights) { &biased } else { &scores };
        let chosen: Vec<f64> = experts.iter().map(|&i| weighing[i]).collect();
        let denominator = if self.normalise { chosen.iter().sum::<f64>() + 1e-20 } else { 1.0 };
        let scaling = if bug == Some(KnownBug::RoutedScalingDropped) { 1.0 } else { self.scaling };
        Routed {
            weights: chosen.iter().map(|w| (w / denominator * scaling) as f32).collect(),
            experts: experts.iter().map(|&i| i as i32).collect(),
            groups: groups.iter().map(|&g| g as i32).collect(),
            group_scores,
        }
    }
}

/// Indices of `values`, largest first (NaN last), ties to the lower index.
fn best_first(values: &[f64]) -> Vec<usize> {
    let key = |i: usize| if values[i].is_nan() { f64::NEG_INFINITY } else { values[i] };
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| key(b).total_cmp(&key(a)).then(a.cmp(&b)));
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_groups_lose_even_when_every_biased_score_is_negative() {
        // 2 groups of 2; every biased score negative, group 1 the better.
        let router = GroupedTopK { n_group: 2, topk_group: 1, top_k: 2, normalise: true, scaling: 1.0 };
        let logits = [3.0f32, 2.0, 0.0, -0.5];
        let bias = [-3.0f32, -3.0, -1.0, -1.0];
        let r = router.route(&logits, &bias);
        assert_eq!((r.groups.clone(), r.experts.clone()), (vec![1], vec![2, 3]));
        // The weights are the unbiased sigmoid scores, renormalised.
        let (a, b) = (0.5f64, 1.0 / (1.0 + 0.5f64.exp()));
        assert!((r.weights[0] as f64 - a / (a + b)).abs() < 1e-7 && (r.weights[1] as f64 - b / (a + b)).abs() < 1e-7);
    }

    #[test]
    fn parameters_that_cannot_route_are_named() {
        let ok = GroupedTopK { n_group: 8, topk_group: 4, top_k: 8, normalise: true, scaling: 2.5 };
        assert!(ok.check(256).is_ok());
        let err = GroupedTopK { n_group: 3, ..ok }.check(256).unwrap_err();
        assert!(err.contains("does not divide"), "{err}");
        let err = GroupedTopK { topk_group: 9, ..ok }.check(256).unwrap_err();
        assert!(err.contains("topk_group 9"), "{err}");
        let err = GroupedTopK { top_k: 200, ..ok }.check(256).unwrap_err();
        assert!(err.contains("128 experts"), "{err}");
    }
}
