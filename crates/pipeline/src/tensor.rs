//! [`HostTensor`]: a tensor in host memory, as captured from a backend or
//! loaded from disk.

/// Element storage of a [`HostTensor`].
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    /// 32-bit floats (every activation).
    F32(Vec<f32>),
    /// 32-bit signed integers (router indices).
    I32(Vec<i32>),
}

/// A row-major tensor in host memory.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// Shape, outermost first.
    pub shape: Vec<usize>,
    /// Elements, `shape.product()` of them.
    pub data: TensorData,
}

impl HostTensor {
    /// An f32 tensor; `data.len()` must equal the product of `shape`.
    pub fn f32(shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Self { shape, data: TensorData::F32(data) }
    }

    /// An i32 tensor; `data.len()` must equal the product of `shape`.
    pub fn i32(shape: Vec<usize>, data: Vec<i32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Self { shape, data: TensorData::I32(data) }
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The f32 elements, if this is an f32 tensor.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            TensorData::F32(v) => Some(v),
            TensorData::I32(_) => None,
        }
    }

    /// The f32 elements, to change in place; None for int32 tensors.
    pub fn as_f32_mut(&mut self) -> Option<&mut [f32]> {
        match &mut self.data {
            TensorData::F32(v) => Some(v),
            TensorData::I32(_) => None,
        }
    }

    /// The i32 elements, if this is an i32 tensor.
    pub fn as_i32(&self) -> Option<&[i32]> {
        match &self.data {
            TensorData::I32(v) => Some(v),
            TensorData::F32(_) => None,
        }
    }

    /// Size of the element data in bytes.
    pub fn byte_len(&self) -> usize {
        self.numel() * 4
    }

    /// The numpy dtype name: `float32` or `int32`.
    pub fn dtype_name(&self) -> &'static str {
        match self.data {
            TensorData::F32(_) => "float32",
            TensorData::I32(_) => "int32",
        }
    }

    /// Elements widened to f64 (i32 converted exactly).
    pub fn to_f64(&self) -> Vec<f64> {
        match &self.data {
            TensorData::F32(v) => v.iter().map(|&x| x as f64).collect(),
            TensorData::I32(v) => v.iter().map(|&x| x as f64).collect(),
        }
    }
}

/// A tensor on its way to the host: already there (CPU backend), or being
/// copied by the device on a stream of its own, to be waited for where it
/// is consumed (the capture writer thread), not where it was asked for.
pub struct PendingTensor(Pending);

enum Pending {
    Ready(HostTensor),
    Copying(usize, Box<dyn FnOnce() -> crate::Result<HostTensor> + Send>),
}

impl PendingTensor {
    /// A tensor already on the host.
    pub fn ready(tensor: HostTensor) -> Self {
        Self(Pending::Ready(tensor))
    }

    /// A copy in flight of a tensor of `bytes` bytes; `wait` blocks until
    /// it has landed and returns it.
    pub fn copying(bytes: usize, wait: impl FnOnce() -> crate::Result<HostTensor> + Send + 'static) -> Self {
        Self(Pending::Copying(bytes, Box::new(wait)))
    }

    /// The tensor's size in bytes (what it will take on the host).
    pub fn byte_len(&self) -> usize {
        match &self.0 {
            Pending::Ready(t) => t.byte_len(),
            Pending::Copying(bytes, _) => *bytes,
        }
    }

    /// The tensor, once on the host.
    pub fn wait(self) -> crate::Result<HostTensor> {
        match self.0 {
            Pending::Ready(t) => Ok(t),
            Pending::Copying(_, wait) => wait(),
        }
    }
}

impl std::fmt::Debug for PendingTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Pending::Ready(t) => f.debug_tuple("Ready").field(&t.shape).finish(),
            Pending::Copying(bytes, _) => write!(f, "Copying({bytes} bytes)"),
        }
    }
}
