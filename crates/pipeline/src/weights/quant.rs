//! ggml's block formats decoded to f32, exactly as llama.cpp's
//! `dequantize_row_*` (ggml-quants.c) computes them, in f32 and in the
//! same order of operations: Q8_0 (32 values: an f16 scale and int8
//! values), Q4_K and Q5_K (256 values: f16 scale and min, eight sub-blocks
//! of 32 with 6-bit scales and mins packed in 12 bytes, 4-bit values and
//! for Q5_K a fifth bit), Q6_K (256 values: 6-bit values in a low-nibble
//! and a high-bits array, sixteen int8 sub-block scales, an f16 scale), and
//! the plain F32, F16 and BF16; the 32-value Q4_0, Q4_1, Q5_0 and Q5_1 in
//! quant_legacy.rs.

use half::f16;

use super::gguf::GgmlType;
use super::quant_legacy;

/// Decodes `bytes` (whole blocks of `kind`) into `out` (as many values as
/// the blocks hold). Errors name the type and the lengths.
pub fn dequantize(kind: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<(), String> {
    let (Some(block_len), Some(block_bytes)) = (kind.block_len(), kind.block_bytes()) else {
        return Err(format!("ggml {} has no block layout here", kind.name()));
    };
    let (block_len, block_bytes) = (block_len as usize, block_bytes as usize);
    if !bytes.len().is_multiple_of(block_bytes) || bytes.len() / block_bytes * block_len != out.len() {
        return Err(format!(
            "{} bytes of {} do not hold {} values (blocks of {block_len} values in {block_bytes} bytes)",
            bytes.len(),
            kind.name(),
            out.len()
        ));
    }
    let decode: fn(&[u8], &mut [f32]) = match kind {
        GgmlType::F32 => |b, y| y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        GgmlType::F16 => |b, y| y[0] = half_at(b, 0),
        GgmlType::BF16 => |b, y| y[0] = f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16),
        GgmlType::Q4_0 => quant_legacy::q4_0,
        GgmlType::Q4_1 => quant_legacy::q4_1,
        GgmlType::Q5_0 => quant_legacy::q5_0,
        GgmlType::Q5_1 => quant_legacy::q5_1,
        GgmlType::Q8_0 => q8_0,
        GgmlType::MXFP4 => quant_legacy::mxfp4,
        GgmlType::Q4_K => q4_k,
        GgmlType::Q5_K => q5_k,
        GgmlType::Q6_K => q6_k,
        other => {
            return Err(format!(
                "decoding ggml {} is not supported (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, MXFP4, Q4_K, Q5_K, Q6_K are)",
                other.name()
            ));
        }
    };
    for (block, y) in bytes.chunks_exact(block_bytes).zip(out.chunks_exact_mut(block_len)) {
        decode(block, y);
    }
    Ok(())
}

/// The f16 at byte `at` of `b`, widened.
fn half_at(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// block_q8_0: `d` (f16), `qs[32]` (int8); `y = qs * d`.
fn q8_0(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    for (o, &q) in y.iter_mut().zip(&b[2..34]) {
        *o = f32::from(q as i8) * d;
    }
}

/// Scale and min of sub-block `j` (0..8) from the 12 packed bytes
/// (llama.cpp's `get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// block_q4_K: `d`, `dmin` (f16), `scales[12]`, `qs[128]`. Each 64 values
/// share 32 bytes of `qs`: low nibbles for sub-block 2j, high for 2j + 1;
/// `y = d * sc * q - dmin * m`.
fn q4_k(b: &[u8], y: &mut [f32]) {
    let (d, min) = (half_at(b, 0), half_at(b, 2));
    let (scales, qs) = (&b[4..16], &b[16..144]);
    for j in 0..4 {
        let (sc1, m1) = scale_min_k4(2 * j, scales);
        let (sc2, m2) = scale_min_k4(2 * j + 1, scales);
        let (d1, m1, d2, m2) = (d * f32::from(sc1), min * f32::from(m1), d * f32::from(sc2), min * f32::from(m2));
        let q = &qs[32 * j..32 * j + 32];
        let out = &mut y[64 * j..64 * j + 64];
        for l in 0..32 {
            out[l] = d1 * f32::from(q[l] & 0xF) - m1;
            out[32 + l] = d2 * f32::from(q[l] >> 4) - m2;
        }
    }
}

/// block_q5_K: `d`, `dmin`, `scales[12]`, `qh[32]`, `qs[128]`: as Q4_K,
/// plus 16 when bit 2j (low nibbles) or 2j + 1 (high) of `qh[l]` is set.
fn q5_k(b: &[u8], y: &mut [f32]) {
    let (d, min) = (half_at(b, 0), half_at(b, 2));
    let (scales, qh, qs) = (&b[4..16], &b[16..48], &b[48..176]);
    for j in 0..4 {
        let (sc1, m1) = scale_min_k4(2 * j, scales);
        let (sc2, m2) = scale_min_k4(2 * j + 1, scales);
        let (d1, m1, d2, m2) = (d * f32::from(sc1), min * f32::from(m1), d * f32::from(sc2), min * f32::from(m2));
        let (u1, u2) = (1u8 << (2 * j), 2u8 << (2 * j));
        let q = &qs[32 * j..32 * j + 32];
        let out = &mut y[64 * j..64 * j + 64];
        for l in 0..32 {
            let hi1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let hi2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            out[l] = d1 * f32::from((q[l] & 0xF) + hi1) - m1;
            out[32 + l] = d2 * f32::from((q[l] >> 4) + hi2) - m2;
        }
    }
}

/// A Q4_K or Q5_K block as llama.cpp's CUDA MMQ kernels (more than 8
/// tokens a matmul) take it: `scaled` gets each value's `d * sc * q` with
/// the product `d * sc` rounded to f16 (the kernels' `half2` products),
/// `mins` each 32-value sub-block's `dmin * m`, rounded to f16 likewise.
/// The kernel subtracts a sub-block's min times the f16 sum of the float
/// activations there, not times the quantized ones (ggml_cuda.rs).
/// Errors for any other type.
pub fn mmq_sub_blocks(kind: GgmlType, bytes: &[u8], scaled: &mut [f32], mins: &mut [f32]) -> Result<(), String> {
    let (block_bytes, high_bits) = match kind {
        GgmlType::Q4_K => (144, None),
        GgmlType::Q5_K => (176, Some(16..48)),
        other => return Err(format!("ggml {} has no sub-block mins (Q4_K and Q5_K have)", other.name())),
    };
    if !bytes.len().is_multiple_of(block_bytes)
        || bytes.len() / block_bytes * 256 != scaled.len()
        || scaled.len() / 32 != mins.len()
    {
        return Err(format!("{} bytes of {} do not hold {} values", bytes.len(), kind.name(), scaled.len()));
    }
    let qs_at = if high_bits.is_some() { 48 } else { 16 };
    for ((b, y), m_out) in
        bytes.chunks_exact(block_bytes).zip(scaled.chunks_exact_mut(256)).zip(mins.chunks_exact_mut(8))
    {
        let (d, min) = (half_at(b, 0), half_at(b, 2));
        let qh = high_bits.clone().map(|r| &b[r]);
        for j in 0..8 {
            let (sc, m) = scale_min_k4(j, &b[4..16]);
            let dm = f16::from_f32(d * f32::from(sc)).to_f32();
            m_out[j] = f16::from_f32(min * f32::from(m)).to_f32();
            let q = &b[qs_at + 32 * (j / 2)..qs_at + 32 * (j / 2) + 32];
            for l in 0..32 {
                let low = if j % 2 == 0 { q[l] & 0xF } else { q[l] >> 4 };
                let high = qh.map_or(0, |qh| if qh[l] & (1u8 << j) != 0 { 16 } else { 0 });
                y[32 * j + l] = dm * f32::from(low + high);
            }
        }
    }
    Ok(())
}

/// block_q6_K: `ql[128]`, `qh[64]`, `scales[16]` (int8), `d` (f16). Each
/// 128 values take 64 bytes of `ql`, 32 of `qh` and 8 scales; value
/// `32 * k + l` (k in 0..4) is 6 bits from a nibble of `ql` and two bits of
/// `qh[l]`, less 32, times `d * sc`.
fn q6_k(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 208);
    for n in 0..2 {
        let ql = &b[64 * n..64 * n + 64];
        let qh = &b[128 + 32 * n..128 + 32 * n + 32];
        let sc = &b[192 + 8 * n..192 + 8 * n + 8];
        let out = &mut y[128 * n..128 * n + 128];
        for l in 0..32 {
            let is = l / 16;
            let six = |low: u8, shift: u32| i32::from(low | (((qh[l] >> shift) & 3) << 4)) - 32;
            let q = [six(ql[l] & 0xF, 0), six(ql[l + 32] & 0xF, 2), six(ql[l] >> 4, 4), six(ql[l + 32] >> 4, 6)];
            for (k, q) in q.into_iter().enumerate() {
                out[32 * k + l] = d * f32::from(sc[is + 2 * k] as i8) * q as f32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! Blocks built from known values by packers written from the formats'
    //! descriptions (not from the decoders), then decoded: every value must
    //! come back as `d * scale * q - dmin * min` of its own sub-block,
    //! computed in the same f32 order as llama.cpp.

    use super::*;

    /// Deterministic small numbers.
    fn values(n: usize, seed: u32, modulo: u32) -> Vec<u32> {
        let mut x = seed.wrapping_mul(2654435761).wrapping_add(12345);
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x % modulo
            })
            .collect()
    }

    fn half_bytes(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_bits().to_le_bytes()
    }

    /// The 12 bytes holding 6-bit scales `sc[0..8]` and mins `m[0..8]`.
    fn pack_scales(sc: &[u32], m: &[u32]) -> [u8; 12] {
        let mut q = [0u8; 12];
        for j in 0..8 {
            let (s, mm) = (sc[j] as u8, m[j] as u8);
            if j < 4 {
                q[j] |= s;
                q[j + 4] |= mm;
            } else {
                q[j + 4] = (s & 0xF) | ((mm & 0xF) << 4);
                q[j - 4] |= (s >> 4) << 6;
                q[j] |= (mm >> 4) << 6;
            }
        }
        q
    }

    fn decode(kind: GgmlType, block: &[u8], n: usize) -> Vec<f32> {
        let mut y = vec![f32::NAN; n];
        dequantize(kind, block, &mut y).unwrap();
        y
    }

    #[test]
    fn q8_0_is_the_scale_times_each_int8() {
        let q: Vec<i8> = (0..32).map(|i| (i * 8 - 128) as i8).collect();
        let mut block = half_bytes(0.5).to_vec();
        block.extend(q.iter().map(|&v| v as u8));
        let y = decode(GgmlType::Q8_0, &block, 32);
        for (i, &v) in q.iter().enumerate() {
            assert_eq!(y[i], f32::from(v) * 0.5, "value {i}");
        }
    }

    /// Q4_K and Q5_K: value i of 256 belongs to sub-block i / 32 and holds
    /// q[i] (4 or 5 bits).
    fn k4_block(bits: u32, seed: u32) -> (Vec<u8>, Vec<f32>) {
        let (d, dmin) = (0.25f32, 0.125f32);
        let (sc, m, q) = (values(8, seed, 64), values(8, seed + 1, 64), values(256, seed + 2, 1 << bits));
        let mut block = [half_bytes(d), half_bytes(dmin)].concat();
        block.extend(pack_scales(&sc, &m));
        let (mut qh, mut qs) = (vec![0u8; 32], vec![0u8; 128]);
        for (i, &v) in q.iter().enumerate() {
            let (j, upper, l) = (i / 64, (i % 64) / 32, i % 32);
            qs[32 * j + l] |= ((v & 0xF) as u8) << (4 * upper);
            if v >= 16 {
                qh[l] |= 1 << (2 * j + upper);
            }
        }
        if bits == 5 {
            block.extend(qh);
        }
        block.extend(qs);
        let want = (0..256)
            .map(|i| {
                let s = i / 32;
                (d * sc[s] as f32) * q[i] as f32 - dmin * m[s] as f32
            })
            .collect();
        (block, want)
    }

    /// Q4_K, and Q5_K with its fifth bit from qh.
    #[test]
    fn q4_k_and_q5_k_values_use_their_own_sub_blocks_scale_and_min() {
        for (bits, kind, bytes) in [(4, GgmlType::Q4_K, 144), (5, GgmlType::Q5_K, 176)] {
            for seed in 0..8 {
                let (block, want) = k4_block(bits, seed);
                assert_eq!(block.len(), bytes);
                assert_eq!(decode(kind, &block, 256), want, "{} seed {seed}", kind.name());
            }
        }
    }

    /// MMQ's parts: scaled value less its sub-block's min is the decoded
    /// value where `d * sc` and `dmin * m` are f16 numbers (k4_block's
    /// scales), and each product is rounded to f16 where it is not.
    #[test]
    fn mmq_sub_blocks_split_each_value_into_its_scaled_part_and_its_sub_blocks_min() {
        for (bits, kind) in [(4, GgmlType::Q4_K), (5, GgmlType::Q5_K)] {
            let (block, want) = k4_block(bits, 3);
            let (mut scaled, mut mins) = (vec![0.0; 256], vec![0.0; 8]);
            mmq_sub_blocks(kind, &block, &mut scaled, &mut mins).unwrap();
            let got: Vec<f32> = (0..256).map(|i| scaled[i] - mins[i / 32]).collect();
            assert_eq!(got, want, "{}", kind.name());
        }
        let (mut block, _) = k4_block(4, 5);
        block[0..2].copy_from_slice(&half_bytes(0.1));
        let (mut scaled, mut mins) = (vec![0.0; 256], vec![0.0; 8]);
        mmq_sub_blocks(GgmlType::Q4_K, &block, &mut scaled, &mut mins).unwrap();
        let decoded = decode(GgmlType::Q4_K, &block, 256);
        let (sc, _) = scale_min_k4(0, &block[4..16]);
        let product = f16::from_f32(0.1).to_f32() * f32::from(sc);
        let i = (0..32).find(|&i| decoded[i] + mins[0] != 0.0).expect("a nonzero value in sub-block 0");
        let q = (decoded[i] + mins[0]) / product;
        assert_eq!(scaled[i], f16::from_f32(product).to_f32() * q.round());
        assert_ne!(f16::from_f32(product).to_f32(), product, "the test needs a product f16 cannot hold");
        let err = mmq_sub_blocks(GgmlType::Q6_K, &[0; 210], &mut scaled, &mut mins).unwrap_err();
        assert!(err.contains("Q6_K has no sub-block mins"), "{err}");
    }

    #[test]
    fn q6_k_values_are_six_bits_less_32_times_their_int8_scale() {
        for seed in 0..8 {
            let d = 0.0625f32;
            let (q, sc) = (values(256, seed, 64), values(16, seed + 9, 256));
            let (mut ql, mut qh) = (vec![0u8; 128], vec![0u8; 64]);
            for (i, &v) in q.iter().enumerate() {
                let (n, k, l) = (i / 128, (i % 128) / 32, i % 32);
                let byte = 64 * n + l + if k % 2 == 1 { 32 } else { 0 };
                ql[byte] |= ((v & 0xF) as u8) << (if k >= 2 { 4 } else { 0 });
                qh[32 * n + l] |= ((v >> 4) as u8) << (2 * k);
            }
            let block = [ql, qh, sc.iter().map(|&s| s as u8).collect(), half_bytes(d).to_vec()].concat();
            assert_eq!(block.len(), 210);
            let want: Vec<f32> = (0..256)
                .map(|i| {
                    let (n, k, l) = (i / 128, (i % 128) / 32, i % 32);
                    let s = sc[8 * n + 2 * k + l / 16] as u8 as i8;
                    d * f32::from(s) * (q[i] as i32 - 32) as f32
                })
                .collect();
            assert_eq!(decode(GgmlType::Q6_K, &block, 256), want, "seed {seed}");
        }
    }

    #[test]
    fn several_blocks_decode_in_order_and_bad_lengths_are_errors() {
        let (a, wa) = k4_block(4, 1);
        let (b, wb) = k4_block(4, 2);
        assert_eq!(decode(GgmlType::Q4_K, &[a.clone(), b].concat(), 512), [wa, wb].concat());
        let mut y = vec![0.0; 256];
        let err = dequantize(GgmlType::Q4_K, &a[..143], &mut y).unwrap_err();
        assert!(err.contains("143 bytes of Q4_K"), "{err}");
        let err = dequantize(GgmlType(10), &[0; 84], &mut y).unwrap_err();
        assert!(err.contains("Q2_K is not supported"), "{err}");
        let plain = [1.5f32.to_le_bytes(), (-2.0f32).to_le_bytes()].concat();
        assert_eq!(decode(GgmlType::F32, &plain, 2), [1.5, -2.0]);
        assert_eq!(decode(GgmlType::F16, &[half_bytes(0.75), half_bytes(-3.0)].concat(), 2), [0.75, -3.0]);
        assert_eq!(decode(GgmlType::BF16, &[0x80, 0x3f, 0x00, 0xc0], 2), [1.0, -2.0]);
    }
}
