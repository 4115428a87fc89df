//! Metrics of one tensor pair, in f64: NaN/Inf counts per side, max |a-b|
//! with its multi-index, rel_l2 = ||a-b|| / ||a||, per-row cosine and its
//! minimum, and the token with the largest error. Non-finite values never
//! slip through: a NaN or Inf on either side makes the pair's max error
//! infinite and is counted per side.

use serde::{Deserialize, Serialize};

use crate::view::Elements;

/// The metrics of a reference/target pair of equal shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorMetrics {
    /// Elements compared.
    pub elements: usize,
    /// NaNs in the reference.
    pub ref_nan: usize,
    /// Infs in the reference.
    pub ref_inf: usize,
    /// NaNs in the target.
    pub target_nan: usize,
    /// Infs in the target.
    pub target_inf: usize,
    /// Largest |a - b| (infinite where either side is not finite).
    #[serde(with = "crate::json_float::float")]
    pub max_abs_diff: f64,
    /// Multi-index of the largest |a - b|.
    pub max_abs_index: Vec<usize>,
    /// ||a - b|| / ||a|| (0 if equal; inf if ||a|| = 0 < ||a-b|| or a value is
    /// non-finite on one side only).
    #[serde(with = "crate::json_float::float")]
    pub rel_l2: f64,
    /// Smallest cosine between matching rows (last dimension).
    #[serde(with = "crate::json_float::float")]
    pub min_row_cosine: f64,
    /// Token (T index) whose rows have the largest squared error.
    pub worst_token: Option<usize>,
    /// The largest error of one row (last dimension) relative to the
    /// tensor's RMS row norm: `max_r ||a_r - b_r|| / sqrt(mean_r ||a_r||²)`.
    /// A bug that hits one token or one expert slot shows here even when
    /// it moves the whole-tensor rel_l2 less than rounding does. Infinite
    /// where a row holds a non-finite value on one side only.
    #[serde(with = "crate::json_float::float")]
    pub worst_row_error: f64,
    /// Flat index of that row (over all dimensions but the last).
    pub worst_row: usize,
}

impl TensorMetrics {
    /// Any NaN or Inf on either side.
    pub fn has_non_finite(&self) -> bool {
        self.ref_nan + self.ref_inf + self.target_nan + self.target_inf > 0
    }
}

/// Computes the metrics of `reference` vs `target` (same length), both of
/// `shape`; `token_axis` says which axis is T (0, or 1 for [nh,T,P] maps).
/// One pass, a row (the last dimension) at a time in f64.
pub fn tensor_metrics(
    reference: Elements<'_>,
    target: Elements<'_>,
    shape: &[usize],
    token_axis: usize,
) -> TensorMetrics {
    let mut m = TensorMetrics {
        elements: reference.len(),
        ref_nan: 0,
        ref_inf: 0,
        target_nan: 0,
        target_inf: 0,
        max_abs_diff: 0.0,
        max_abs_index: Vec::new(),
        rel_l2: 0.0,
        min_row_cosine: 1.0,
        worst_token: None,
        worst_row_error: 0.0,
        worst_row: 0,
    };
    let tokens = shape.get(token_axis).copied().unwrap_or(1).max(1);
    let inner: usize = shape.iter().skip(token_axis + 1).product::<usize>().max(1);
    let width = shape.last().copied().unwrap_or(1).max(1);
    let n = reference.len().min(target.len());
    let mut per_token = vec![0.0f64; tokens];
    let (mut diff2, mut ref2) = (0.0f64, 0.0f64);
    let mut worst = 0usize;
    // Per row: its squared error, and whether a value is non-finite on one
    // side only (an infinite row error).
    let mut rows: Vec<(f64, bool)> = Vec::with_capacity(n.div_ceil(width));
    let (mut a, mut b) = (Vec::with_capacity(width), Vec::with_capacity(width));
    for start in (0..n).step_by(width) {
        let end = (start + width).min(n);
        reference.row_into(start..end, &mut a);
        target.row_into(start..end, &mut b);
        let (mut row_d2, mut row_bad) = (0.0f64, false);
        let (mut ab, mut aa, mut bb) = (0.0f64, 0.0f64, 0.0f64);
        for (j, (&x, &y)) in a.iter().zip(&b).enumerate() {
            let i = start + j;
            m.ref_nan += usize::from(x.is_nan());
            m.ref_inf += usize::from(x.is_infinite());
            m.target_nan += usize::from(y.is_nan());
            m.target_inf += usize::from(y.is_infinite());
            let d = if x.is_finite() && y.is_finite() {
                let d = x - y;
                diff2 += d * d;
                ref2 += x * x;
                row_d2 += d * d;
                per_token[(i / inner) % tokens] += d * d;
                d.abs()
            } else if x.to_bits() == y.to_bits() && !x.is_nan() {
                0.0 // the same infinity on both sides
            } else {
                per_token[(i / inner) % tokens] = f64::INFINITY;
                row_bad = true;
                f64::INFINITY
            };
            if d > m.max_abs_diff || (i == 0 && m.max_abs_index.is_empty()) {
                m.max_abs_diff = d;
                worst = i;
            }
            ab += x * y;
            aa += x * x;
            bb += y * y;
        }
        let c = cosine(ab, aa, bb);
        // A NaN row cosine sticks: it must never be hidden by a later row.
        if c.is_nan() || (!m.min_row_cosine.is_nan() && c < m.min_row_cosine) {
            m.min_row_cosine = c;
        }
        rows.push((row_d2, row_bad));
    }
    m.max_abs_index = unravel(worst, shape);
    m.rel_l2 = if m.max_abs_diff.is_infinite() {
        f64::INFINITY // a non-finite value on one side only: never a small error
    } else if diff2 == 0.0 {
        0.0
    } else if ref2 == 0.0 {
        f64::INFINITY
    } else {
        (diff2 / ref2).sqrt()
    };
    let rms_row_norm = (ref2 / reference.len().div_ceil(width).max(1) as f64).sqrt();
    for (r, &(d2, bad)) in rows.iter().enumerate() {
        let e = row_error(d2, bad, rms_row_norm);
        if e > m.worst_row_error {
            m.worst_row_error = e;
            m.worst_row = r;
        }
    }
    m.worst_token =
        per_token.iter().enumerate().filter(|(_, e)| **e > 0.0).max_by(|a, b| a.1.total_cmp(b.1)).map(|(t, _)| t);
    m
}

/// The RMS norm of a tensor's rows of `row` values (finite values only):
/// the scale row errors are measured on.
pub fn rms_row_norm(reference: Elements<'_>, row: usize) -> f64 {
    let row = row.max(1);
    let rows = reference.len().div_ceil(row).max(1);
    let mut buffer = Vec::with_capacity(row);
    let mut sum = 0.0f64;
    for start in (0..reference.len()).step_by(row) {
        reference.row_into(start..(start + row).min(reference.len()), &mut buffer);
        sum += buffer.iter().filter(|x| x.is_finite()).map(|x| x * x).sum::<f64>();
    }
    (sum / rows as f64).sqrt()
}

/// Whether the target's error is the same vector on every row of a
/// `[rows, width]` tensor (a constant added to every token, as a bias is,
/// or one left out): the offset's rms over the reference's rms where every
/// row's error is within 5% (l2) of the mean error, with at least two rows,
/// a nonzero mean and every difference finite; None otherwise. Two passes,
/// nothing kept per row.
pub fn same_offset_on_every_row(reference: Elements<'_>, target: Elements<'_>, width: usize) -> Option<f64> {
    let width = width.max(1);
    let rows = reference.len().min(target.len()) / width;
    if rows < 2 {
        return None;
    }
    let (mut a, mut b) = (Vec::with_capacity(width), Vec::with_capacity(width));
    let mut diff_rows = |each: &mut dyn FnMut(&[f64], &[f64]) -> bool| {
        (0..rows).all(|r| {
            reference.row_into(r * width..(r + 1) * width, &mut a);
            target.row_into(r * width..(r + 1) * width, &mut b);
            each(&a, &b)
        })
    };
    let (mut mean, mut reference_sq) = (vec![0.0f64; width], 0.0f64);
    let finite = diff_rows(&mut |a, b| {
        for ((m, x), y) in mean.iter_mut().zip(a).zip(b) {
            *m += (y - x) / rows as f64;
            reference_sq += x * x;
        }
        a.iter().zip(b).all(|(x, y)| (y - x).is_finite())
    });
    let mean_sq: f64 = mean.iter().map(|m| m * m).sum();
    if !finite || mean_sq == 0.0 {
        return None;
    }
    let same = diff_rows(&mut |a, b| {
        let spread: f64 = a.iter().zip(b).zip(&mean).map(|((x, y), m)| (y - x - m) * (y - x - m)).sum();
        spread <= 0.05f64.powi(2) * mean_sq
    });
    let rms = |sq: f64, n: usize| (sq / n as f64).sqrt();
    same.then(|| rms(mean_sq, width) / rms(reference_sq, rows * width).max(f64::MIN_POSITIVE))
}

/// Each row's error `||a_r - b_r|| / norm` (rows of `row` values; see
/// [`TensorMetrics::worst_row_error`]).
pub fn row_errors(reference: Elements<'_>, other: Elements<'_>, row: usize, norm: f64) -> Vec<f64> {
    let row = row.max(1);
    let n = reference.len().min(other.len());
    let (mut a, mut b) = (Vec::with_capacity(row), Vec::with_capacity(row));
    (0..n)
        .step_by(row)
        .map(|start| {
            let end = (start + row).min(n);
            reference.row_into(start..end, &mut a);
            other.row_into(start..end, &mut b);
            let (mut d2, mut bad) = (0.0f64, false);
            for (&x, &y) in a.iter().zip(&b) {
                if x.is_finite() && y.is_finite() {
                    d2 += (x - y) * (x - y);
                } else if x.to_bits() != y.to_bits() || x.is_nan() {
                    bad = true;
                }
            }
            row_error(d2, bad, norm)
        })
        .collect()
}

/// The whole tensor's rel_l2 from its [`row_errors`] over the RMS row
/// norm of a reference of `rows` rows: `sqrt(sum(e²) / rows)`, without a
/// second pass over the values.
pub fn rel_l2_of_rows(errors: &[f64], rows: usize) -> f64 {
    (errors.iter().map(|e| e * e).sum::<f64>() / rows.max(1) as f64).sqrt()
}

/// A row's error from its squared difference `d2` over finite pairs:
/// `sqrt(d2) / norm`, 0 for equal rows, infinite where a value is
/// non-finite on one side only (`bad`) or a difference over a zero norm.
fn row_error(d2: f64, bad: bool, norm: f64) -> f64 {
    if bad {
        f64::INFINITY
    } else if d2 == 0.0 {
        0.0
    } else if norm == 0.0 {
        f64::INFINITY
    } else {
        d2.sqrt() / norm
    }
}

/// Cosine of two rows from their sums `a·b`, `a·a`, `b·b`: 1 for two zero
/// rows, 0 for one zero row, NaN if a value is not finite.
fn cosine(ab: f64, aa: f64, bb: f64) -> f64 {
    if aa == 0.0 && bb == 0.0 {
        1.0
    } else if aa == 0.0 || bb == 0.0 {
        0.0
    } else {
        ab / (aa.sqrt() * bb.sqrt())
    }
}

/// Flat index → multi-index.
pub fn unravel(mut flat: usize, shape: &[usize]) -> Vec<usize> {
    let mut index = vec![0; shape.len()];
    for (slot, &dim) in index.iter_mut().zip(shape).rev() {
        if dim > 0 {
            *slot = flat % dim;
            flat /= dim;
        }
    }
    index
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_offset_on_every_row_is_told_from_a_one_row_error() {
        let reference: Vec<f32> = (0..12).map(|i| (i as f32 * 0.7).sin()).collect();
        let bias = [0.5f32, -0.25, 0.125, 1.0];
        let biased: Vec<f32> = reference.iter().enumerate().map(|(i, x)| x + bias[i % 4]).collect();
        let offset = same_offset_on_every_row(Elements::F32(&reference), Elements::F32(&biased), 4).unwrap();
        let rms = |v: &[f32]| (v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / v.len() as f64).sqrt();
        assert!((offset - rms(&bias) / rms(&reference)).abs() < 1e-6, "{offset}");
        let mut one_row = reference.clone();
        one_row[5] += 1.0;
        assert_eq!(same_offset_on_every_row(Elements::F32(&reference), Elements::F32(&one_row), 4), None);
        assert_eq!(same_offset_on_every_row(Elements::F32(&reference), Elements::F32(&reference), 4), None);
        assert_eq!(same_offset_on_every_row(Elements::F32(&reference[..4]), Elements::F32(&biased[..4]), 4), None);
        let mut nan = biased.clone();
        nan[0] = f32::NAN;
        assert_eq!(same_offset_on_every_row(Elements::F32(&reference), Elements::F32(&nan), 4), None);
    }
    use crate::view::Elements::F64;

    #[test]
    fn equal_tensors_have_zero_error_and_unit_cosine() {
        let a = [1.0, 2.0, 3.0, 4.0];
        let m = tensor_metrics(F64(&a), F64(&a), &[2, 2], 0);
        assert_eq!((m.rel_l2, m.max_abs_diff, m.worst_token), (0.0, 0.0, None));
        assert!((m.min_row_cosine - 1.0).abs() < 1e-12);
    }

    #[test]
    fn error_location_and_worst_token_are_found() {
        let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let b = [1.0, 2.0, 3.0, 4.0, 5.5, 6.0];
        let m = tensor_metrics(F64(&a), F64(&b), &[3, 2], 0);
        assert_eq!(m.max_abs_index, [2, 0]);
        assert_eq!(m.worst_token, Some(2));
        assert!((m.rel_l2 - 0.5 / 91f64.sqrt()).abs() < 1e-12);
        assert!(m.min_row_cosine < 1.0);
        // row 2 of 3: |0.5| over the RMS row norm sqrt(91/3)
        assert_eq!(m.worst_row, 2);
        assert!((m.worst_row_error - 0.5 / (91f64 / 3.0).sqrt()).abs() < 1e-12);
        // token axis 1 of an [nh,T,P] map
        let m = tensor_metrics(F64(&a), F64(&b), &[1, 3, 2], 1);
        assert_eq!(m.worst_token, Some(2));
    }

    #[test]
    fn nan_and_inf_never_slip_through_max_or_cosine() {
        let a = [1.0, 2.0, 3.0, 4.0];
        let b = [1.0, f64::NAN, 3.0, 4.0];
        let m = tensor_metrics(F64(&a), F64(&b), &[2, 2], 0);
        assert_eq!((m.target_nan, m.ref_nan), (1, 0));
        assert!(m.max_abs_diff.is_infinite() && m.rel_l2.is_infinite());
        assert_eq!(m.max_abs_index, [0, 1]);
        assert!(m.min_row_cosine.is_nan());
        assert!(m.has_non_finite());
        let c = [f64::INFINITY, 2.0, 3.0, 4.0];
        let m = tensor_metrics(F64(&c), F64(&a), &[2, 2], 0);
        assert_eq!(m.ref_inf, 1);
        assert!(m.max_abs_diff.is_infinite());
        // NaN in the very first element is still the maximum.
        let m = tensor_metrics(F64(&[f64::NAN, 1.0]), F64(&[0.0, 1.0]), &[2], 0);
        assert!(m.max_abs_diff.is_infinite() && m.max_abs_index == [0]);
    }

    #[test]
    fn one_bad_row_among_many_stands_out_where_rel_l2_does_not() {
        // 64 rows of 16; every row off by 0.4% (rounding-like), one row by 5%.
        let a: Vec<f64> = (0..64 * 16).map(|i| 1.0 + (i % 7) as f64 * 0.1).collect();
        let b: Vec<f64> = a
            .iter()
            .enumerate()
            .map(|(i, x)| if i / 16 == 37 { x * 1.05 } else { x * (1.0 + 0.004 * if i % 2 == 0 { 1.0 } else { -1.0 }) })
            .collect();
        let m = tensor_metrics(F64(&a), F64(&b), &[64, 16], 0);
        assert!(m.rel_l2 < 0.008, "{}", m.rel_l2);
        assert_eq!(m.worst_row, 37);
        assert!(m.worst_row_error > 0.04, "{}", m.worst_row_error);
    }

    #[test]
    fn rel_l2_from_row_errors_equals_the_direct_one() {
        let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let b = [1.1, 2.0, 2.5, 4.0, 5.0, 6.3];
        let errors = row_errors(F64(&a), F64(&b), 2, rms_row_norm(F64(&a), 2));
        let direct = tensor_metrics(F64(&a), F64(&b), &[3, 2], 0).rel_l2;
        assert!((rel_l2_of_rows(&errors, 3) - direct).abs() < 1e-12, "{direct}");
    }

    #[test]
    fn zero_reference_gives_infinite_relative_error() {
        let m = tensor_metrics(F64(&[0.0, 0.0]), F64(&[0.0, 1.0]), &[1, 2], 0);
        assert!(m.rel_l2.is_infinite());
        assert_eq!(m.min_row_cosine, 0.0);
    }
}
