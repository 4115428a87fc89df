//! The CPU's expert-parallel ranks ([`ExpertParallelOps`]): virtual ranks
//! computed one after another, each into its own rows, f64 sums in the
//! order the trait names.

use super::CpuBackend;
use super::known_bugs::KnownBug;
use crate::backend::expert_parallel::{ExpertParallelOps, dispatch_ranks};
use crate::backend::{SharedTerm, Slot};
use crate::error::{PipelineError, Result};
use crate::parallel_config::ExpertParallel;
use crate::tensor::HostTensor;

impl CpuBackend {
    /// With [`KnownBug::WeightBeforeExperts`], for expert `e` on that rank
    /// and a per-token input (gate and up): the routing weights
    /// (moe_router, by slot) its input rows are multiplied by. None
    /// otherwise.
    pub(super) fn weighted_inputs(&self, e: i32, per_slot: bool) -> Result<Option<&[f32]>> {
        let (Some(KnownBug::WeightBeforeExperts(rank)), Some((layout, experts))) = (self.bug, self.ranks.as_ref())
        else {
            return Ok(None);
        };
        if per_slot || layout.server(e as usize, *experts) != rank {
            return Ok(None);
        }
        Ok(Some(self.rows(Slot::MoeRouter)?.2))
    }

    /// The routing weight rank `rank` multiplies its slot's output by: 1
    /// where the known bug weighted its inputs instead.
    fn weight_after(&self, rank: usize, w: f32) -> f64 {
        if self.bug == Some(KnownBug::WeightBeforeExperts(rank)) { 1.0 } else { w as f64 }
    }

    /// The int32 data of a slot, with its shape.
    fn ints(&self, slot: Slot) -> Result<(&[usize], &[i32])> {
        let t = self.slot(slot)?;
        let data =
            t.as_i32().ok_or_else(|| PipelineError::BadInput(format!("stage `{slot}` must hold int32 values")))?;
        Ok((&t.shape, data))
    }
}

impl ExpertParallelOps for CpuBackend {
    fn expert_map(&mut self, layout: &ExpertParallel, experts: usize, out: Slot) -> Result<()> {
        let ranks = layout.ranks;
        let mut map = vec![0i32; ranks * experts];
        for (r, row) in map.chunks_mut(experts.max(1)).enumerate() {
            for (e, m) in row.iter_mut().enumerate() {
                // The known bug: this rank's view of a replicated expert is
                // its home rank, not the copy the others send to.
                let stale =
                    self.bug == Some(KnownBug::ReplicaMismatch(r)) && layout.replicas.iter().any(|(x, _)| *x == e);
                *m = if stale { layout.rank_of(e, experts) } else { layout.server(e, experts) } as i32;
            }
        }
        self.set(out, HostTensor::i32(vec![ranks, experts], map));
        self.ranks = Some((layout.clone(), experts));
        Ok(())
    }

    fn dispatch(&mut self, indices: Slot, map: Slot, out: Slot) -> Result<()> {
        let (shape, ids) = self.ints(indices)?;
        let (t_len, k) = (shape[0], shape[1]);
        let (map_shape, views) = self.ints(map)?;
        let [ranks, experts] = map_shape[..] else {
            return Err(PipelineError::BadInput(format!("`{map}` is {map_shape:?}, expected [R, E]")));
        };
        let mut rows = vec![-1i32; ranks * t_len * k];
        let mut received = vec![0i32; ranks];
        for (s, &e) in ids.iter().enumerate() {
            if e < 0 || e as usize >= experts {
                return Err(PipelineError::BadInput(format!(
                    "expert id {e} in `{indices}` is out of range 0..{experts}"
                )));
            }
            if self.bug == Some(KnownBug::DispatchDropped(s / k)) && s % k == 0 {
                continue;
            }
            // Each rank serves the slots it believes are its own.
            for r in (0..ranks).filter(|&r| views[r * experts + e as usize] == r as i32) {
                rows[r * t_len * k + s] = received[r];
                received[r] += 1;
            }
        }
        self.set(out, HostTensor::i32(vec![ranks, t_len, k], rows));
        Ok(())
    }

    fn combine_partials(&mut self, expert_out: Slot, weights: Slot, dispatch: Slot, out: Slot) -> Result<()> {
        let (t_len, k, h) = SharedTerm::combine_shapes(expert_out, weights, None, |s| Ok(self.slot(s)?.shape.clone()))?;
        let ranks = dispatch_ranks(self.ints(dispatch)?.0, dispatch, t_len, k)?;
        let (x, w) = (self.rows(expert_out)?.2, self.rows(weights)?.2);
        let rows = self.ints(dispatch)?.1;
        let mut data = vec![0.0f32; ranks * t_len * h];
        for (rt, row) in data.chunks_mut(h).enumerate() {
            let (r, t) = (rt / t_len, rt % t_len);
            // The slots rank r received of token t, with their weights,
            // found once for the row.
            let terms: Vec<(usize, f64)> = (0..k)
                .filter(|j| rows[(r * t_len + t) * k + j] >= 0)
                .map(|j| (t * k + j, self.weight_after(r, w[t * k + j])))
                .collect();
            for (d, o) in row.iter_mut().enumerate() {
                let sum: f64 = terms.iter().map(|&(s, wt)| wt * x[s * h + d] as f64).sum();
                *o = sum as f32;
            }
        }
        self.set(out, HostTensor::f32(vec![ranks, t_len, h], data));
        Ok(())
    }

    fn reduce(
        &mut self,
        expert_out: Slot,
        weights: Slot,
        dispatch: Slot,
        partials: Option<Slot>,
        shared: Option<SharedTerm>,
        out: Slot,
    ) -> Result<()> {
        let (t_len, k, h) =
            SharedTerm::combine_shapes(expert_out, weights, shared, |s| Ok(self.slot(s)?.shape.clone()))?;
        let ranks = dispatch_ranks(self.ints(dispatch)?.0, dispatch, t_len, k)?;
        let (x, w) = (self.rows(expert_out)?.2, self.rows(weights)?.2);
        let rows = self.ints(dispatch)?.1;
        let partial = match partials {
            Some(slot) => {
                let shape = &self.slot(slot)?.shape;
                if shape[..] != [ranks, t_len, h] {
                    return Err(PipelineError::BadInput(format!(
                        "`{slot}` is {shape:?}, expected [{ranks}, {t_len}, {h}]"
                    )));
                }
                Some(self.rows(slot)?.2)
            }
            None => None,
        };
        let shared = self.shared_term(shared)?;
        let mut data = vec![0.0f32; t_len * h];
        let twice = |r: usize| if self.bug == Some(KnownBug::PartialAddedTwice(r)) { 2 } else { 1 };
        // The ranks in rank order, one counted twice by the known bug.
        let rank_order: Vec<usize> = (0..ranks).flat_map(|r| std::iter::repeat_n(r, twice(r))).collect();
        for (t, row) in data.chunks_mut(h).enumerate() {
            let term = shared.as_ref().map(|(values, g)| (&values[t * h..(t + 1) * h], g.map_or(1.0, |g| g[t] as f64)));
            // Slot order: each slot once per rank that received it, with
            // the weight that rank applies, found once for the row.
            let slots: Vec<(usize, f64)> = (0..k)
                .flat_map(|j| (0..ranks).filter(move |&r| rows[(r * t_len + t) * k + j] >= 0).map(move |r| (j, r)))
                .map(|(j, r)| (t * k + j, self.weight_after(r, w[t * k + j])))
                .collect();
            for (d, o) in row.iter_mut().enumerate() {
                let mut sum: f64 = match partial {
                    Some(p) => rank_order.iter().map(|&r| p[(r * t_len + t) * h + d] as f64).sum(),
                    None => slots.iter().map(|&(s, wt)| wt * x[s * h + d] as f64).sum(),
                };
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
