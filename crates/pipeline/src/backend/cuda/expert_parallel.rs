//! Virtual expert-parallel ranks on CUDA (kernels/moe.cu's `ep_*`): the
//! [`ExpertParallelOps`] capability, each operation as the CPU's
//! (backend/cpu/expert_parallel.rs) defines it, with f32 sums in the order
//! moe_combine sums (slot order with a correct dispatch is the one-rank
//! moe_ffn_out to the bit). The map is the layout's, made on the host, so
//! steps stay eager (graphs are ruled out with ranks).

use cudarc::driver::PushKernelArg;
use kernels_cuda::kernels::moe;

use super::tensors::{DevData, DevTensor};
use super::{CudaBackend, gpu, threads};
use crate::backend::expert_parallel::{ExpertParallelOps, dispatch_ranks};
use crate::backend::{SharedTerm, Slot};
use crate::error::{PipelineError, Result};
use crate::parallel_config::ExpertParallel;

impl ExpertParallelOps for CudaBackend {
    fn expert_map(&mut self, layout: &ExpertParallel, experts: usize, out: Slot) -> Result<()> {
        self.timed(out.name(), &[], |this| {
            this.refuse_in_capture("the expert map is the layout's, made on the host")?;
            let host: Vec<i32> =
                (0..layout.ranks).flat_map(|_| (0..experts).map(|e| layout.server(e, experts) as i32)).collect();
            let map = this.stream().clone_htod(&host).map_err(gpu("uploading the expert map"))?;
            this.store(out, DevTensor::new(vec![layout.ranks, experts], DevData::I32(map)))
        })
    }

    fn dispatch(&mut self, indices: Slot, map: Slot, out: Slot) -> Result<()> {
        self.timed(out.name(), &[indices, map], |this| {
            let (id_shape, map_shape) = (this.slot(indices)?.shape.clone(), this.slot(map)?.shape.clone());
            let (&[t_len, k], &[ranks, experts]) = (&id_shape[..], &map_shape[..]) else {
                return Err(PipelineError::BadInput(format!(
                    "dispatch needs [T,k] ids and an [R,E] map, got {id_shape:?} and {map_shape:?}"
                )));
            };
            let mut rows = this.alloc_ids(ranks * t_len * k)?;
            let f = this.kernel(moe::EP_DISPATCH)?;
            let stream = this.stream();
            let a = ((t_len * k) as u32, experts as u32, ranks as u32);
            let mut b = stream.launch_builder(&f);
            b.arg(&mut rows)
                .arg(this.slot(indices)?.i32(indices)?)
                .arg(this.slot(map)?.i32(map)?)
                .arg(&a.0)
                .arg(&a.1)
                .arg(&a.2);
            // SAFETY: one thread per rank; ids hold t_len * k, the map
            // ranks * experts, rows ranks * t_len * k (shapes checked).
            unsafe { b.launch(threads(ranks)) }.map_err(gpu("ep_dispatch"))?;
            this.store(out, DevTensor::new(vec![ranks, t_len, k], DevData::I32(rows)))
        })
    }

    fn combine_partials(&mut self, expert_out: Slot, weights: Slot, dispatch: Slot, out: Slot) -> Result<()> {
        self.timed(out.name(), &[expert_out, weights, dispatch], |this| {
            let (t_len, k, h) =
                SharedTerm::combine_shapes(expert_out, weights, None, |s| Ok(this.slot(s)?.shape.clone()))?;
            let ranks = dispatch_ranks(&this.slot(dispatch)?.shape, dispatch, t_len, k)?;
            let mut o = this.alloc(ranks * t_len * h)?;
            let f = this.kernel(moe::EP_COMBINE_PARTIALS)?;
            let stream = this.stream();
            let a = (ranks as u32, t_len as u32, k as u32, h as u32);
            let mut b = stream.launch_builder(&f);
            b.arg(&mut o).arg(this.slot(expert_out)?.f32(expert_out)?).arg(this.slot(weights)?.f32(weights)?);
            b.arg(this.slot(dispatch)?.i32(dispatch)?).arg(&a.0).arg(&a.1).arg(&a.2).arg(&a.3);
            // SAFETY: one thread per output of ranks * t_len * h; the
            // inputs' shapes are checked above.
            unsafe { b.launch(threads(ranks * t_len * h)) }.map_err(gpu("ep_combine_partials"))?;
            this.set(out, vec![ranks, t_len, h], o)
        })
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
        let mut inputs = vec![expert_out, weights, dispatch];
        inputs.extend(partials);
        inputs.extend(shared.map(|s| s.out));
        inputs.extend(shared.and_then(|s| s.weight));
        self.timed(out.name(), &inputs, |this| {
            let (t_len, k, h) =
                SharedTerm::combine_shapes(expert_out, weights, shared, |s| Ok(this.slot(s)?.shape.clone()))?;
            let ranks = dispatch_ranks(&this.slot(dispatch)?.shape, dispatch, t_len, k)?;
            if let Some(p) = partials {
                let shape = &this.slot(p)?.shape;
                if shape[..] != [ranks, t_len, h] {
                    return Err(PipelineError::BadInput(format!(
                        "`{p}` is {shape:?}, expected [{ranks}, {t_len}, {h}]"
                    )));
                }
            }
            let x = this.slot(expert_out)?.f32(expert_out)?;
            // Pointers the kernel never reads where absent: any valid one.
            let partial = match partials {
                Some(p) => this.slot(p)?.f32(p)?,
                None => x,
            };
            let (values, weight, kind) = match shared {
                None => (x, x, 0u32),
                Some(term) => {
                    let values = this.slot(term.out)?.f32(term.out)?;
                    match term.weight {
                        Some(w) => (values, this.slot(w)?.f32(w)?, 2),
                        None => (values, values, 1),
                    }
                }
            };
            let mut o = this.alloc(t_len * h)?;
            let f = this.kernel(moe::EP_REDUCE)?;
            let stream = this.stream();
            let rank_sum = u32::from(partials.is_some());
            let a = (ranks as u32, t_len as u32, k as u32, h as u32);
            let mut b = stream.launch_builder(&f);
            b.arg(&mut o).arg(x).arg(this.slot(weights)?.f32(weights)?).arg(this.slot(dispatch)?.i32(dispatch)?);
            b.arg(partial).arg(&rank_sum).arg(values).arg(weight).arg(&kind);
            b.arg(&a.0).arg(&a.1).arg(&a.2).arg(&a.3);
            // SAFETY: one thread per output of t_len * h; every buffer the
            // kernel reads for these flags has the shape checked above.
            unsafe { b.launch(threads(t_len * h)) }.map_err(gpu("ep_reduce"))?;
            this.set(out, vec![t_len, h], o)
        })
    }
}
