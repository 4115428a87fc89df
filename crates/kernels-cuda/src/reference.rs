//! [`ReferenceDots`]: the CPU reference's matrix product run on a device to
//! the bit (`ref_matmul_t` in kernels/reference.cu, which shares nothing
//! with the fast paths). What makes `Cuda(dtype: F64)` a reference: every
//! stage but the products is the CPU reference's own code, and the
//! products, which are almost all of its time, give the CPU's bits.
//!
//! Weights are read where they are: copied to device memory while the
//! device keeps a reserve free for the run beside it (the target of a
//! bisect), else read from the host's own pages over the bus (registered
//! with the driver, not copied), else declined: the caller computes that
//! tensor on the CPU, with the same result.

use std::any::Any;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaSlice, DevicePtr, LaunchConfig, PushKernelArg, sys};

use crate::GpuDevice;
use crate::error::{Result, driver};
use crate::kernels::reference::MATMUL_T;

/// One weight tensor as the host holds it: row-major `rows x cols`, in a
/// storage format of [`WeightFormat`].
pub struct HostWeight<'a> {
    /// The stored bytes (`rows * cols` values in `format`).
    pub bytes: &'a [u8],
    /// How the values are stored.
    pub format: WeightFormat,
    /// Rows (outputs).
    pub rows: usize,
    /// Elements per row.
    pub cols: usize,
    /// What keeps `bytes` alive; held while the device reads the host's
    /// pages.
    pub owner: Arc<dyn Any + Send + Sync>,
}

/// A storage format the reference kernel decodes, by its ggml type id
/// (the decoders of kernels/reference.cu are the reference's own, held to
/// pipeline's weights/quant.rs by tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    /// IEEE single.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    Bf16,
    /// ggml Q8_0 (32 values, 34 bytes).
    Q8_0,
    /// ggml Q4_K (256 values, 144 bytes).
    Q4K,
    /// ggml Q5_K (256 values, 176 bytes).
    Q5K,
    /// ggml Q6_K (256 values, 210 bytes).
    Q6K,
    /// MXFP4 (32 values, 17 bytes).
    Mxfp4,
}

impl WeightFormat {
    /// The format of ggml type `id`, if the kernel decodes it.
    pub fn from_ggml(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            30 => Self::Bf16,
            8 => Self::Q8_0,
            12 => Self::Q4K,
            13 => Self::Q5K,
            14 => Self::Q6K,
            39 => Self::Mxfp4,
            _ => return None,
        })
    }

    /// The ggml type id (the kernel's `format`).
    pub fn ggml_id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Bf16 => 30,
            Self::Q8_0 => 8,
            Self::Q4K => 12,
            Self::Q5K => 13,
            Self::Q6K => 14,
            Self::Mxfp4 => 39,
        }
    }

    /// (values, bytes) of one block; (1, element size) for plain storage.
    pub fn block(self) -> (usize, usize) {
        match self {
            Self::F32 => (1, 4),
            Self::F16 | Self::Bf16 => (1, 2),
            Self::Q8_0 => (32, 34),
            Self::Mxfp4 => (32, 17),
            Self::Q4K => (256, 144),
            Self::Q5K => (256, 176),
            Self::Q6K => (256, 210),
        }
    }
}

/// Where a weight tensor is read from.
enum Residency {
    /// A copy in device memory.
    Device(CudaSlice<u8>),
    /// The host's pages, registered with the driver and mapped.
    Mapped { device: u64, host: usize, _owner: Arc<dyn Any + Send + Sync> },
    /// Neither: the caller computes it.
    Declined,
}

/// Counts of what the device did, for reports and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DotsStats {
    /// Products computed on the device.
    pub launches: u64,
    /// Bytes of weights copied to device memory.
    pub copied_bytes: usize,
    /// Bytes of weights read from registered host pages.
    pub mapped_bytes: usize,
    /// Weight tensors declined (computed on the CPU).
    pub declined: usize,
}

/// The reference's products on one device.
pub struct ReferenceDots {
    device: GpuDevice,
    weights: Mutex<HashMap<usize, Residency>>,
    /// Device memory left free for the other run on the device.
    reserve: usize,
    launches: AtomicU64,
    copied: AtomicUsize,
    mapped: AtomicUsize,
    declined: AtomicUsize,
}

/// Threads per block: inputs per block row.
const THREADS: usize = 128;

impl ReferenceDots {
    /// Opens device `ordinal` with a context and stream of its own. Weights
    /// are copied to device memory while more than a reserve (an eighth of
    /// the device, at least 8 GiB) stays free.
    pub fn open(ordinal: usize) -> Result<Self> {
        let device = GpuDevice::open(ordinal)?;
        let (_, total) = device.memory()?;
        let reserve = (total / 8).max(8 << 30);
        device.kernel(MATMUL_T)?;
        Ok(Self {
            device,
            weights: Mutex::new(HashMap::new()),
            reserve,
            launches: AtomicU64::new(0),
            copied: AtomicUsize::new(0),
            mapped: AtomicUsize::new(0),
            declined: AtomicUsize::new(0),
        })
    }

    /// The device's name.
    pub fn device_name(&self) -> &str {
        self.device.name()
    }

    /// What the device did so far.
    pub fn stats(&self) -> DotsStats {
        DotsStats {
            launches: self.launches.load(Ordering::Relaxed),
            copied_bytes: self.copied.load(Ordering::Relaxed),
            mapped_bytes: self.mapped.load(Ordering::Relaxed),
            declined: self.declined.load(Ordering::Relaxed),
        }
    }

    /// `out[i * rows + r] = (f32) dot(inputs[i], w[r])` with math.rs's
    /// `dot` (kernels/reference.cu), each weight first rounded to bf16 when
    /// `round_bf16`. None when the tensor is declined (no room on the
    /// device and its pages could not be registered).
    pub fn matmul_t(&self, w: &HostWeight<'_>, inputs: &[&[f32]], round_bf16: bool) -> Result<Option<Vec<f32>>> {
        let (m, n, k) = (inputs.len(), w.rows, w.cols);
        if m == 0 || n == 0 {
            return Ok(Some(vec![0.0; m * n]));
        }
        assert!(inputs.iter().all(|x| x.len() == k), "every input row has the weight's row length");
        let (block_len, block_bytes) = w.format.block();
        assert!(k.is_multiple_of(block_len), "a row is whole blocks");
        assert_eq!(w.bytes.len(), n * k / block_len * block_bytes, "the weight's bytes are rows x cols");
        let mut weights = self.weights.lock().unwrap_or_else(|e| e.into_inner());
        let key = w.bytes.as_ptr() as usize;
        if let std::collections::hash_map::Entry::Vacant(slot) = weights.entry(key) {
            slot.insert(self.place(w)?);
        }
        let address = match &weights[&key] {
            Residency::Device(slice) => slice.device_ptr(self.device.stream()).0,
            Residency::Mapped { device, .. } => *device,
            Residency::Declined => return Ok(None),
        };
        let stream = self.device.stream();
        // Transposed, so a block's threads read consecutive addresses.
        let mut xt = vec![0.0f32; m * k];
        for (i, x) in inputs.iter().enumerate() {
            for (c, &v) in x.iter().enumerate() {
                xt[c * m + i] = v;
            }
        }
        let xt = stream.clone_htod(&xt).map_err(driver("copying the reference's inputs to the device"))?;
        let mut out = stream.alloc_zeros::<f32>(m * n).map_err(driver("allocating the reference's outputs"))?;
        let f = self.device.kernel(MATMUL_T)?;
        let (format, round, mi, ni, ki) =
            (w.format.ggml_id() as i32, i32::from(round_bf16), m as i32, n as i32, k as i32);
        let threads = m.next_multiple_of(32).min(THREADS);
        let cfg = LaunchConfig {
            grid_dim: (n as u32, m.div_ceil(threads) as u32, 1),
            block_dim: (threads as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = stream.launch_builder(&f);
        b.arg(&xt).arg(&address).arg(&format).arg(&round).arg(&mut out).arg(&mi).arg(&ni).arg(&ki);
        // SAFETY: xt holds m * k f32, out m * n; `address` is n * k
        // values in the weight's format (checked above), alive while
        // `weights` holds it.
        unsafe { b.launch(cfg) }.map_err(driver("launching ref_matmul_t"))?;
        let host = stream.clone_dtoh(&out).map_err(driver("copying the reference's products to the host"))?;
        self.launches.fetch_add(1, Ordering::Relaxed);
        Ok(Some(host))
    }

    /// Where `w` will be read from: a device copy while the reserve stays
    /// free, else its registered host pages, else nowhere.
    fn place(&self, w: &HostWeight<'_>) -> Result<Residency> {
        let len = w.bytes.len();
        let (free, _) = self.device.memory()?;
        if free > len + self.reserve {
            let stream = self.device.stream();
            let copy = stream.clone_htod(w.bytes).map_err(driver("copying a weight for the reference"))?;
            self.copied.fetch_add(len, Ordering::Relaxed);
            return Ok(Residency::Device(copy));
        }
        let host = w.bytes.as_ptr() as usize;
        let flags =
            [sys::CU_MEMHOSTREGISTER_DEVICEMAP | sys::CU_MEMHOSTREGISTER_READ_ONLY, sys::CU_MEMHOSTREGISTER_DEVICEMAP];
        for flag in flags {
            // SAFETY: [host, host + len) is live while `owner` is, which
            // the residency holds until it is unregistered (Drop).
            if unsafe { sys::cuMemHostRegister_v2(host as *mut std::ffi::c_void, len, flag) }.result().is_ok() {
                let mut device = 0;
                // SAFETY: `host` was registered with DEVICEMAP just above.
                let mapped = unsafe { sys::cuMemHostGetDevicePointer_v2(&mut device, host as *mut _, 0) }.result();
                if mapped.is_ok() {
                    self.mapped.fetch_add(len, Ordering::Relaxed);
                    return Ok(Residency::Mapped { device, host, _owner: w.owner.clone() });
                }
                // SAFETY: registered above, not used by any launch.
                let _ = unsafe { sys::cuMemHostUnregister(host as *mut _) };
            }
        }
        self.declined.fetch_add(1, Ordering::Relaxed);
        Ok(Residency::Declined)
    }
}

impl Drop for ReferenceDots {
    fn drop(&mut self) {
        let _ = self.device.stream().synchronize();
        let weights = self.weights.get_mut().unwrap_or_else(|e| e.into_inner());
        for residency in weights.values() {
            if let Residency::Mapped { host, .. } = residency {
                // SAFETY: registered in `place`; no launch is in flight
                // (synchronised above). The owner is dropped after.
                let _ = unsafe { sys::cuMemHostUnregister(*host as *mut _) };
            }
        }
    }
}
