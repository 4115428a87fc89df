//! [`Ranks`]: the collectives of expert- and tensor-parallel ranks (issue
//! 27), each rank a [`GpuDevice`] of its own (context, streams, buffers).
//! Ranks on distinct GPUs of one host talk through NCCL (cudarc's
//! bindings, one communicator a rank from one process); ranks sharing a
//! GPU, or a machine without libnccl, use a local stand-in that moves the
//! same bytes through the host. NCCL moves the data only: a reduction is
//! an all-gather followed by [`elementwise::RANK_SUM`] on each rank, the
//! ranks' values added in rank order, so every rank holds the same bits
//! as the one-process CPU reference (math::matmul_t_split), whichever
//! transport and whatever NCCL's ring order would have been.
//!
//! NVLink multicast stays off (`NCCL_NVLS_ENABLE=0` on the GPU machines:
//! it can take a shared host's GPUs out of service); nothing here asks
//! for it.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use cudarc::nccl::safe::{Comm, group_end, group_start};

use crate::GpuDevice;
use crate::error::{KernelError, Result, driver};
use crate::kernels::elementwise;

/// How the ranks' bytes travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// NCCL, one communicator a rank (distinct GPUs, libnccl present).
    Nccl,
    /// Copies through the host (ranks sharing a GPU, or no libnccl).
    Local,
}

/// Ranks, each on the device of its ordinal.
pub struct Ranks {
    /// Dropped before the devices (fields drop in order).
    comms: Option<Vec<Comm>>,
    devices: Vec<GpuDevice>,
    /// Why ranks on distinct GPUs went through the host.
    local_because: Option<String>,
}

impl Ranks {
    /// One rank on each of `ordinals` (repeats allowed: virtual ranks on
    /// one GPU, each its own context and streams). NCCL joins them where
    /// the ordinals are distinct and libnccl loads; else the local
    /// stand-in. Err for an empty list or a device that does not open.
    pub fn open(ordinals: &[usize]) -> Result<Self> {
        if ordinals.is_empty() {
            return Err(KernelError::Driver {
                action: "opening ranks".into(),
                message: "no ranks: give at least one device ordinal".into(),
            });
        }
        let devices = ordinals.iter().map(|&o| GpuDevice::open(o)).collect::<Result<Vec<_>>>()?;
        let mut distinct = ordinals.to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        let separate = distinct.len() == ordinals.len() && ordinals.len() > 1;
        // SAFETY: only tries to dlopen libnccl by name.
        let nccl = separate && unsafe { cudarc::nccl::sys::is_culib_present() };
        let local_because = (separate && !nccl).then(|| {
            "libnccl.so was not found (cudarc looks for libnccl.so, not NCCL's soname libnccl.so.2: a link named \
             libnccl.so on LD_LIBRARY_PATH will do), so the ranks exchange their data through the host"
                .to_string()
        });
        let comms = if nccl {
            let streams = devices.iter().map(|d| d.stream().clone()).collect();
            Some(Comm::from_devices(streams).map_err(|e| KernelError::Driver {
                action: format!("joining devices {ordinals:?} with NCCL"),
                message: format!("{e:?}"),
            })?)
        } else {
            None
        };
        Ok(Self { devices, comms, local_because })
    }

    /// How many ranks.
    pub fn len(&self) -> usize {
        self.devices.len()
    }

    /// Whether there are none (never, once opened).
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// Rank `r`'s device.
    pub fn device(&self, r: usize) -> &GpuDevice {
        &self.devices[r]
    }

    /// How the bytes travel.
    pub fn transport(&self) -> Transport {
        if self.comms.is_some() { Transport::Nccl } else { Transport::Local }
    }

    /// Why ranks on distinct GPUs use the local stand-in (slow: through
    /// the host), for the caller to say; None where that is not the case.
    pub fn local_because(&self) -> Option<&str> {
        self.local_because.as_deref()
    }

    /// Every rank's `parts[r]` (the same length on every rank, on rank r's
    /// device) gathered on every rank in rank order: `[R * n]` each.
    pub fn all_gather(&self, parts: &[CudaSlice<f32>]) -> Result<Vec<CudaSlice<f32>>> {
        let n = self.check_parts(parts)?;
        let ranks = self.len();
        let mut out = Vec::with_capacity(ranks);
        for d in &self.devices {
            out.push(d.stream().alloc_zeros::<f32>(ranks * n).map_err(driver("allocating a gather buffer"))?);
        }
        match &self.comms {
            Some(comms) => {
                let nccl = |what: &str| {
                    let what = what.to_string();
                    move |e| KernelError::Driver { action: what, message: format!("{e:?}") }
                };
                group_start().map_err(nccl("starting an NCCL group"))?;
                for ((comm, part), dst) in comms.iter().zip(parts).zip(out.iter_mut()) {
                    comm.all_gather(part, dst).map_err(nccl("queueing an NCCL all-gather"))?;
                }
                group_end().map_err(nccl("running an NCCL all-gather"))?;
            }
            None => {
                // Each part through the host once, then to every rank.
                for (r, (part, d)) in parts.iter().zip(&self.devices).enumerate() {
                    let host = d.stream().clone_dtoh(part).map_err(driver("copying a rank's part to the host"))?;
                    for (dst, dev) in out.iter_mut().zip(&self.devices) {
                        let mut view = dst.slice_mut(r * n..(r + 1) * n);
                        dev.stream().memcpy_htod(&host, &mut view).map_err(driver("copying a part to a rank"))?;
                    }
                }
            }
        }
        Ok(out)
    }

    /// The ranks' `parts` added element by element in rank order (f64,
    /// rounded once to f32), the result on every rank: an all-reduce
    /// whose bits do not depend on the transport.
    pub fn all_reduce_rank_order(&self, parts: &[CudaSlice<f32>]) -> Result<Vec<CudaSlice<f32>>> {
        // all_gather checks the parts.
        let gathered = self.all_gather(parts)?;
        let n = parts.first().map_or(0, |p| p.len());
        let mut sums = Vec::with_capacity(self.len());
        for (d, all) in self.devices.iter().zip(&gathered) {
            let stream = d.stream();
            let mut out = stream.alloc_zeros::<f32>(n).map_err(driver("allocating a rank's sum"))?;
            if n > 0 {
                let f = d.kernel(elementwise::RANK_SUM)?;
                let (ranks, len) = (self.len() as u32, n as u64);
                let cfg = LaunchConfig::for_num_elems(n as u32);
                let mut b = stream.launch_builder(&f);
                b.arg(&mut out).arg(all).arg(&ranks).arg(&len);
                // SAFETY: `all` holds ranks * n f32, `out` n; one thread an
                // element below n.
                unsafe { b.launch(cfg) }.map_err(driver("launching rank_sum_f32"))?;
            }
            sums.push(out);
        }
        Ok(sums)
    }

    /// The common length of `parts`, one a rank; Err otherwise.
    fn check_parts(&self, parts: &[CudaSlice<f32>]) -> Result<usize> {
        let n = parts.first().map_or(0, |p| p.len());
        if parts.len() != self.len() || parts.iter().any(|p| p.len() != n) {
            let lens: Vec<usize> = parts.iter().map(|p| p.len()).collect();
            return Err(KernelError::Driver {
                action: "a collective of ranks".into(),
                message: format!("{} ranks need one part each of one length, got {lens:?}", self.len()),
            });
        }
        Ok(n)
    }
}

#[cfg(test)]
mod gpu_tests {
    use super::*;

    /// The rank-order sum on the host: what every rank must hold.
    fn host_sum(parts: &[Vec<f32>]) -> Vec<f32> {
        (0..parts[0].len()).map(|i| parts.iter().map(|p| p[i] as f64).sum::<f64>() as f32).collect()
    }

    /// Random parts, negative zeros and a NaN among them.
    fn parts(ranks: usize, n: usize) -> Vec<Vec<f32>> {
        let mut state = 0x1234_5678_9abc_def0u64;
        (0..ranks)
            .map(|r| {
                (0..n)
                    .map(|i| {
                        state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                        match (r, i) {
                            (_, 0) => -0.0,
                            (1, 1) => f32::NAN,
                            _ => ((state >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32 * 1e3,
                        }
                    })
                    .collect()
            })
            .collect()
    }

    fn check(ordinals: &[usize]) -> Transport {
        let ranks = Ranks::open(ordinals).unwrap();
        let host = parts(ordinals.len(), 1000);
        let on_device: Vec<CudaSlice<f32>> =
            host.iter().zip(0..).map(|(p, r)| ranks.device(r).stream().clone_htod(p).unwrap()).collect();
        let gathered = ranks.all_gather(&on_device).unwrap();
        let want_gather: Vec<f32> = host.concat();
        let want_sum = host_sum(&host);
        let sums = ranks.all_reduce_rank_order(&on_device).unwrap();
        for r in 0..ranks.len() {
            let stream = ranks.device(r).stream();
            let got = stream.clone_dtoh(&gathered[r]).unwrap();
            // NaN by NaN (a GPU's NaN is its canonical one), the rest by bits.
            let same = |a: &[f32], b: &[f32]| {
                a.len() == b.len()
                    && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits() || x.is_nan() && y.is_nan())
            };
            assert!(same(&got, &want_gather), "{ordinals:?}: rank {r}'s gather");
            let sum = stream.clone_dtoh(&sums[r]).unwrap();
            assert!(same(&sum, &want_sum), "{ordinals:?}: rank {r}'s rank-order sum");
        }
        assert!(Ranks::open(&[]).is_err());
        assert!(ranks.all_gather(&on_device[..1]).is_err() || ranks.len() == 1);
        ranks.transport()
    }

    /// Virtual ranks on one GPU (the local stand-in), then, where the
    /// machine has two GPUs or more, ranks on each through NCCL: the same
    /// bits as the host's rank-order sum on every rank.
    #[test]
    fn ranks_gather_and_sum_in_rank_order_on_every_transport() {
        let Some(_) = crate::test_gpu() else { return };
        assert_eq!(check(&[0, 0, 0]), Transport::Local);
        let count = cudarc::driver::CudaContext::device_count().unwrap_or(1) as usize;
        if count < 2 {
            eprintln!("one GPU: the NCCL transport was not tried (it needs two devices or more)");
            return;
        }
        assert_eq!(std::env::var("NCCL_NVLS_ENABLE").as_deref(), Ok("0"), "keep NVLink multicast off");
        let all: Vec<usize> = (0..count).collect();
        let transport = check(&all);
        eprintln!("{count} GPUs: transport {transport:?}");
        let why = Ranks::open(&all).unwrap().local_because().map(str::to_string);
        assert_eq!(transport, Transport::Nccl, "{count} GPUs went through the host: {why:?}");
    }
}
