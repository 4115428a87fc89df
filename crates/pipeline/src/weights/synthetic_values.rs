//! The counter-based generator every synthetic weight comes from: a value
//! is a pure function of the tensor's key (seed and name) and its index,
//! made from integer operations the CUDA backend repeats bit for bit.
//! synthetic.rs, synthetic_blocks.rs, synthetic_fp8.rs and
//! synthetic_mxfp4.rs draw from it.

/// splitmix64 finaliser.
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
    let h = mix(key.wrapping_add(index.wrapping_mul(0x9e37_79b9_7f4a_7c15)));
    let sum = (h & 0xffff) + ((h >> 16) & 0xffff) + ((h >> 32) & 0xffff) + (h >> 48);
    // Sum of four U{0..65535}: mean 131070, variance 4 * (65536² - 1) / 12.
    let centred = sum as i64 - 131_070;
    let scale = (std as f64 / (4.0 * (65536.0f64 * 65536.0 - 1.0) / 12.0).sqrt()) as f32;
    centred as f32 * scale + mean
}
