//! ggml's 32-value "legacy" block formats, decoded as llama.cpp's
//! `dequantize_row_q4_0` .. `_q5_1` (ggml-quants.c) compute them: an f16
//! scale `d` (and for the `_1` kinds an f16 offset `m`), 4-bit values in
//! 16 bytes (low nibbles the first 16 values, high nibbles the last 16),
//! and for the `5` kinds a fifth bit per value in a little-endian u32.
//! A real DeepSeek Q4_K_M GGUF holds them: llama-quantize falls Q4_K back
//! to Q5_0 (and Q5_K to Q5_1) where a row is not whole 256-value blocks,
//! as MLA's attn_k_b (128-value rows) is. Also MXFP4 (gpt-oss's experts):
//! an e8m0 exponent byte, then 32 e2m1 values in 16 bytes laid out as the
//! 4-bit kinds are ([`mxfp4`]; a Hugging Face checkpoint's layout is
//! repacked into it by [`repack_hf_mxfp4`]).

use half::f16;

fn half_at(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// Writes the 32 values of 4-bit `qs` with fifth bits `qh` (0 for none) as
/// `value(x)` of each unsigned 4- or 5-bit x.
fn nibbles(qs: &[u8], qh: u32, y: &mut [f32], value: impl Fn(i32) -> f32) {
    for j in 0..16 {
        let high0 = ((qh >> j) << 4) & 0x10;
        let high1 = (qh >> (j + 12)) & 0x10;
        y[j] = value((qs[j] & 0x0f) as i32 | high0 as i32);
        y[j + 16] = value((qs[j] >> 4) as i32 | high1 as i32);
    }
}

fn qh_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// block_q4_0: `d`, `qs[16]`; `y = (x - 8) * d`.
pub(super) fn q4_0(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    nibbles(&b[2..18], 0, y, |x| (x - 8) as f32 * d);
}

/// block_q4_1: `d`, `m`, `qs[16]`; `y = x * d + m`.
pub(super) fn q4_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (half_at(b, 0), half_at(b, 2));
    nibbles(&b[4..20], 0, y, |x| x as f32 * d + m);
}

/// block_q5_0: `d`, `qh` (u32), `qs[16]`; `y = (x - 16) * d`.
pub(super) fn q5_0(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    nibbles(&b[6..22], qh_at(b, 2), y, |x| (x - 16) as f32 * d);
}

/// block_q5_1: `d`, `m`, `qh` (u32), `qs[16]`; `y = x * d + m`.
pub(super) fn q5_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (half_at(b, 0), half_at(b, 2));
    nibbles(&b[8..24], qh_at(b, 4), y, |x| x as f32 * d + m);
}

/// llama.cpp's `kvalues_mxfp4`: the e2m1 values doubled (its scale is
/// halved to match).
const E2M1_DOUBLED: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

/// Bytes of one MXFP4 block: the exponent, then 16 bytes of values.
pub const MXFP4_BLOCK_BYTES: usize = 17;

/// block_mxfp4: `e` (e8m0), `qs[16]`; `y = kvalues[x] * 2^(e - 128)`
/// (`GGML_E8M0_TO_FP32_HALF`; e = 0 and 1 give the subnormal 2^-128 and
/// 2^-127). A code of -0 decodes to +0, as llama.cpp's does.
pub(super) fn mxfp4(b: &[u8], y: &mut [f32]) {
    let e = b[0];
    let d = f32::from_bits(if e < 2 { 0x0020_0000 << e } else { u32::from(e - 1) << 23 });
    for j in 0..16 {
        y[j] = f32::from(E2M1_DOUBLED[(b[1 + j] & 0x0f) as usize]) * d;
        y[j + 16] = f32::from(E2M1_DOUBLED[(b[1 + j] >> 4) as usize]) * d;
    }
}

/// One row of a Hugging Face MXFP4 tensor (`*_blocks`: 16 bytes per 32
/// values, value 2i in the low nibble of byte i and 2i + 1 in its high
/// nibble; `*_scales`: one e8m0 byte per 32 values) as MXFP4 blocks of
/// the GGUF layout (value j in the low nibble of byte j, value j + 16 in
/// its high nibble): the same codes, moved.
pub fn repack_hf_mxfp4(blocks: &[u8], scales: &[u8], out: &mut Vec<u8>) {
    for (block, &e) in blocks.chunks_exact(16).zip(scales) {
        let code = |i: usize| (block[i / 2] >> (4 * (i % 2))) & 0x0f;
        out.push(e);
        out.extend((0..16).map(|j| code(j) | (code(j + 16) << 4)));
    }
}

#[cfg(test)]
mod tests {
    use super::super::gguf::GgmlType;
    use super::super::quant::dequantize;

    // gguf-py 0.19's dequantize (llama.cpp's formulas) of one random block each.
    const LEGACY: [(GgmlType, &str, [f64; 32]); 4] = [
        (
            GgmlType(2),
            "4c22b8abeeab14cef599cc052535d5cec0ad",
            [
                0.0,
                0.036895751953125,
                0.07379150390625,
                0.036895751953125,
                -0.0491943359375,
                0.07379150390625,
                -0.036895751953125,
                0.012298583984375,
                0.0491943359375,
                -0.036895751953125,
                -0.036895751953125,
                -0.036895751953125,
                -0.036895751953125,
                0.07379150390625,
                -0.098388671875,
                0.061492919921875,
                0.036895751953125,
                0.02459716796875,
                0.07379150390625,
                0.02459716796875,
                -0.086090087890625,
                0.0491943359375,
                0.086090087890625,
                0.012298583984375,
                0.0491943359375,
                -0.098388671875,
                -0.07379150390625,
                -0.061492919921875,
                0.061492919921875,
                0.0491943359375,
                0.0491943359375,
                0.02459716796875,
            ],
        ),
        (
            GgmlType(3),
            "4c2200b8760457a17c472a49ed10c2fa0a67ce0d",
            [
                -0.42620849609375,
                -0.4508056640625,
                -0.413909912109375,
                -0.487701416015625,
                -0.3524169921875,
                -0.413909912109375,
                -0.37701416015625,
                -0.389312744140625,
                -0.340118408203125,
                -0.5,
                -0.47540283203125,
                -0.37701416015625,
                -0.37701416015625,
                -0.413909912109375,
                -0.32781982421875,
                -0.340118408203125,
                -0.413909912109375,
                -0.5,
                -0.438507080078125,
                -0.37701416015625,
                -0.413909912109375,
                -0.4508056640625,
                -0.47540283203125,
                -0.4508056640625,
                -0.32781982421875,
                -0.487701416015625,
                -0.3524169921875,
                -0.315521240234375,
                -0.5,
                -0.42620849609375,
                -0.3524169921875,
                -0.5,
            ],
        ),
        (
            GgmlType(6),
            "4c22264785762462c423399232b39168ce358d21b527",
            [
                -0.1475830078125,
                0.02459716796875,
                0.0491943359375,
                -0.159881591796875,
                -0.086090087890625,
                0.02459716796875,
                -0.17218017578125,
                -0.159881591796875,
                0.012298583984375,
                0.098388671875,
                0.17218017578125,
                -0.135284423828125,
                -0.036895751953125,
                -0.184478759765625,
                0.061492919921875,
                -0.110687255859375,
                0.02459716796875,
                -0.12298583984375,
                0.1475830078125,
                -0.17218017578125,
                -0.159881591796875,
                -0.086090087890625,
                -0.159881591796875,
                0.135284423828125,
                -0.086090087890625,
                0.07379150390625,
                0.1475830078125,
                -0.159881591796875,
                0.098388671875,
                0.02459716796875,
                0.135284423828125,
                -0.17218017578125,
            ],
        ),
        (
            GgmlType(7),
            "4c2200b8a5627b0c90b818268101caff5536e4307fa901a7",
            [
                -0.30322265625,
                -0.401611328125,
                -0.204833984375,
                -0.42620849609375,
                -0.487701416015625,
                -0.290924072265625,
                -0.37701416015625,
                -0.118743896484375,
                -0.438507080078125,
                -0.22943115234375,
                -0.4508056640625,
                -0.5,
                -0.315521240234375,
                -0.192535400390625,
                -0.290924072265625,
                -0.413909912109375,
                -0.192535400390625,
                -0.167938232421875,
                -0.487701416015625,
                -0.27862548828125,
                -0.204833984375,
                -0.30322265625,
                -0.1556396484375,
                -0.315521240234375,
                -0.438507080078125,
                -0.463104248046875,
                -0.13104248046875,
                -0.266326904296875,
                -0.413909912109375,
                -0.37701416015625,
                -0.5,
                -0.37701416015625,
            ],
        ),
    ];

    #[test]
    fn mxfp4_decodes_as_gguf_py_does_and_a_hf_row_repacks_to_the_same_values() {
        // gguf-py 0.19's dequantize of one random MXFP4 block (exponent 120).
        let hex = "7887ea6bdea6c8de200407f644da6c49be";
        let block: Vec<u8> =
            (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
        let want: [f64; 32] = [
            0.046875,
            -0.0078125,
            -0.01171875,
            -0.03125,
            0.03125,
            0.0,
            -0.03125,
            0.0,
            0.015625,
            0.046875,
            0.03125,
            0.015625,
            -0.0078125,
            -0.015625,
            -0.00390625,
            -0.03125,
            0.0,
            -0.03125,
            0.03125,
            -0.0234375,
            -0.0078125,
            -0.015625,
            -0.0234375,
            0.0078125,
            0.0,
            0.0,
            -0.046875,
            0.015625,
            -0.0234375,
            0.03125,
            0.015625,
            -0.01171875,
        ];
        let mut y = [0.0f32; 32];
        dequantize(GgmlType::MXFP4, &block, &mut y).unwrap();
        assert_eq!(y.map(f64::from), want);
        // The same codes as a Hugging Face row lays them (pairs per byte)
        // and transformers' formula: FP4_VALUES[code] * 2^(scale - 127).
        const FP4: [f32; 16] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0];
        let codes: Vec<u8> = (0..32).map(|i| if i < 16 { block[1 + i] & 15 } else { block[i - 15] >> 4 }).collect();
        let hf: Vec<u8> = codes.chunks(2).map(|p| p[0] | (p[1] << 4)).collect();
        let mut repacked = Vec::new();
        super::super::quant_legacy::repack_hf_mxfp4(&hf, &[block[0]], &mut repacked);
        assert_eq!(repacked, block);
        let transformers: Vec<f32> =
            codes.iter().map(|&c| FP4[c as usize] * 2f32.powi(block[0] as i32 - 127)).collect();
        assert_eq!(y.to_vec(), transformers);
    }

    #[test]
    fn legacy_blocks_decode_as_gguf_py_does_bit_for_bit() {
        for (kind, hex, want) in LEGACY {
            let bytes: Vec<u8> =
                (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
            let mut y = [0.0f32; 32];
            dequantize(kind, &bytes, &mut y).unwrap();
            // Exact dyadic values: as f64 they are the f32s gguf-py printed.
            assert_eq!(y.map(f64::from), want, "{}", kind.name());
        }
    }
}
