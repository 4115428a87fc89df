//! The CPU backend's Mixture-of-Experts operations: the per-expert
//! projections and the weighted sum (with a shared expert's term).

use super::CpuBackend;
use crate::backend::{SharedTerm, Slot};
use crate::error::{PipelineError, Result};
use crate::tensor::HostTensor;
use crate::weights::WeightId;

/// A shared expert's output rows `[T,H]` and its per-token weights `[T]`
/// (None: ungated).
pub(super) type SharedRows<'a> = (&'a [f32], Option<&'a [f32]>);

impl CpuBackend {
    /// `expert_linear`: each chosen expert's projection of its slots' rows.
    pub(super) fn expert_projection(
        &mut self,
        input: Slot,
        indices: Slot,
        experts: &[WeightId],
        out: Slot,
    ) -> Result<()> {
        let it = self.slot(indices)?;
        let idx = it
            .as_i32()
            .ok_or_else(|| PipelineError::BadInput(format!("stage `{indices}` must hold int32 expert ids")))?;
        let (t_len, k) = (it.shape[0], it.shape[1]);
        let xt = self.slot(input)?;
        let per_slot = xt.shape.len() == 3;
        let (_, width, x) = self.rows(input)?;
        let expected_rows = if per_slot { t_len * k } else { t_len };
        if x.len() != expected_rows * width {
            return Err(PipelineError::BadInput(format!(
                "expert input `{input}` has shape {:?}, expected {} rows for indices [{t_len},{k}]",
                xt.shape, expected_rows
            )));
        }
        let n = self.store.get(experts[0]).shape[0];
        let mut data = vec![0.0f32; t_len * k * n];
        let mut used: Vec<i32> = idx.to_vec();
        used.sort_unstable();
        used.dedup();
        for e in used {
            let w = experts.get(e as usize).filter(|_| e >= 0).map(|&id| self.store.get(id)).ok_or_else(|| {
                PipelineError::BadInput(format!("expert id {e} in `{indices}` is out of range 0..{}", experts.len()))
            })?;
            self.check_width(input, width, w.row_len(), &format!("expert weight `{}`", w.describe()))?;
            let slots: Vec<usize> = (0..t_len * k).filter(|&s| idx[s] == e).collect();
            let mut inputs: Vec<&[f32]> = slots
                .iter()
                .map(|&s| {
                    let row = if per_slot { s } else { s / k };
                    &x[row * width..(row + 1) * width]
                })
                .collect();
            // A rank weighting its experts' inputs (the known bug).
            let weighted: Vec<Vec<f32>>;
            if let Some(weights) = self.weighted_inputs(e, per_slot)? {
                weighted =
                    slots.iter().zip(&inputs).map(|(&s, x)| x.iter().map(|v| v * weights[s]).collect()).collect();
                inputs = weighted.iter().map(Vec::as_slice).collect();
            }
            let part = self.matmul(&inputs, w);
            for (&s, src) in slots.iter().zip(part.chunks(n)) {
                data[s * n..(s + 1) * n].copy_from_slice(src);
            }
        }
        self.set(out, HostTensor::f32(vec![t_len, k, n], data));
        Ok(())
    }

    /// The shared expert's output rows and, when gated, its weights.
    pub(super) fn shared_term(&self, shared: Option<SharedTerm>) -> Result<Option<SharedRows<'_>>> {
        let Some(term) = shared else { return Ok(None) };
        let weight = match term.weight {
            None => None,
            Some(slot) => Some(self.rows(slot)?.2),
        };
        Ok(Some((self.rows(term.out)?.2, weight)))
    }

    /// `moe_combine`: the routed sum and the shared expert's term, in f64.
    pub(super) fn weighted_sum(
        &mut self,
        expert_out: Slot,
        weights: Slot,
        shared: Option<SharedTerm>,
        out: Slot,
    ) -> Result<()> {
        let (t_len, k, h) =
            SharedTerm::combine_shapes(expert_out, weights, shared, |s| Ok(self.slot(s)?.shape.clone()))?;
        let shared = self.shared_term(shared)?;
        let (x, w) = (self.rows(expert_out)?.2, self.rows(weights)?.2);
        let mut data = vec![0.0f32; t_len * h];
        for (t, row) in data.chunks_mut(h).enumerate() {
            // This token's shared expert output and its weight (1 ungated).
            let term = shared.as_ref().map(|(values, g)| (&values[t * h..(t + 1) * h], g.map_or(1.0, |g| g[t] as f64)));
            for (d, o) in row.iter_mut().enumerate() {
                let mut sum: f64 = (0..k).map(|j| w[t * k + j] as f64 * x[(t * k + j) * h + d] as f64).sum();
                if let Some((values, g)) = term {
                    sum += g * values[d] as f64;
                }
                *o = sum as f32;
            }
        }
        self.set(out, HostTensor::f32(vec![t_len, h], data));
        Ok(())
    }
}
