//! Copies of many device buffers into one arena, by a kernel
//! (`gather_words` in kernels/elementwise.cu): what a decode step uses to
//! capture stages (the pipeline gathers into device memory and copies the
//! arena to the host after the step). A kernel, unlike a copy on another
//! stream, stays in the step's stream order (no cross-stream edges in a
//! graph), and it picks the half of its arena by the step's position (read
//! from device memory), so one recording writes alternate halves. The
//! destination may be device memory or pinned, device-mapped host memory
//! ([`MappedHost`], which also holds the greedy choice the argmax kernel
//! writes to the host itself).

use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaSlice, DevicePtr, DeviceRepr, LaunchConfig, PinnedHostSlice, PushKernelArg, sys,
};

use crate::GpuDevice;
use crate::error::{Result, driver};
use crate::kernels::elementwise;

/// Entries one launch copies (`GATHER_MAX` in elementwise.cu).
pub const GATHER_MAX: usize = 32;

/// Blocks per entry.
const GATHER_BLOCKS: u32 = 8;

/// What one `gather_words` launch copies; the layout of `GatherTable`
/// in elementwise.cu.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct GatherTable {
    src: [u64; GATHER_MAX],
    dst: [u64; GATHER_MAX],
    len: [u32; GATHER_MAX],
    by_position: [u32; GATHER_MAX],
    n: u32,
}

// SAFETY: plain integers, laid out as the kernel's parameter (repr(C)).
unsafe impl DeviceRepr for GatherTable {}

impl Default for GatherTable {
    fn default() -> Self {
        Self { src: [0; GATHER_MAX], dst: [0; GATHER_MAX], len: [0; GATHER_MAX], by_position: [0; GATHER_MAX], n: 0 }
    }
}

impl GatherTable {
    /// Adds an entry: `len` 32-bit elements of `src` (times the step's
    /// positions, `step_start + 1`, when `by_position`) to device address
    /// `dst` (device memory, or mapped host memory: [`MappedHost::device_ptr`]).
    /// False when the table is full.
    pub fn push<T: DeviceRepr>(&mut self, src: &CudaSlice<T>, dst: u64, len: usize, by_position: bool) -> bool {
        assert_eq!(std::mem::size_of::<T>(), 4, "gather_words copies 32-bit elements");
        let (ptr, _sync) = src.device_ptr(src.stream());
        self.push_address(ptr, dst, len, by_position)
    }

    /// [`Self::push`] with the source given by its device address (of
    /// 32-bit elements). False when the table is full.
    pub fn push_address(&mut self, src: u64, dst: u64, len: usize, by_position: bool) -> bool {
        let i = self.n as usize;
        if i == GATHER_MAX {
            return false;
        }
        self.src[i] = src;
        self.dst[i] = dst;
        self.len[i] = len as u32;
        self.by_position[i] = by_position as u32;
        self.n += 1;
        true
    }

    /// Entries so far.
    pub fn len(&self) -> usize {
        self.n as usize
    }

    /// No entries.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }
}

/// Pinned host memory the device writes to directly.
pub struct MappedHost {
    memory: PinnedHostSlice<u32>,
    host: usize,
    device: u64,
}

impl MappedHost {
    /// Allocates `len` words of pinned, device-mapped host memory.
    pub fn new(ctx: &Arc<CudaContext>, len: usize) -> Result<Self> {
        let what = || format!("pinning {len} words of host memory for capture");
        // SAFETY: every word is written by the device before the host reads it.
        let mut memory = unsafe { ctx.alloc_pinned_with_flags::<u32>(len, sys::CU_MEMHOSTALLOC_DEVICEMAP) }
            .map_err(driver(what()))?;
        let host = memory.as_mut_ptr().map_err(driver(what()))? as usize;
        let mut device = 0;
        // SAFETY: `host` is the start of a live allocation made with DEVICEMAP.
        unsafe { sys::cuMemHostGetDevicePointer_v2(&mut device, host as *mut std::ffi::c_void, 0) }
            .result()
            .map_err(driver(what()))?;
        Ok(Self { memory, host, device })
    }

    /// Words.
    pub fn len(&self) -> usize {
        self.memory.len()
    }

    /// Never true (an allocation holds at least one word).
    pub fn is_empty(&self) -> bool {
        self.memory.len() == 0
    }

    /// The address the host reads at.
    pub fn host_ptr(&self) -> *const u32 {
        self.host as *const u32
    }

    /// The address the device writes at.
    pub fn device_ptr(&self) -> u64 {
        self.device
    }
}

/// Launches `gather_words` for `table` on the device's stream: each entry
/// lands at its `dst`, plus `half_bytes` when `step_start[0]` is odd.
///
/// # Safety
/// Every entry's source must hold its length in words (by position: times
/// `step_start[0] + 1`), and device or mapped host memory that length at its
/// destination (and `half_bytes` further, when not 0).
pub unsafe fn launch_gather(
    device: &GpuDevice,
    table: &GatherTable,
    half_bytes: usize,
    step_start: &CudaSlice<u32>,
) -> Result<()> {
    if table.is_empty() {
        return Ok(());
    }
    let f = device.kernel(elementwise::GATHER_WORDS)?;
    let mut b = device.stream().launch_builder(&f);
    let half = half_bytes as u64;
    b.arg(table).arg(&half).arg(step_start);
    let cfg = LaunchConfig { grid_dim: (GATHER_BLOCKS, table.n, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: the caller's promise.
    unsafe { b.launch(cfg) }.map_err(driver("launching gather_words"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel against a plain copy: entries of awkward lengths, one by
    /// position, into the second half of the arena (an odd position),
    /// whose first must stay untouched; bits unchanged (NaN payloads
    /// included).
    #[test]
    fn gather_copies_every_entry_bit_for_bit_to_the_arena_named_on_the_device() {
        let Some(device) = crate::test_gpu() else { return };
        let stream = device.stream().clone();
        let sources: Vec<Vec<u32>> = [1usize, 37, 2048, 4099, 3 * 12]
            .iter()
            .enumerate()
            .map(|(s, &n)| {
                (0..n).map(|i| (i as u32).wrapping_mul(2654435761).wrapping_add(s as u32) | 0x7fc0_0001).collect()
            })
            .collect();
        let on_device: Vec<CudaSlice<u32>> = sources.iter().map(|v| stream.clone_htod(v).unwrap()).collect();
        // The last entry: 3 rows of 12 positions, step_start = 11.
        let step_start = stream.clone_htod(&[11u32]).unwrap();
        let total: usize = sources.iter().map(Vec::len).sum();
        let arena = MappedHost::new(device.context(), 2 * total).unwrap();
        // SAFETY: the arena's 2 * total words, written by the device only
        // inside the launch below, which the host waits for before reading.
        let host = unsafe { std::slice::from_raw_parts_mut(arena.host_ptr() as *mut u32, 2 * total) };
        host.fill(0xdead_beef);
        let mut table = GatherTable::default();
        let mut offset = 0;
        for (i, src) in on_device.iter().enumerate() {
            let by_position = i == sources.len() - 1;
            let len = if by_position { 3 } else { sources[i].len() };
            assert!(table.push(src, arena.device_ptr() + 4 * offset as u64, len, by_position));
            offset += sources[i].len();
        }
        // SAFETY: each entry's length is its source's (the last: 3 * 12 =
        // 3 * (step_start + 1)); the offsets stay within a half.
        unsafe { launch_gather(&device, &table, 4 * total, &step_start) }.unwrap();
        stream.synchronize().unwrap();
        assert!(host[..total].iter().all(|&w| w == 0xdead_beef), "the first half was written");
        assert_eq!(&host[total..], &sources.concat()[..], "the second half holds every entry's bits");
    }
}
