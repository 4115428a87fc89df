//! The counter-based generator every synthetic weight comes from: a value
//! is a pure function of the tensor's key (seed and name) and its index,
//! made from integer operations the CUDA backend repeats bit for bit.
//! synthetic.rs, synthetic_blocks.rs, synthetic_fp8.rs and
//! synthetic_mxfp4.rs draw from it.

/// splitmix64 finaliser.
#[inline]
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The per-tensor key: FNV-1a of the name, mixed with the seed.
pub fn tensor_key(seed: u64, name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(h ^ mix(seed))
}

/// Element `index` of the tensor with key `key`: mean + std * z where z is
/// the standardised sum of four 16-bit uniforms from
/// `mix(key + index * golden)`. Only integer operations, one f32 multiply and
/// one f32 add (no FMA), so a GPU kernel can reproduce it bit for bit.
pub fn synthetic_value(key: u64, index: u64, mean: f32, std: f32) -> f32 {
    synthetic_value_scaled(key, index, mean, synthetic_scale(std))
}

/// The f32 factor [`synthetic_value`] multiplies the centred sum by for a
/// standard deviation of `std` (computed once per tensor by callers that
/// make many values). kernels-cuda's `synthetic::synthetic_scale` is the
/// device side's copy (that crate cannot depend on this one); the GPU test
/// gpu_synthetic holds the two generators to the same bits.
pub fn synthetic_scale(std: f32) -> f32 {
    // Sum of four U{0..65535}: mean 131070, variance 4 * (65536² - 1) / 12.
    (std as f64 / (4.0 * (65536.0f64 * 65536.0 - 1.0) / 12.0).sqrt()) as f32
}

/// [`synthetic_value`] with its scale already computed
/// ([`synthetic_scale`]): the same bits.
#[inline]
pub fn synthetic_value_scaled(key: u64, index: u64, mean: f32, scale: f32) -> f32 {
    value_of_mixed(mix(key.wrapping_add(index.wrapping_mul(GOLDEN))), mean, scale)
}

/// The 64-bit golden ratio that strides the generator's counter.
const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// The value of an element whose counter mixed to `h`.
#[inline]
fn value_of_mixed(h: u64, mean: f32, scale: f32) -> f32 {
    // The four 16-bit fields summed two by two (each pair's sum fits its
    // 32-bit half), then the halves; at most 4 * 65535, so the centred
    // sum converts to f32 exactly from 32 bits. Wrapping operations that
    // cannot wrap: a build with overflow checks (the test profile) still
    // vectorises the generator's loop.
    const FIELDS: u64 = 0x0000_ffff_0000_ffff;
    let pairs = (h & FIELDS).wrapping_add((h >> 16) & FIELDS);
    let sum = (pairs as u32).wrapping_add((pairs >> 32) as u32);
    let centred = (sum as i32).wrapping_sub(131_070);
    centred as f32 * scale + mean
}

/// Fills `out` (little-endian bf16, two bytes a value) with elements
/// `first..` of the tensor with key `key`: `bf16(synthetic_value(..))`,
/// rounded to nearest even (values are always finite).
pub fn fill_bf16(key: u64, first: u64, mean: f32, scale: f32, out: &mut [u8]) {
    let (pairs, _) = out.as_chunks_mut::<2>();
    fill(key, first, mean, scale, pairs, |o: &mut [u8; 2], bits| *o = bits.to_le_bytes());
}

/// Elements `first..` of the tensor with key `key` as f32: the bf16
/// values [`fill_bf16`] stores, widened (how the host reads a tensor that
/// is computed where it is read).
pub fn fill_f32_of_bf16(key: u64, first: u64, mean: f32, scale: f32, out: &mut [f32]) {
    fill(key, first, mean, scale, out, |o: &mut f32, bits| *o = f32::from_bits((bits as u32) << 16));
}

/// `put(out[j], bf16 bits of element first + j)` for every j. Where the
/// CPU has AVX-512 DQ or AVX2 the same loop is compiled for it and
/// vectorised (the 64-bit multiplies of [`mix`] are what a portable build
/// leaves scalar); integer arithmetic and one f32 multiply and add per
/// value give the same bits on every path.
fn fill<T, F: Fn(&mut T, u16) + Copy>(key: u64, first: u64, mean: f32, scale: f32, out: &mut [T], put: F) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512dq") {
            // SAFETY: the CPU has AVX-512 F and DQ (checked above).
            return unsafe { fill_avx512(key, first, mean, scale, out, put) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked above).
            return unsafe { fill_avx2(key, first, mean, scale, out, put) };
        }
    }
    fill_portable(key, first, mean, scale, out, put)
}

#[inline(always)]
fn fill_portable<T, F: Fn(&mut T, u16)>(key: u64, first: u64, mean: f32, scale: f32, out: &mut [T], put: F) {
    // `key + index * golden` as a running sum (the same wrapping value):
    // the vectorised loop then adds instead of multiplying, a third of
    // its 64-bit multiplies.
    let mut z = key.wrapping_add(first.wrapping_mul(GOLDEN));
    for o in out.iter_mut() {
        let bits = value_of_mixed(mix(z), mean, scale).to_bits();
        z = z.wrapping_add(GOLDEN);
        // Round to nearest even; no NaN can occur, so no sum wraps (the
        // wrapping forms keep the loop vectorised under overflow checks).
        put(o, (bits.wrapping_add(0x7fff).wrapping_add((bits >> 16) & 1) >> 16) as u16);
    }
}

/// # Safety
/// The CPU must support AVX-512 F and DQ.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq")]
unsafe fn fill_avx512<T, F: Fn(&mut T, u16)>(key: u64, first: u64, mean: f32, scale: f32, out: &mut [T], put: F) {
    fill_portable(key, first, mean, scale, out, put)
}

/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn fill_avx2<T, F: Fn(&mut T, u16)>(key: u64, first: u64, mean: f32, scale: f32, out: &mut [T], put: F) {
    fill_portable(key, first, mean, scale, out, put)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_is_the_centred_sum_of_the_four_fields_of_its_mix() {
        // The generator's definition, written out the long way.
        let long = |h: u64, mean: f32, scale: f32| {
            let sum = (h & 0xffff) + ((h >> 16) & 0xffff) + ((h >> 32) & 0xffff) + (h >> 48);
            (sum as i64 - 131_070) as f32 * scale + mean
        };
        let scale = synthetic_scale(0.02);
        let mut h = 0x0123_4567_89ab_cdefu64;
        for _ in 0..100_000 {
            h = mix(h);
            assert_eq!(value_of_mixed(h, 0.5, scale).to_bits(), long(h, 0.5, scale).to_bits(), "{h:#x}");
        }
        for h in [0, u64::MAX, 0xffff, 0xffff_0000_0000_0000, 0x8000_8000_8000_8000] {
            assert_eq!(value_of_mixed(h, -1.0, scale).to_bits(), long(h, -1.0, scale).to_bits(), "{h:#x}");
        }
    }

    #[test]
    fn fills_are_half_s_rounding_of_each_value_on_every_path() {
        for (key, mean, std) in [(tensor_key(7, "w"), 0.0, 0.02), (tensor_key(3, "norm"), 1.0, 0.5), (1, -2.0, 30.0)] {
            let scale = synthetic_scale(std);
            let mut fast = vec![0u8; 2 * 1001];
            fill_bf16(key, 12_345, mean, scale, &mut fast);
            let mut portable = vec![[0u8; 2]; 1001];
            fill_portable(key, 12_345, mean, scale, &mut portable, |o: &mut [u8; 2], bits| *o = bits.to_le_bytes());
            let portable: Vec<u8> = portable.concat();
            let mut wide = vec![0f32; 1001];
            fill_f32_of_bf16(key, 12_345, mean, scale, &mut wide);
            let wide: Vec<u8> = wide.iter().flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes()).collect();
            let want: Vec<u8> = (0..1001u64)
                .flat_map(|i| half::bf16::from_f32(synthetic_value(key, 12_345 + i, mean, std)).to_bits().to_le_bytes())
                .collect();
            assert_eq!(wide, want);
            assert_eq!(fast, want);
            assert_eq!(portable, want);
        }
    }
}
