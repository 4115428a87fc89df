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
//! tensor on the CPU, with the same result. A synthetic weight is never on
//! the host: the device makes it with the CUDA backend's generators, kept
//! while the reserve allows, else made again for each product.

use std::any::Any;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaSlice, DevicePtr, LaunchConfig, PushKernelArg, sys};

use crate::GpuDevice;
use crate::error::{Result, driver};
use crate::kernels::reference::MATMUL_T;
use crate::synthetic::{ScaleFields, synthetic_blocks_fill, synthetic_fill_bf16};

/// One weight tensor for the reference's products: row-major `rows x
/// cols` values in a storage format of [`WeightFormat`], held by the host
/// or made on the device by the synthetic generators.
pub struct ReferenceWeight<'a> {
    /// Where the stored values come from.
    pub source: WeightSource<'a>,
    /// How the values are stored.
    pub format: WeightFormat,
    /// Rows (outputs).
    pub rows: usize,
    /// Elements per row.
    pub cols: usize,
}

/// Where a [`ReferenceWeight`]'s stored values come from.
pub enum WeightSource<'a> {
    /// Bytes in host memory (`rows * cols` values in the format).
    Host {
        /// The stored bytes.
        bytes: &'a [u8],
        /// What keeps `bytes` alive; held while the device reads the
        /// host's pages.
        owner: Arc<dyn Any + Send + Sync>,
    },
    /// A synthetic bf16 tensor (element i is `bf16(synthetic_value(key,
    /// i, mean, std))`), made on the device by the generator the CUDA
    /// backend uses (the same bits as the host's: test-gpu_synthetic).
    SyntheticBf16 {
        /// The tensor's key (seed and name).
        key: u64,
        /// Mean of the values.
        mean: f32,
        /// Standard deviation of the values.
        std: f32,
    },
    /// A synthetic tensor in a block format, its blocks made on the device
    /// as the host makes them (pipeline's synthetic_blocks.rs).
    SyntheticBlocks {
        /// The tensor's key.
        key: u64,
        /// Where a block keeps its f16 scales.
        fields: ScaleFields,
        /// The f16 bits of d and dmin.
        scales: (u16, u16),
    },
}

impl WeightSource<'_> {
    /// The key the device's copy is cached under: the host address, or
    /// the synthetic tensor's key.
    fn cache_key(&self) -> (u8, u64) {
        match self {
            Self::Host { bytes, .. } => (0, bytes.as_ptr() as u64),
            Self::SyntheticBf16 { key, .. } => (1, *key),
            Self::SyntheticBlocks { key, .. } => (2, *key),
        }
    }
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

/// A weight's values in device memory.
enum DeviceCopy {
    /// Bytes (a host tensor's copy, or synthetic blocks).
    Bytes(CudaSlice<u8>),
    /// Synthetic bf16 values, as their bits.
    Bf16(CudaSlice<u16>),
}

impl DeviceCopy {
    fn address(&self, stream: &Arc<cudarc::driver::CudaStream>) -> u64 {
        match self {
            Self::Bytes(s) => s.device_ptr(stream).0,
            Self::Bf16(s) => s.device_ptr(stream).0,
        }
    }
}

/// Where a weight tensor is read from.
enum Residency {
    /// A copy in device memory.
    Device(DeviceCopy),
    /// The host's pages, registered with the driver and mapped.
    Mapped { device: u64, host: usize, _owner: Arc<dyn Any + Send + Sync> },
    /// A synthetic tensor made again on the device for each product (no
    /// room to keep it beside the reserve), freed after it.
    Regenerated,
    /// None of these: the caller computes it.
    Declined,
}

/// Counts of what the device did, for reports and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DotsStats {
    /// Products computed on the device.
    pub launches: u64,
    /// Bytes of weights copied to device memory.
    pub copied_bytes: usize,
    /// Bytes of synthetic weights made in device memory and kept.
    pub generated_bytes: usize,
    /// Products whose synthetic weight was made again for them (no room
    /// to keep it).
    pub regenerated: u64,
    /// Bytes of weights read from registered host pages.
    pub mapped_bytes: usize,
    /// Weight tensors declined (computed on the CPU).
    pub declined: usize,
}

/// The reference's products on one device.
pub struct ReferenceDots {
    device: GpuDevice,
    weights: Mutex<HashMap<(u8, u64), Residency>>,
    /// Device memory left free for the other run on the device.
    reserve: usize,
    launches: AtomicU64,
    copied: AtomicUsize,
    generated: AtomicUsize,
    regenerated: AtomicU64,
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
            generated: AtomicUsize::new(0),
            regenerated: AtomicU64::new(0),
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
            generated_bytes: self.generated.load(Ordering::Relaxed),
            regenerated: self.regenerated.load(Ordering::Relaxed),
            mapped_bytes: self.mapped.load(Ordering::Relaxed),
            declined: self.declined.load(Ordering::Relaxed),
        }
    }

    /// `out[i * rows + r] = (f32) dot(inputs[i], w[r])` with math.rs's
    /// `dot` (kernels/reference.cu), each weight first rounded to bf16 when
    /// `round_bf16`. None when the tensor is declined (no room on the
    /// device and its pages could not be registered).
    pub fn matmul_t(&self, w: &ReferenceWeight<'_>, inputs: &[&[f32]], round_bf16: bool) -> Result<Option<Vec<f32>>> {
        let (m, n, k) = (inputs.len(), w.rows, w.cols);
        if m == 0 || n == 0 {
            return Ok(Some(vec![0.0; m * n]));
        }
        assert!(inputs.iter().all(|x| x.len() == k), "every input row has the weight's row length");
        let (block_len, _) = w.format.block();
        assert!(k.is_multiple_of(block_len), "a row is whole blocks");
        if let WeightSource::Host { bytes, .. } = &w.source {
            assert_eq!(bytes.len(), stored_bytes(w), "the weight's bytes are rows x cols");
        }
        let mut weights = self.weights.lock().unwrap_or_else(|e| e.into_inner());
        let key = w.source.cache_key();
        if let std::collections::hash_map::Entry::Vacant(slot) = weights.entry(key) {
            slot.insert(self.place(w)?);
        }
        // A regenerated weight lives until its product is copied back.
        let mut made = None;
        let address = match &weights[&key] {
            Residency::Device(copy) => copy.address(self.device.stream()),
            Residency::Mapped { device, .. } => *device,
            Residency::Regenerated => match self.make(w) {
                Ok(copy) => {
                    self.regenerated.fetch_add(1, Ordering::Relaxed);
                    made.insert(copy).address(self.device.stream())
                }
                // No room even for one: the CPU computes this one.
                Err(_) => return Ok(None),
            },
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
        drop(made);
        self.launches.fetch_add(1, Ordering::Relaxed);
        Ok(Some(host))
    }

    /// Where `w` will be read from: a device copy while the reserve stays
    /// free; else, for a synthetic tensor, made again for each product;
    /// for a host one, its registered host pages; else nowhere.
    fn place(&self, w: &ReferenceWeight<'_>) -> Result<Residency> {
        let len = stored_bytes(w);
        let (free, _) = self.device.memory()?;
        let (bytes, owner) = match &w.source {
            WeightSource::Host { bytes, owner } => (*bytes, owner),
            _ if free > len + self.reserve => {
                let copy = self.make(w)?;
                self.generated.fetch_add(len, Ordering::Relaxed);
                return Ok(Residency::Device(copy));
            }
            _ => return Ok(Residency::Regenerated),
        };
        if free > len + self.reserve {
            let stream = self.device.stream();
            let copy = stream.clone_htod(bytes).map_err(driver("copying a weight for the reference"))?;
            self.copied.fetch_add(len, Ordering::Relaxed);
            return Ok(Residency::Device(DeviceCopy::Bytes(copy)));
        }
        let host = bytes.as_ptr() as usize;
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
                    return Ok(Residency::Mapped { device, host, _owner: owner.clone() });
                }
                // SAFETY: registered above, not used by any launch.
                let _ = unsafe { sys::cuMemHostUnregister(host as *mut _) };
            }
        }
        self.declined.fetch_add(1, Ordering::Relaxed);
        Ok(Residency::Declined)
    }
}

impl ReferenceDots {
    /// `w`'s values in device memory: a host tensor copied, a synthetic
    /// one made by the generators.
    fn make(&self, w: &ReferenceWeight<'_>) -> Result<DeviceCopy> {
        let len = stored_bytes(w);
        match &w.source {
            WeightSource::Host { bytes, .. } => {
                let copy = self.device.stream().clone_htod(*bytes);
                Ok(DeviceCopy::Bytes(copy.map_err(driver("copying a weight for the reference"))?))
            }
            WeightSource::SyntheticBf16 { key, mean, std } => {
                Ok(DeviceCopy::Bf16(synthetic_fill_bf16(&self.device, w.rows * w.cols, *key, *mean, *std)?))
            }
            WeightSource::SyntheticBlocks { key, fields, scales } => {
                let alloc = self.device.stream().alloc_zeros::<u8>(len);
                let mut blocks = alloc.map_err(driver(format!("allocating {len} bytes of synthetic blocks")))?;
                let block_bytes = w.format.block().1;
                synthetic_blocks_fill(
                    &self.device,
                    &mut blocks,
                    0,
                    (len / block_bytes, block_bytes),
                    *key,
                    *fields,
                    *scales,
                )?;
                Ok(DeviceCopy::Bytes(blocks))
            }
        }
    }
}

/// The bytes `w`'s values take in its format.
fn stored_bytes(w: &ReferenceWeight<'_>) -> usize {
    let (block_len, block_bytes) = w.format.block();
    w.rows * w.cols / block_len * block_bytes
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
