//! [`Row`]: the comparison of one (step, layer, stage), as reports hold it.

use serde::{Deserialize, Serialize};
use stage_types::SaveTensorStage;

use crate::expected::{Expected, FindingReason};
use crate::{FlippedToken, Side, TensorMetrics, Verdict};

/// The comparison of one (step, layer, stage).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    /// Step.
    pub step: usize,
    /// Layer (None for model stages).
    pub layer: Option<usize>,
    /// Stage.
    #[serde(with = "stage_name")]
    pub stage: SaveTensorStage,
    /// Verdict.
    pub verdict: Verdict,
    /// The rel_l2 tolerance applied.
    #[serde(with = "crate::json_float::float")]
    pub tolerance: f64,
    /// Metrics, when both sides were comparable.
    pub metrics: Option<TensorMetrics>,
    /// Token with the largest error (or the first flipped token).
    pub worst_token: Option<usize>,
    /// That token's text, when the capture recorded token texts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worst_token_text: Option<String>,
    /// Expert with the largest error (per-expert stages).
    pub worst_expert: Option<i32>,
    /// Expert-parallel rank with the largest error (the per-rank stages
    /// moe_dispatch and moe_combine).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worst_rank: Option<usize>,
    /// Tokens compared, for per-expert stages (those whose expert set agrees).
    pub compared_tokens: Option<usize>,
    /// Tokens whose expert set differs (moe_router_indices).
    #[serde(default)]
    pub flipped: Vec<FlippedToken>,
    /// How the worst row stands against the error a correct
    /// implementation of the target's contract makes there (when an
    /// emulation ran beside the target; see [`crate::expected`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected: Option<Expected>,
    /// Set when this row is a finding (local errors; see
    /// [`crate::expected::mark_findings`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finding: Option<FindingReason>,
    /// Set, instead of a finding, when this row's error follows from a
    /// finding in one of its inputs at the same token (`check`: the capture
    /// holds a value of that input its engine did not consume): where that
    /// finding is, e.g. `moe_expert_out at step 0 layer 1 token 2`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub follows: Option<String>,
    /// moe_expert_clamp: how many of the gate and up (slot, column) pairs
    /// the clamp changed, in the reference and in the target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clamp_changes: Option<[usize; 2]>,
    /// A `[T, W]` stage whose error is the same vector on every token (a
    /// constant added, as a bias is, or one left out): that offset's rms
    /// over the reference's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub same_offset: Option<f64>,
}

pub(crate) mod stage_name {
    use serde::{Deserialize, Deserializer, Serializer};
    use stage_types::SaveTensorStage;

    pub fn serialize<S: Serializer>(stage: &SaveTensorStage, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(stage.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SaveTensorStage, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

impl Row {
    /// A row with verdict Ok and no metrics yet.
    pub fn new(step: usize, layer: Option<usize>, stage: SaveTensorStage, tolerance: f64) -> Self {
        Row {
            step,
            layer,
            stage,
            verdict: Verdict::Ok,
            tolerance,
            metrics: None,
            worst_token: None,
            worst_token_text: None,
            worst_expert: None,
            worst_rank: None,
            compared_tokens: None,
            flipped: Vec::new(),
            expected: None,
            finding: None,
            follows: None,
            clamp_changes: None,
            same_offset: None,
        }
    }

    /// Sets the metrics and the verdict they imply.
    pub fn set_metrics(&mut self, m: TensorMetrics) {
        self.verdict = if m.has_non_finite() {
            let reference = m.ref_nan + m.ref_inf > 0;
            let target = m.target_nan + m.target_inf > 0;
            let side = match (reference, target) {
                (true, true) => Side::Both,
                (true, false) => Side::Reference,
                _ => Side::Target,
            };
            Verdict::Nan { side }
        } else if m.rel_l2.is_nan() || (m.rel_l2 > self.tolerance && !self.small_in_one_column(&m)) {
            Verdict::Diverged
        } else {
            Verdict::Ok
        };
        self.metrics = Some(m);
    }

    /// Whether a one-column stage (one dot product a token, like the
    /// shared expert gate's logit) is off by no more than the tolerance in
    /// absolute terms: its relative error is ill-conditioned on values
    /// near zero (bf16's 7.5e-3 on a logit of 0.06 is 0.12 relative), so
    /// such a tensor diverges only when both errors are above it.
    fn small_in_one_column(&self, m: &TensorMetrics) -> bool {
        self.stage.shape().ends_with(",1]") && m.max_abs_diff <= self.tolerance
    }

    /// rel_l2, if measured.
    pub fn rel_l2(&self) -> Option<f64> {
        self.metrics.as_ref().map(|m| m.rel_l2)
    }

    /// `step S layer L stage` (or `step S stage` for model stages).
    pub fn place(&self) -> String {
        match self.layer {
            Some(l) => format!("step {} layer {} {}", self.step, l, self.stage),
            None => format!("step {} {}", self.step, self.stage),
        }
    }

    pub(crate) fn detail(&self) -> String {
        let mut parts = Vec::new();
        if let Some(m) = &self.metrics {
            parts.push(format!("rel_l2 {:.3e} (tol {:.0e})", m.rel_l2, self.tolerance));
            parts.push(format!("max|d| {:.3e} at {:?}", m.max_abs_diff, m.max_abs_index));
            parts.push(format!("min cos {:.6}", m.min_row_cosine));
            parts.push(format!("worst row {:.3e}", m.worst_row_error));
            if let Some(e) = &self.expected {
                parts.push(format!(
                    "ratio to expected {} (row {}: {:.3e} vs {:.3e})",
                    ratio_text(e.ratio),
                    e.row,
                    e.error,
                    e.expected
                ));
            }
            if m.has_non_finite() {
                parts.push(format!("nan/inf ref {}/{} target {}/{}", m.ref_nan, m.ref_inf, m.target_nan, m.target_inf));
            }
        }
        // A routing row names its tokens in the flip list below.
        if let Some(t) = self.worst_token.filter(|t| self.flipped.first().is_none_or(|f| f.token != *t)) {
            match &self.worst_token_text {
                Some(text) => parts.push(format!("token {t} {text:?}")),
                None => parts.push(format!("token {t}")),
            }
        }
        if let Some(e) = self.worst_expert {
            parts.push(format!("expert {e}"));
        }
        if let Some(rank) = self.worst_rank {
            parts.push(format!("rank {rank}"));
        }
        if let Some([reference, target]) = self.clamp_changes {
            parts.push(format!(
                "the clamp changed {reference} (slot, column)s in the reference, {target} in the target"
            ));
        }
        if let Some(offset) = self.same_offset {
            parts.push(format!(
                "the same error on every token, an offset of {offset:.2e} of the values' rms (a constant added, as a bias is, or one left out)"
            ));
        }
        let ids = if self.stage == SaveTensorStage::MoeRouterGroups { "groups" } else { "experts" };
        for f in self.flipped.iter().take(4) {
            let margin = f.ref_margin.map(|m| format!("{m:.2e}")).unwrap_or_else(|| "?".into());
            let perturbation = f.perturbation.map(|p| format!("{p:.2e}")).unwrap_or_else(|| "?".into());
            let text = f.text.as_ref().map(|t| format!(" {t:?}")).unwrap_or_default();
            parts.push(format!(
                "token {}{text} {ids} {:?} -> {:?}, {}ref margin {margin}, perturbation {perturbation}{}",
                f.token,
                f.ref_experts,
                f.target_experts,
                if f.group_flip { "its kept groups differ: group " } else { "" },
                if f.near_tie { " (near-tie)" } else { "" }
            ));
        }
        if self.flipped.len() > 4 {
            parts.push(format!("... {} flipped tokens in all", self.flipped.len()));
        }
        parts.join(", ")
    }
}

/// `12.3x` (or `inf`).
pub(crate) fn ratio_text(ratio: f64) -> String {
    if ratio.is_finite() { format!("{ratio:.2}x") } else { "inf".into() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::tensor_metrics;
    use crate::view::Elements;

    fn verdict(stage: SaveTensorStage, reference: &[f32], target: &[f32], shape: &[usize]) -> Verdict {
        let mut row = Row::new(0, Some(0), stage, 3e-2);
        row.set_metrics(tensor_metrics(Elements::F32(reference), Elements::F32(target), shape, 0));
        row.verdict
    }

    #[test]
    fn a_one_column_stage_near_zero_diverges_only_when_its_absolute_error_does() {
        // A logit of 0.06 off by 7.5e-3: 0.12 relative, bf16-sized absolute.
        assert_eq!(verdict(SaveTensorStage::MoeSharedLogit, &[0.06], &[0.0675], &[1, 1]), Verdict::Ok);
        assert_eq!(verdict(SaveTensorStage::MoeSharedLogit, &[0.06], &[0.2], &[1, 1]), Verdict::Diverged);
        // Wider stages keep the relative measure.
        let (a, b) = ([0.06f32, 0.0], [0.0675f32, 0.0]);
        assert_eq!(verdict(SaveTensorStage::FfnNorm, &a, &b, &[1, 2]), Verdict::Diverged);
    }
}
