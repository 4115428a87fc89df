//! [`TensorView`]: what compare compares. A shape and the elements in the
//! type they were computed or stored in (f32, bf16 bits, i32, ...),
//! borrowed from wherever they live: a bisect's host tensors or a .npy
//! file read once ([`crate::NpyArray`]). Nothing is widened as a whole:
//! the metrics read a row at a time into f64 ([`Elements::row_into`]), so
//! comparing a [512, 151936] logits pair costs two rows of f64, not two
//! 622 MB copies.

use std::ops::Range;

use half::bf16;

/// Borrowed elements of one type, row-major.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Elements<'a> {
    /// IEEE single precision (every activation).
    F32(&'a [f32]),
    /// bfloat16 bits.
    Bf16(&'a [u16]),
    /// IEEE double precision (an oracle's).
    F64(&'a [f64]),
    /// 32-bit integers (expert ids).
    I32(&'a [i32]),
    /// 64-bit integers (numpy's default ids).
    I64(&'a [i64]),
}

impl<'a> Elements<'a> {
    /// How many elements.
    pub fn len(&self) -> usize {
        match self {
            Elements::F32(v) => v.len(),
            Elements::Bf16(v) => v.len(),
            Elements::F64(v) => v.len(),
            Elements::I32(v) => v.len(),
            Elements::I64(v) => v.len(),
        }
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The numpy dtype name: `float32`, `bfloat16`, `float64`, `int32`,
    /// `int64`.
    pub fn dtype(&self) -> &'static str {
        match self {
            Elements::F32(_) => "float32",
            Elements::Bf16(_) => "bfloat16",
            Elements::F64(_) => "float64",
            Elements::I32(_) => "int32",
            Elements::I64(_) => "int64",
        }
    }

    /// Element `i` as f64 (exact for every type). Panics past the end, as
    /// slice indexing does.
    pub fn get(&self, i: usize) -> f64 {
        match self {
            Elements::F32(v) => v[i] as f64,
            Elements::Bf16(v) => bf16::from_bits(v[i]).to_f64(),
            Elements::F64(v) => v[i],
            Elements::I32(v) => v[i] as f64,
            Elements::I64(v) => v[i] as f64,
        }
    }

    /// The elements of `range`.
    pub fn slice(&self, range: Range<usize>) -> Elements<'a> {
        match *self {
            Elements::F32(v) => Elements::F32(&v[range]),
            Elements::Bf16(v) => Elements::Bf16(&v[range]),
            Elements::F64(v) => Elements::F64(&v[range]),
            Elements::I32(v) => Elements::I32(&v[range]),
            Elements::I64(v) => Elements::I64(&v[range]),
        }
    }

    /// Replaces `out`'s contents with the elements of `range` as f64: one
    /// type dispatch per row, a plain loop inside.
    pub fn row_into(&self, range: Range<usize>, out: &mut Vec<f64>) {
        out.clear();
        self.slice(range).append_to(out);
    }

    /// Appends every element, as f64, to `out`.
    pub fn append_to(&self, out: &mut Vec<f64>) {
        let range = 0..self.len();
        match self {
            Elements::F32(v) => out.extend(v[range].iter().map(|&x| x as f64)),
            Elements::Bf16(v) => out.extend(v[range].iter().map(|&x| bf16::from_bits(x).to_f64())),
            Elements::F64(v) => out.extend_from_slice(&v[range]),
            Elements::I32(v) => out.extend(v[range].iter().map(|&x| x as f64)),
            Elements::I64(v) => out.extend(v[range].iter().map(|&x| x as f64)),
        }
    }

    /// Every element as f64, in a new vector (for tools and tests; the
    /// comparison itself reads rows).
    pub fn to_f64_vec(&self) -> Vec<f64> {
        let mut out = Vec::with_capacity(self.len());
        self.row_into(0..self.len(), &mut out);
        out
    }

    /// Every element as an integer id (ids are stored as integers, or as
    /// exact floats by tools that write them so).
    pub fn to_ids(&self) -> Vec<i64> {
        match self {
            Elements::I32(v) => v.iter().map(|&x| x as i64).collect(),
            Elements::I64(v) => v.to_vec(),
            _ => (0..self.len()).map(|i| self.get(i) as i64).collect(),
        }
    }
}

/// A tensor to compare: its shape and borrowed elements.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TensorView<'a> {
    /// Shape, outermost first.
    pub shape: &'a [usize],
    /// Elements, row-major.
    pub elements: Elements<'a>,
}

impl<'a> TensorView<'a> {
    /// A view of `elements` in `shape`.
    pub fn new(shape: &'a [usize], elements: Elements<'a>) -> Self {
        Self { shape, elements }
    }

    /// Elements in the last dimension (1 for a scalar).
    pub fn width(&self) -> usize {
        self.shape.last().copied().unwrap_or(1).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_reads_exactly_as_f64_by_element_and_by_row() {
        let bits: Vec<u16> = [1.5f32, -2.25, 3.0e-3].iter().map(|&x| bf16::from_f32(x).to_bits()).collect();
        let f32s = [1.5f32, -2.25, 3.0e-3];
        let cases = [
            Elements::F32(&f32s),
            Elements::Bf16(&bits),
            Elements::F64(&[1.5, -2.25, 1.0 / 3.0]),
            Elements::I32(&[7, -1, 3]),
            Elements::I64(&[7, -1, 1 << 40]),
        ];
        let mut row = Vec::new();
        for e in cases {
            e.row_into(1..3, &mut row);
            assert_eq!(row, [e.get(1), e.get(2)], "{}", e.dtype());
            assert_eq!(e.to_f64_vec().len(), 3);
            assert_eq!(e.slice(1..2).get(0), e.get(1));
        }
        assert_eq!(Elements::F32(&f32s).get(2), 3.0e-3f32 as f64);
        assert_eq!(Elements::Bf16(&bits).get(0), 1.5);
        assert_eq!(Elements::I64(&[1 << 40]).to_ids(), [1 << 40]);
        assert_eq!(Elements::F64(&[4.0, 2.0]).to_ids(), [4, 2]);
        assert_eq!(TensorView::new(&[2, 3], Elements::F32(&[0.0; 6])).width(), 3);
    }
}
