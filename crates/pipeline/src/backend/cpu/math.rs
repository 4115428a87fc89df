//! The CPU reference arithmetic: f32 storage, f64 accumulation in every
//! reduction, and a fixed summation order so results do not depend on the
//! number of threads (parallel work is split by output element, never
//! inside a sum).

use rayon::prelude::*;

use super::dot_many::{WideInputs, combine, products};
use crate::backend::contract::Precision;
use crate::weights::{WeightDtype, WeightTensor};

/// Dot product in f64 with eight interleaved partial sums combined in a
/// fixed order (vectorisable, deterministic). On x86-64 with AVX the same
/// sums run in two 4-wide registers ([`dot_avx`]; an 8-wide AVX-512 one
/// measured no faster: the weights' reads bound it): each lane multiplies
/// and adds exactly as the portable loop does (no fused multiply-add), so
/// the result is the same to the bit whichever runs.
pub fn dot(a: &[f32], b: &[f32]) -> f64 {
    debug_assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: the CPU has AVX (checked above).
        return unsafe { dot_avx(a, b) };
    }
    dot_portable(a, b)
}

/// [`dot`] in plain Rust: the reference order every path keeps.
fn dot_portable(a: &[f32], b: &[f32]) -> f64 {
    let mut acc = [0.0f64; 8];
    let chunks = a.len().min(b.len()) / 8 * 8;
    for (ca, cb) in a[..chunks].chunks_exact(8).zip(b[..chunks].chunks_exact(8)) {
        for j in 0..8 {
            acc[j] += ca[j] as f64 * cb[j] as f64;
        }
    }
    combine(acc, tail_dot(&a[chunks..], &b[chunks..]))
}

fn tail_dot(a: &[f32], b: &[f32]) -> f64 {
    let mut tail = 0.0f64;
    for (x, y) in a.iter().zip(b) {
        tail += *x as f64 * *y as f64;
    }
    tail
}

/// [`dot_portable`] with lanes 0-3 and 4-7 of each chunk of eight in two
/// AVX registers: the same products (f32 widened exactly to f64, one
/// multiply, one add per lane, no FMA) in the same order. Explicit
/// intrinsics, so the test profile's low optimisation level runs it
/// vectorised too.
///
/// # Safety
/// The CPU must support AVX.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn dot_avx(a: &[f32], b: &[f32]) -> f64 {
    use std::arch::x86_64::*;
    let chunks = a.len().min(b.len()) / 8 * 8;
    let (mut lo, mut hi) = (_mm256_setzero_pd(), _mm256_setzero_pd());
    let mut i = 0;
    while i < chunks {
        // SAFETY: i + 8 <= chunks <= both lengths; unaligned loads.
        let (va, vb) = unsafe { (_mm256_loadu_ps(a.as_ptr().add(i)), _mm256_loadu_ps(b.as_ptr().add(i))) };
        let a_lo = _mm256_cvtps_pd(_mm256_castps256_ps128(va));
        let a_hi = _mm256_cvtps_pd(_mm256_extractf128_ps(va, 1));
        let b_lo = _mm256_cvtps_pd(_mm256_castps256_ps128(vb));
        let b_hi = _mm256_cvtps_pd(_mm256_extractf128_ps(vb, 1));
        lo = _mm256_add_pd(lo, _mm256_mul_pd(a_lo, b_lo));
        hi = _mm256_add_pd(hi, _mm256_mul_pd(a_hi, b_hi));
        i += 8;
    }
    let mut acc = [0.0f64; 8];
    // SAFETY: acc holds eight f64; unaligned stores.
    unsafe {
        _mm256_storeu_pd(acc.as_mut_ptr(), lo);
        _mm256_storeu_pd(acc.as_mut_ptr().add(4), hi);
    }
    combine(acc, tail_dot(&a[chunks..], &b[chunks..]))
}

/// RMSNorm of one row: `out = x * rsqrt(mean(x²) + eps) * w`, in f64.
pub fn rms_norm_row(x: &[f32], w: &[f32], eps: f64, out: &mut [f32]) {
    let inv = 1.0 / (dot(x, x) / x.len() as f64 + eps).sqrt();
    for ((o, &xi), &wi) in out.iter_mut().zip(x).zip(w) {
        *o = (xi as f64 * inv * wi as f64) as f32;
    }
}

/// Rows of weight converted per parallel task.
const ROWS_PER_TASK: usize = 16;

/// `out[i][r] = inputs[i] · w[r]` for every input row i and weight row r,
/// returned as `[inputs.len(), w_rows]` row-major. Parallel over weight
/// rows, each weight row converted to f32 once and used for every input.
pub fn matmul_t(inputs: &[&[f32]], w: &WeightTensor) -> Vec<f32> {
    matmul_t_as(inputs, w, Precision::F32)
}

/// [`matmul_t`] with each weight row rounded to `weights` after it is
/// converted (a contract that multiplies bf16 weights). Weights stored
/// in bf16 are bf16 values already: rounding them again is skipped (it
/// is the identity).
pub fn matmul_t_as(inputs: &[&[f32]], w: &WeightTensor, weights: Precision) -> Vec<f32> {
    let weights = match w.dtype {
        WeightDtype::Bf16 => Precision::F32,
        _ => weights,
    };
    matmul_t_rounding(inputs, w, |row| weights.round(row))
}

/// [`matmul_t`] with `round` applied to each weight row after it is
/// converted (the precision a product takes its weights in).
///
/// Tiled for the caches: the inputs are widened to f64 once (exact: the
/// same products), a task's [`ROWS_PER_TASK`] weight rows are converted
/// together, and [`products`] takes them four rows by four inputs at a
/// time.
pub fn matmul_t_rounding(inputs: &[&[f32]], w: &WeightTensor, round: impl Fn(&mut [f32]) + Sync) -> Vec<f32> {
    let (m, k) = (inputs.len(), w.row_len());
    let wide = WideInputs::new(inputs, k);
    by_weight_row_blocks(
        m,
        w.shape[0],
        || vec![0.0f32; ROWS_PER_TASK * k],
        |first, rows, outs| {
            let n = outs.len() / m.max(1);
            for (j, row) in rows.chunks_exact_mut(k.max(1)).take(n).enumerate() {
                w.read_row(first + j, row);
                round(row);
            }
            products(&wide, &rows[..n * k], k, outs);
        },
    )
}

/// [`matmul_t_as`] of a projection split by its input columns across
/// `parts` tensor-parallel ranks: each rank's partial dot product over its
/// contiguous block of `row_len / parts` columns (f64, [`dot`]'s order),
/// rounded to f32 as a rank holds it, then the partials added in rank
/// order (f64) and rounded to f32: an all-reduce in rank order.
pub fn matmul_t_split(inputs: &[&[f32]], w: &WeightTensor, weights: Precision, parts: usize) -> Vec<f32> {
    let block = w.row_len() / parts.max(1);
    products_by_row(
        inputs,
        w,
        |row| weights.round(row),
        |xs, row, outs| {
            for (o, x) in outs.iter_mut().zip(xs) {
                let part = |p: usize| dot(&x[p * block..(p + 1) * block], &row[p * block..(p + 1) * block]) as f32;
                *o = (0..parts).map(|p| part(p) as f64).sum::<f64>() as f32;
            }
        },
    )
}

/// `products(inputs, row, outs)`: every input's product with every weight
/// row, each row converted to f32 once and `round`ed, in
/// [`by_weight_rows`]' frame.
fn products_by_row(
    inputs: &[&[f32]],
    w: &WeightTensor,
    round: impl Fn(&mut [f32]) + Sync,
    products: impl Fn(&[&[f32]], &[f32], &mut [f32]) + Sync,
) -> Vec<f32> {
    let k = w.row_len();
    by_weight_rows(
        inputs.len(),
        w.shape[0],
        || vec![0.0f32; k],
        |r, row, outs| {
            w.read_row(r, row);
            round(row);
            products(inputs, row, outs);
        },
    )
}

/// The frame of every matmul here: `fill(r, scratch, outs)` writes weight
/// row r's product with each of the `m` inputs into `outs`; rows are shared
/// out in parallel tasks of [`ROWS_PER_TASK`], each with its own `scratch`
/// from `scratch()`. Returns `[m, n]` row-major.
pub fn by_weight_rows<S>(
    m: usize,
    n: usize,
    scratch: impl Fn() -> S + Sync,
    fill: impl Fn(usize, &mut S, &mut [f32]) + Sync,
) -> Vec<f32> {
    by_weight_row_blocks(m, n, scratch, |first, s, outs| {
        for (j, row_outs) in outs.chunks_mut(m.max(1)).enumerate() {
            fill(first + j, s, row_outs);
        }
    })
}

/// [`by_weight_rows`] a task at a time: `fill(first, scratch, outs)`
/// writes the products of weight rows `first..` (up to [`ROWS_PER_TASK`],
/// `outs.len() / m` of them) with every input, row after row, into `outs`.
fn by_weight_row_blocks<S>(
    m: usize,
    n: usize,
    scratch: impl Fn() -> S + Sync,
    fill: impl Fn(usize, &mut S, &mut [f32]) + Sync,
) -> Vec<f32> {
    let mut out = vec![0.0f32; m * n];
    let dst = Columns(out.as_mut_ptr(), out.len());
    (0..n.div_ceil(ROWS_PER_TASK)).into_par_iter().for_each(|task| {
        let first = task * ROWS_PER_TASK;
        let rows = ROWS_PER_TASK.min(n - first);
        // The task's rows by weight row (small), then into their columns
        // of `out`: one output buffer, not a second of its size to
        // transpose (the lm_head's is 39 MB for 64 tokens, each a fresh
        // mapping the kernel zeroes).
        let mut local = vec![0.0f32; rows * m];
        fill(first, &mut scratch(), &mut local);
        for (j, products) in local.chunks(m.max(1)).enumerate() {
            for (i, v) in products.iter().enumerate() {
                dst.write(i * n + first + j, *v);
            }
        }
    });
    out
}

/// The output of [`by_weight_row_blocks`], written by every task in the
/// columns of its own weight rows only.
struct Columns(*mut f32, usize);

// SAFETY: the tasks write disjoint elements (each its own columns), and
// the buffer outlives them (the parallel loop returns before it is read).
unsafe impl Sync for Columns {}

impl Columns {
    fn write(&self, index: usize, value: f32) {
        assert!(index < self.1, "column write {index} out of {}", self.1);
        // SAFETY: in bounds (checked); no other task writes this element.
        unsafe { *self.0.add(index) = value };
    }
}

/// `x * sigmoid(x)` in f64.
pub fn silu(x: f32) -> f32 {
    let x = x as f64;
    (x / (1.0 + (-x).exp())) as f32
}

/// Softmax of `row` in place over its first `valid` entries (in f64); the
/// rest are set to 0.
pub fn softmax_prefix(row: &mut [f32], valid: usize) {
    let max = row[..valid].iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
    let mut exps: Vec<f64> = row[..valid].iter().map(|&x| (x as f64 - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    for e in &mut exps {
        *e /= sum;
    }
    for (o, e) in row.iter_mut().zip(exps.iter().copied().chain(std::iter::repeat(0.0))) {
        *o = e as f32;
    }
    // A NaN input makes max NaN; keep the NaN visible rather than hiding it.
    if row[..valid].iter().any(|x| x.is_nan()) || max.is_nan() {
        row[..valid].fill(f32::NAN);
    }
}

/// Softmax over all `logits` (f64), then the `k` largest probabilities in
/// descending order (ties to the lower index; NaN sorts last), divided by
/// their sum when `normalise`. Returns (weights, indices).
pub fn top_k(logits: &[f32], k: usize, normalise: bool) -> (Vec<f32>, Vec<i32>) {
    let probs = softmax_f64(logits);
    let mut order: Vec<usize> = (0..logits.len()).collect();
    let key = |i: usize| {
        if probs[i].is_nan() { f64::NEG_INFINITY } else { probs[i] }
    };
    order.sort_by(|&a, &b| key(b).total_cmp(&key(a)).then(a.cmp(&b)));
    let chosen = &order[..k];
    (weights_of(&probs, chosen, normalise), chosen.iter().map(|&i| i as i32).collect())
}

/// The routing weights of experts `chosen` (in their order) under
/// `logits`: their softmax probabilities over all experts, divided by their
/// sum when `normalise`; exactly what [`top_k`] gives when it chooses
/// them. For a routing replayed as expert ids only.
pub fn router_weights(logits: &[f32], chosen: &[usize], normalise: bool) -> Vec<f32> {
    weights_of(&softmax_f64(logits), chosen, normalise)
}

fn softmax_f64(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
    let exps: Vec<f64> = logits.iter().map(|&x| (x as f64 - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.iter().map(|e| e / sum).collect()
}

fn weights_of(probs: &[f64], chosen: &[usize], normalise: bool) -> Vec<f32> {
    let total: f64 = chosen.iter().map(|&i| probs[i]).sum();
    chosen.iter().map(|&i| if normalise { probs[i] / total } else { probs[i] } as f32).collect()
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::weights::{WeightDtype, WeightTensor};

    /// Values uniform in [-3, 3) from `seed` (a linear congruential
    /// generator: the same every run).
    pub(in crate::backend::cpu) fn values(seed: u64) -> impl FnMut() -> f32 {
        let mut state = seed;
        move || {
            state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            ((state >> 11) as f64 / (1u64 << 53) as f64 * 6.0 - 3.0) as f32
        }
    }

    #[test]
    fn dot_is_the_portable_loop_to_the_bit() {
        let mut next = values(0x1234_5678);
        for n in [0, 1, 7, 8, 9, 63, 64, 65, 1000, 2880] {
            let (a, b): (Vec<f32>, Vec<f32>) = (0..n).map(|_| (next(), next() * 1e-3)).unzip();
            assert_eq!(dot(&a, &b).to_bits(), dot_portable(&a, &b).to_bits(), "{n}");
        }
    }

    #[test]
    fn dot_matches_a_plain_f64_sum_for_odd_lengths() {
        for n in [0, 1, 7, 8, 9, 37, 100] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let plain: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            assert!((dot(&a, &b) - plain).abs() < 1e-12, "{n}");
        }
    }

    #[test]
    fn matmul_t_is_the_same_for_one_and_two_threads() {
        let (n, k) = (37, 45);
        let bytes: Vec<u8> = (0..n * k).flat_map(|i| ((i as f32 * 0.013).sin()).to_le_bytes()).collect();
        let w = WeightTensor::owned("w".into(), WeightDtype::F32, vec![n, k], bytes);
        let xs: Vec<Vec<f32>> = (0..3).map(|t| (0..k).map(|i| (t * k + i) as f32 * 0.01).collect()).collect();
        let inputs: Vec<&[f32]> = xs.iter().map(|x| x.as_slice()).collect();
        let run = |threads| {
            rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap().install(|| matmul_t(&inputs, &w))
        };
        let one = run(1);
        assert_eq!(one, run(2));
        let wf = w.to_f32_vec();
        for t in 0..3 {
            for r in 0..n {
                let expect = dot(&xs[t], &wf[r * k..(r + 1) * k]) as f32;
                assert_eq!(one[t * n + r], expect);
            }
        }
    }

    #[test]
    fn top_k_orders_descending_breaks_ties_low_and_renormalises() {
        let (w, idx) = top_k(&[1.0, 3.0, 3.0, 0.5], 2, true);
        assert_eq!(idx, [1, 2]);
        assert!((w[0] - 0.5).abs() < 1e-7 && (w[1] - 0.5).abs() < 1e-7);
        let (w, _) = top_k(&[0.0, 0.0, 0.0, 0.0], 2, false);
        assert!((w[0] - 0.25).abs() < 1e-7);
        let (w, idx) = top_k(&[f32::NAN, 1.0, 2.0], 2, true);
        assert_eq!(idx.len(), 2);
        assert!(w.iter().all(|x| x.is_nan()), "NaN must propagate: {w:?}");
    }

    #[test]
    fn softmax_prefix_masks_and_sums_to_one() {
        let mut row = [1.0, 2.0, 3.0, 9.0];
        softmax_prefix(&mut row, 3);
        assert_eq!(row[3], 0.0);
        assert!((row[..3].iter().map(|&x| x as f64).sum::<f64>() - 1.0).abs() < 1e-6);
        let mut row = [f32::NAN, 1.0];
        softmax_prefix(&mut row, 2);
        assert!(row.iter().all(|x| x.is_nan()));
    }

    #[test]
    fn rms_norm_row_matches_the_formula() {
        let x = [1.0f32, -2.0, 3.0];
        let mut out = [0.0; 3];
        rms_norm_row(&x, &[1.0, 2.0, 0.5], 0.0, &mut out);
        let rms = ((1.0 + 4.0 + 9.0) / 3.0f64).sqrt();
        assert!((out[1] as f64 - (-2.0 / rms * 2.0)).abs() < 1e-6);
    }
}
