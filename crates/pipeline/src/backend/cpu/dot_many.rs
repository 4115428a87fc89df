//! One weight row's dot products with many inputs at once, the inner loop
//! of the CPU reference's matrix products: every result the same bits as
//! [`super::math::dot`] of that input and row (the same eight f64 lanes,
//! the same products, the same order; no fused multiply-add).
//!
//! The inputs are widened to f64 once per product ([`WideInputs`]), not
//! once per weight row: widening is exact, so the products are unchanged,
//! and it was half of the loop's floating-point work (on AMD Zen 4 the
//! conversions share the adders' pipes). Each chunk of eight row values is
//! widened once for eight inputs (AVX-512, one register of lanes an input)
//! or four (AVX, two registers an input).

/// `[m, k]` inputs widened to f64 once, row-major: what every weight row
/// of a product multiplies.
pub struct WideInputs {
    values: Vec<f64>,
    k: usize,
}

impl WideInputs {
    /// `inputs` (each of `k` values; shorter ones padded with zeros, which
    /// callers never pass) widened to f64.
    pub fn new(inputs: &[&[f32]], k: usize) -> Self {
        let mut values = vec![0.0f64; inputs.len() * k];
        for (dst, x) in values.chunks_exact_mut(k.max(1)).zip(inputs) {
            for (d, &v) in dst.iter_mut().zip(x.iter()) {
                *d = v as f64;
            }
        }
        Self { values, k }
    }

    /// Input `i`.
    fn row(&self, i: usize) -> &[f64] {
        &self.values[i * self.k..(i + 1) * self.k]
    }
}

/// Inputs `first..first + out.len()` of `xs` dotted with `row`, into
/// `out`: each the bits of `dot(input, row)`.
pub fn dot_many(xs: &WideInputs, first: usize, row: &[f32], out: &mut [f64]) {
    let k = xs.k.min(row.len());
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            for (b, o) in out.chunks_exact_mut(8).enumerate() {
                let ins: [&[f64]; 8] = std::array::from_fn(|j| &xs.row(first + 8 * b + j)[..k]);
                // SAFETY: the CPU has AVX-512F (checked above).
                o.copy_from_slice(&unsafe { dot8_avx512(ins, &row[..k]) });
            }
            done = out.len() / 8 * 8;
        }
        if std::arch::is_x86_feature_detected!("avx") {
            let rest = &mut out[done..];
            for (b, o) in rest.chunks_exact_mut(4).enumerate() {
                let ins: [&[f64]; 4] = std::array::from_fn(|j| &xs.row(first + done + 4 * b + j)[..k]);
                // SAFETY: the CPU has AVX (checked above).
                o.copy_from_slice(&unsafe { dot4_avx(ins, &row[..k]) });
            }
            done += rest.len() / 4 * 4;
        }
    }
    for (i, o) in out.iter_mut().enumerate().skip(done) {
        let x = &xs.row(first + i)[..k];
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked above).
            *o = unsafe { dot1_avx512(x, &row[..k]) };
            continue;
        }
        *o = dot_portable_wide(x, &row[..k]);
    }
}

/// One input with one row, its eight lanes in one AVX-512 register (an
/// expert's last few tokens, below a block of four).
///
/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot1_avx512(x: &[f64], row: &[f32]) -> f64 {
    use std::arch::x86_64::*;
    let len = x.len().min(row.len());
    let chunks = len / 8 * 8;
    let mut acc = _mm512_setzero_pd();
    let mut i = 0;
    while i < chunks {
        // SAFETY: i + 8 <= chunks <= both lengths; unaligned loads.
        let (a, w) = unsafe { (_mm512_loadu_pd(x.as_ptr().add(i)), _mm256_loadu_ps(row.as_ptr().add(i))) };
        acc = _mm512_add_pd(acc, _mm512_mul_pd(a, _mm512_cvtps_pd(w)));
        i += 8;
    }
    combine_zmm(acc, tail(&x[chunks..len], &row[chunks..len]))
}

/// [`combine`] of the eight lanes of `acc` without leaving the registers:
/// lanes j and j + 4 added, then the pairs (0, 2) and (1, 3), then the
/// two halves and the tail, the very additions `combine` makes in its
/// order. Called only from the AVX-512 kernels (their feature is its).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn combine_zmm(acc: std::arch::x86_64::__m512d, tail: f64) -> f64 {
    use std::arch::x86_64::*;
    // (a0 + a4, a1 + a5, a2 + a6, a3 + a7)
    let s = _mm256_add_pd(_mm512_castpd512_pd256(acc), _mm512_extractf64x4_pd(acc, 1));
    // ((a0 + a4) + (a2 + a6), (a1 + a5) + (a3 + a7))
    let t = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd(s, 1));
    _mm_cvtsd_f64(t) + _mm_cvtsd_f64(_mm_unpackhi_pd(t, t)) + tail
}

/// Every product of `rows` (`n` weight rows of `k` values, row-major)
/// with every input of `xs`, rounded to f32 into `outs` (`[n, m]`: row
/// j's product with input i at `j * m + i`): each the bits of
/// `dot(input, row)`. With AVX-512, four rows meet four inputs at a time
/// ([`tile4x4_avx512`]): each input's chunk is read once for four rows
/// and each row's chunk widened once for four inputs, which is what keeps
/// the core's caches from bounding the arithmetic.
pub fn products(xs: &WideInputs, rows: &[f32], k: usize, outs: &mut [f32]) {
    let n = rows.len().checked_div(k).unwrap_or(0);
    let m = outs.len().checked_div(n).unwrap_or(0);
    let row = |j: usize| &rows[j * k..(j + 1) * k];
    let mut done_rows = 0;
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        done_rows = n / 4 * 4;
        for j in (0..done_rows).step_by(4) {
            let rs: [&[f32]; 4] = std::array::from_fn(|r| row(j + r));
            for i in (0..m / 4 * 4).step_by(4) {
                let ins: [&[f64]; 4] = std::array::from_fn(|t| &xs.row(i + t)[..k]);
                // SAFETY: the CPU has AVX-512F (checked above).
                let tile = unsafe { tile4x4_avx512(rs, ins) };
                for (r, sums) in tile.iter().enumerate() {
                    for (t, s) in sums.iter().enumerate() {
                        outs[(j + r) * m + i + t] = *s as f32;
                    }
                }
            }
            for (r, rw) in rs.iter().enumerate() {
                row_products(xs, m / 4 * 4, rw, &mut outs[(j + r) * m..(j + r + 1) * m]);
            }
        }
    }
    for j in done_rows..n {
        row_products(xs, 0, row(j), &mut outs[j * m..(j + 1) * m]);
    }
}

/// `outs[i] = dot(input i, row)` for inputs `first..outs.len()` of `xs`,
/// in blocks of [`dot_many`].
fn row_products(xs: &WideInputs, first: usize, row: &[f32], outs: &mut [f32]) {
    let mut sums = [0.0f64; 8];
    for start in (first..outs.len()).step_by(sums.len()) {
        let block = sums.len().min(outs.len() - start);
        dot_many(xs, start, row, &mut sums[..block]);
        for (o, s) in outs[start..start + block].iter_mut().zip(&sums) {
            *o = *s as f32;
        }
    }
}

/// Four rows with four inputs, each (row, input) pair's eight lanes in
/// one AVX-512 register: a chunk is four widenings of the rows, four
/// loads of the inputs and sixteen multiplies and adds, every lane as
/// the portable loop computes it. Indexed `[row][input]`.
///
/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile4x4_avx512(rows: [&[f32]; 4], xs: [&[f64]; 4]) -> [[f64; 4]; 4] {
    use std::arch::x86_64::*;
    let len = xs.iter().map(|x| x.len()).chain(rows.iter().map(|r| r.len())).min().unwrap_or(0);
    let chunks = len / 8 * 8;
    // Sixteen accumulators in a flat array the loop fully unrolls over
    // (registers, not the stack; read once at the end).
    let mut acc = [_mm512_setzero_pd(); 16];
    let mut i = 0;
    while i < chunks {
        // SAFETY: i + 8 <= chunks <= every length; unaligned loads.
        let w: [__m512d; 4] =
            std::array::from_fn(|r| _mm512_cvtps_pd(unsafe { _mm256_loadu_ps(rows[r].as_ptr().add(i)) }));
        for t in 0..4 {
            // SAFETY: as above.
            let a = unsafe { _mm512_loadu_pd(xs[t].as_ptr().add(i)) };
            for r in 0..4 {
                acc[4 * r + t] = _mm512_add_pd(acc[4 * r + t], _mm512_mul_pd(a, w[r]));
            }
        }
        i += 8;
    }
    let mut out = [[0.0f64; 4]; 4];
    for (r, sums) in out.iter_mut().enumerate() {
        for (t, o) in sums.iter_mut().enumerate() {
            *o = combine_zmm(acc[4 * r + t], tail(&xs[t][chunks..len], &rows[r][chunks..len]));
        }
    }
    out
}

/// Eight inputs with one row, each input's eight lanes in one AVX-512
/// register (lane j is element 8i + j, as in the portable loop): a chunk
/// of the row widened once, then one multiply and one add per input.
///
/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot8_avx512(xs: [&[f64]; 8], row: &[f32]) -> [f64; 8] {
    use std::arch::x86_64::*;
    let len = xs.iter().map(|x| x.len()).fold(row.len(), usize::min);
    let chunks = len / 8 * 8;
    let mut acc = [_mm512_setzero_pd(); 8];
    let mut i = 0;
    while i < chunks {
        // SAFETY: i + 8 <= chunks <= every length; unaligned loads.
        let w = _mm512_cvtps_pd(unsafe { _mm256_loadu_ps(row.as_ptr().add(i)) });
        for j in 0..8 {
            // SAFETY: as above.
            let a = unsafe { _mm512_loadu_pd(xs[j].as_ptr().add(i)) };
            acc[j] = _mm512_add_pd(acc[j], _mm512_mul_pd(a, w));
        }
        i += 8;
    }
    std::array::from_fn(|j| combine_zmm(acc[j], tail(&xs[j][chunks..len], &row[chunks..len])))
}

/// Four inputs with one row, lanes 0-3 and 4-7 of each chunk in two AVX
/// registers an input: the row's chunk widened once for the four.
///
/// # Safety
/// The CPU must support AVX.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn dot4_avx(xs: [&[f64]; 4], row: &[f32]) -> [f64; 4] {
    use std::arch::x86_64::*;
    let len = xs.iter().map(|x| x.len()).fold(row.len(), usize::min);
    let chunks = len / 8 * 8;
    let mut lo = [_mm256_setzero_pd(); 4];
    let mut hi = [_mm256_setzero_pd(); 4];
    let mut i = 0;
    while i < chunks {
        // SAFETY: i + 8 <= chunks <= every length; unaligned loads.
        let vb = unsafe { _mm256_loadu_ps(row.as_ptr().add(i)) };
        let b_lo = _mm256_cvtps_pd(_mm256_castps256_ps128(vb));
        let b_hi = _mm256_cvtps_pd(_mm256_extractf128_ps(vb, 1));
        for j in 0..4 {
            // SAFETY: as above.
            let (a_lo, a_hi) =
                unsafe { (_mm256_loadu_pd(xs[j].as_ptr().add(i)), _mm256_loadu_pd(xs[j].as_ptr().add(i + 4))) };
            lo[j] = _mm256_add_pd(lo[j], _mm256_mul_pd(a_lo, b_lo));
            hi[j] = _mm256_add_pd(hi[j], _mm256_mul_pd(a_hi, b_hi));
        }
        i += 8;
    }
    std::array::from_fn(|j| {
        let mut acc = [0.0f64; 8];
        // SAFETY: acc holds eight f64; unaligned stores.
        unsafe {
            _mm256_storeu_pd(acc.as_mut_ptr(), lo[j]);
            _mm256_storeu_pd(acc.as_mut_ptr().add(4), hi[j]);
        }
        combine(acc, tail(&xs[j][chunks..len], &row[chunks..len]))
    })
}

/// The eight partial sums and the tail, in the one fixed order.
pub(super) fn combine(acc: [f64; 8], tail: f64) -> f64 {
    ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7])) + tail
}

/// The portable loop (math.rs's `dot_portable`) of an input already widened to f64 (exactly) with a
/// row: the same lanes, products and order, so the same bits.
fn dot_portable_wide(a: &[f64], b: &[f32]) -> f64 {
    let mut acc = [0.0f64; 8];
    let chunks = a.len().min(b.len()) / 8 * 8;
    for (ca, cb) in a[..chunks].chunks_exact(8).zip(b[..chunks].chunks_exact(8)) {
        for j in 0..8 {
            acc[j] += ca[j] * cb[j] as f64;
        }
    }
    combine(acc, tail(&a[chunks..], &b[chunks..]))
}

/// The elements past the last chunk of eight, summed in order.
fn tail(x: &[f64], row: &[f32]) -> f64 {
    x.iter().zip(row).fold(0.0, |t, (a, b)| t + a * *b as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::math::dot;
    use crate::backend::cpu::math::tests::values;

    fn same(want: f64, got: f64) -> bool {
        want.to_bits() == got.to_bits() || want.is_nan() && got.is_nan()
    }

    #[test]
    fn dot_many_is_dot_of_each_input_to_the_bit_on_every_path() {
        let mut next = values(0x9e37_79b9);
        for (m, n) in [(0, 8), (1, 9), (3, 64), (4, 65), (5, 7), (9, 1000), (8, 2880), (13, 256), (17, 33)] {
            let row: Vec<f32> = (0..n).map(|_| next() * 1e-3).collect();
            let mut xs: Vec<Vec<f32>> = (0..m).map(|_| (0..n).map(|_| next()).collect()).collect();
            if let Some(x) = xs.get_mut(2) {
                x[0] = f32::NAN;
            }
            let inputs: Vec<&[f32]> = xs.iter().map(|x| x.as_slice()).collect();
            let wide = WideInputs::new(&inputs, n);
            let want: Vec<f64> = xs.iter().map(|x| dot(x, &row)).collect();
            // Whichever path this CPU picks, from every starting input.
            for first in 0..m.min(3) {
                let mut out = vec![0.0f64; m - first];
                dot_many(&wide, first, &row, &mut out);
                for (i, o) in out.iter().enumerate() {
                    assert!(same(want[first + i], *o), "{m}x{n} from {first}: input {}", first + i);
                }
            }
            // Each vector path on its own.
            #[cfg(target_arch = "x86_64")]
            {
                let rows: Vec<&[f64]> = (0..m).map(|i| wide.row(i)).collect();
                if std::arch::is_x86_feature_detected!("avx") {
                    for (b, four) in rows.chunks_exact(4).enumerate() {
                        // SAFETY: the CPU has AVX.
                        let got = unsafe { dot4_avx([four[0], four[1], four[2], four[3]], &row) };
                        assert!(got.iter().zip(&want[4 * b..]).all(|(g, w)| same(*w, *g)), "avx {m}x{n}");
                    }
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    for (x, w) in rows.iter().zip(&want) {
                        // SAFETY: the CPU has AVX-512F.
                        assert!(same(*w, unsafe { dot1_avx512(x, &row) }), "avx512 one {m}x{n}");
                    }
                    for (b, eight) in rows.chunks_exact(8).enumerate() {
                        // SAFETY: the CPU has AVX-512F.
                        let got = unsafe { dot8_avx512(std::array::from_fn(|j| eight[j]), &row) };
                        assert!(got.iter().zip(&want[8 * b..]).all(|(g, w)| same(*w, *g)), "avx512 {m}x{n}");
                    }
                }
            }
        }
    }

    #[test]
    fn products_are_dot_of_every_row_and_input_to_the_bit_at_every_edge() {
        let mut next = values(0x5eed);
        // Rows and inputs below, at and past the 4 x 4 tile, and lengths
        // with and without a tail.
        for (n, m, k) in [(1, 1, 8), (4, 4, 64), (5, 7, 33), (8, 9, 256), (3, 12, 7), (16, 5, 2880), (0, 3, 8)] {
            let rows: Vec<f32> = (0..n * k).map(|_| next() * 1e-2).collect();
            let xs: Vec<Vec<f32>> = (0..m).map(|_| (0..k).map(|_| next()).collect()).collect();
            let inputs: Vec<&[f32]> = xs.iter().map(|x| x.as_slice()).collect();
            let mut outs = vec![f32::NAN; n * m];
            products(&WideInputs::new(&inputs, k), &rows, k, &mut outs);
            for j in 0..n {
                for (i, x) in xs.iter().enumerate() {
                    let want = dot(x, &rows[j * k..(j + 1) * k]) as f32;
                    assert_eq!(outs[j * m + i].to_bits(), want.to_bits(), "{n}x{m}x{k}: row {j} input {i}");
                }
            }
        }
    }
}
