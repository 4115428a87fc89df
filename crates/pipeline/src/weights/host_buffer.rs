//! Large host buffers for weights made in memory (synthetic models): an
//! anonymous mapping advised to use transparent huge pages, so filling a
//! model's tens of gigabytes takes one page fault per 2 MiB instead of one
//! per 4 KiB (the kernel's page faults and zeroing were most of the time a
//! synthetic model took to make: BENCHMARKS.md, 2026-12-07, ninth session).

use std::sync::Arc;

use memmap2::{Advice, MmapMut};

use super::{WeightDtype, WeightTensor};
use crate::error::{PipelineError, Result};

/// Buffers below this stay plain vectors: a huge page would not fill.
const HUGE_PAGE_MIN: usize = 4 << 20;

/// A zeroed buffer of `len` bytes to fill, then turned into a weight.
pub(super) enum HostBuffer {
    /// An anonymous mapping with huge pages advised (where the kernel allows).
    Mapped(MmapMut),
    /// A plain vector (small, or no mapping could be made).
    Owned(Vec<u8>),
}

impl HostBuffer {
    /// `len` zero bytes.
    pub(super) fn zeroed(len: usize) -> Self {
        if len >= HUGE_PAGE_MIN
            && let Ok(map) = MmapMut::map_anon(len)
        {
            // Advice only: without transparent huge pages the mapping still works.
            let _ = map.advise(Advice::HugePage);
            return Self::Mapped(map);
        }
        Self::Owned(vec![0u8; len])
    }

    /// The bytes to fill.
    pub(super) fn bytes_mut(&mut self) -> &mut [u8] {
        match self {
            Self::Mapped(map) => map,
            Self::Owned(v) => v,
        }
    }

    /// The filled buffer as the weight `name` of `dtype` and `shape`
    /// (a mapping made read-only; Err if the kernel refuses that).
    pub(super) fn into_tensor(self, name: String, dtype: WeightDtype, shape: Vec<usize>) -> Result<WeightTensor> {
        Ok(match self {
            Self::Mapped(map) => {
                let len = map.len();
                let map = map.make_read_only().map_err(|source| PipelineError::Io {
                    path: format!("(memory for synthetic weight `{name}`, {len} bytes)").into(),
                    source,
                })?;
                WeightTensor::mapped(name, dtype, shape, Arc::new(map), 0, len)
            }
            Self::Owned(v) => WeightTensor::owned(name, dtype, shape, v),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_buffer_is_mapped_and_keeps_its_bytes() {
        for len in [16, HUGE_PAGE_MIN + 6] {
            let mut buffer = HostBuffer::zeroed(len);
            assert_eq!(matches!(buffer, HostBuffer::Mapped(_)), len >= HUGE_PAGE_MIN);
            assert!(buffer.bytes_mut().iter().all(|b| *b == 0));
            for (i, b) in buffer.bytes_mut().iter_mut().enumerate() {
                *b = (i % 251) as u8;
            }
            let tensor = buffer.into_tensor("w".into(), WeightDtype::Bf16, vec![len / 2]).unwrap();
            let (bytes, _) = tensor.host_bytes().unwrap();
            assert_eq!(bytes.len(), len / 2 * 2);
            assert!(bytes.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8));
        }
    }
}
