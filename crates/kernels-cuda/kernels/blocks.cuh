// blocks.cuh: ggml's block formats (Q8_0, MXFP4, Q4_K, Q5_K, Q6_K) and rows of
// block-scaled FP8 (MT_FP8_B128) decoded on the device, each value bit for
// bit as pipeline::weights decodes it on the host: the same f16 scales, the same f32 products and differences,
// rounded one operation at a time (__fmul_rn / __fsub_rn: no FMA). Shared
// by the quant family (decoding, decode-step projections) and the moe
// family (the prompt's grouped expert projection over quantized experts).
#pragma once
#include "common.cuh"

#define GGML_Q8_0 8u
#define GGML_Q4_K 12u
#define GGML_Q5_K 13u
#define GGML_Q6_K 14u
// gpt-oss's experts: an e8m0 exponent byte, then 32 e2m1 codes in 16
// bytes (value j in the low nibble of byte j, value j + 16 in its high
// nibble); a value is llama.cpp's kvalues_mxfp4[code] (the e2m1 value
// doubled) times 2^(e - 128), one exact multiply.
#define GGML_MXFP4 39u
// Not a ggml type: moetrace's row block of FP8 weights (DeepSeek-V3's and
// Qwen3-FP8's block-scaled e4m3): the f32 scale of the 128 x 128 block the
// row's 128 values belong to, then the 128 e4m3 bytes. A value decodes
// as DeepSeek's weight_dequant computes it: f32(q) * scale, one multiply.
#define MT_FP8_B128 200u

// e4m3 (float8_e4m3fn: bias 7, 3 mantissa bits, no infinities, S.1111.111
// NaN) as f32, exactly (pipeline::weights::fp8::e4m3_to_f32).
__device__ __forceinline__ float e4m3_to_f32(u32 b) {
    u32 sign = (b & 0x80u) << 24, exp = (b >> 3) & 0xfu, man = b & 7u;
    if (exp == 0xfu && man == 7u) return QUIET_NAN;
    u32 mag = exp == 0 ? __float_as_uint((float)man * 0.001953125f) : ((exp + 120u) << 23) | (man << 20);
    return __uint_as_float(sign | mag);
}

// IEEE half bits to f32, exactly (subnormals; a NaN keeps its payload with
// the quiet bit set, as the half crate converts it). Without branches, so
// the compiler can overlap the loads of several blocks: a finite half's
// magnitude bits shifted into an f32's place are that value times 2^-112
// (a subnormal half becomes an f32 subnormal), which one exact multiply
// by 2^112 restores.
__device__ __forceinline__ float f16_bits_to_f32(u16 h) {
    u32 sign = ((u32)h & 0x8000u) << 16, mag = ((u32)h & 0x7fffu) << 13;
    u32 finite = __float_as_uint(__fmul_rn(__uint_as_float(mag), 5.192296858534828e33f)); // 2^112
    u32 special = 0x7f800000u | mag | ((mag & 0x7fe000u) ? 0x400000u : 0u);
    return __uint_as_float(sign | (mag >= 0x0f800000u ? special : finite));
}

__device__ __forceinline__ float f16_at(const unsigned char *b, u32 at) {
    return f16_bits_to_f32((u16)((u32)b[at] | ((u32)b[at + 1] << 8)));
}

// e8m0 exponent e as llama.cpp's GGML_E8M0_TO_FP32_HALF: 2^(e - 128)
// (e 0 and 1 the subnormals 2^-128 and 2^-127).
__device__ __forceinline__ float e8m0_half(u32 e) {
    return __uint_as_float(e < 2u ? 0x00200000u << e : (e - 1u) << 23);
}

// An MXFP4 code (sign bit 3, e2m1 magnitude) as llama.cpp's doubled
// kvalues_mxfp4 {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, ...}: the magnitude from
// a table packed in nibbles, no branch; 0 - mag for the negative codes (a
// negative zero code gives +0, as llama.cpp's int table does).
__device__ __forceinline__ float mxfp4_value(u32 code) {
    float mag = (float)((0xC8643210u >> (4u * (code & 7u))) & 0xfu);
    return (code & 8u) ? __fsub_rn(0.0f, mag) : mag;
}

// The 6-bit scale and min of sub-block j (0..8) of a Q4_K/Q5_K block.
__device__ __forceinline__ void scale_min_k4(u32 j, const unsigned char *q, u32 *sc, u32 *m) {
    if (j < 4) {
        *sc = q[j] & 63u;
        *m = q[j + 4] & 63u;
    } else {
        *sc = (q[j + 4] & 0xfu) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

// Value j of the block of `kind` at b.
__device__ float dequant_value(u32 kind, const unsigned char *b, u32 j) {
    if (kind == MT_FP8_B128) return __fmul_rn(e4m3_to_f32(b[4 + j]), __uint_as_float(*(const u32 *)b));
    if (kind == GGML_Q8_0) return __fmul_rn((float)(signed char)b[2 + j], f16_at(b, 0));
    if (kind == GGML_MXFP4) {
        u32 code = j < 16u ? (b[1 + j] & 0xfu) : (b[1 + j - 16] >> 4);
        return __fmul_rn(mxfp4_value(code), e8m0_half(b[0]));
    }
    if (kind == GGML_Q4_K || kind == GGML_Q5_K) {
        // 64 values per pair of sub-blocks: the low nibbles of 32 bytes,
        // then their high nibbles; Q5_K adds a fifth bit from qh.
        u32 pair = j / 64, l = j % 64, high = l >= 32, byte = l % 32;
        const unsigned char *qs = b + (kind == GGML_Q4_K ? 16 : 48) + 32 * pair;
        u32 q = high ? (qs[byte] >> 4) : (qs[byte] & 0xfu);
        if (kind == GGML_Q5_K && (b[16 + byte] & ((high ? 2u : 1u) << (2 * pair)))) q += 16;
        u32 sc, m;
        scale_min_k4(2 * pair + high, b + 4, &sc, &m);
        float d = __fmul_rn(f16_at(b, 0), (float)sc), min = __fmul_rn(f16_at(b, 2), (float)m);
        return __fsub_rn(__fmul_rn(d, (float)q), min);
    }
    if (kind == GGML_Q6_K) {
        // Two halves of 128; in each, four groups of 32 with 4 low bits
        // from ql and 2 high bits from qh, a signed 8-bit scale per 16.
        u32 n = j / 128, r = j % 128, k = r / 32, l = r % 32;
        const unsigned char *ql = b + 64 * n, *qh = b + 128 + 32 * n, *sc = b + 192 + 8 * n;
        u32 low = (k & 1) ? ql[l + 32] : ql[l];
        low = (k & 2) ? (low >> 4) : (low & 0xfu);
        int q = (int)(low | (((qh[l] >> (2 * k)) & 3u) << 4)) - 32;
        return __fmul_rn(__fmul_rn(f16_at(b, 208), (float)(signed char)sc[l / 16 + 2 * k]), (float)q);
    }
    return QUIET_NAN;
}

// ---- Eight values at a time, the block type known at compile time ----
//
// The same operations as dequant_value on each value, so the same bits;
// what changes is how the bytes are fetched (words, not bytes), that the
// eight quants are assembled four to a word (one shift and mask for four),
// and how a quant becomes a float: a byte permute puts it under the
// exponent of 2^23 and one exact subtraction removes that (and the type's
// bias), instead of the quarter-rate I2F conversion.

// Eight bytes at p: two aligned loads of four when p is 8-byte aligned
// (Q4_K and Q5_K blocks are 144 and 176 bytes, so every quant group of a
// block at a 16-byte boundary is), else four loads of two (Q6_K and Q8_0
// blocks are 210 and 34 bytes: only even offsets).
template <bool ALIGNED8>
__device__ __forceinline__ uint2 load8(const unsigned char *p) {
    if (ALIGNED8) return *(const uint2 *)p;
    const u16 *h = (const u16 *)p;
    uint2 v;
    v.x = (u32)h[0] | ((u32)h[1] << 16);
    v.y = (u32)h[2] | ((u32)h[3] << 16);
    return v;
}

// Byte i (0..8, known at compile time after unrolling) of the eight bytes
// q as the float (byte - BIAS), exactly: 2^23 + byte and 2^23 + BIAS are
// exact floats and so is their difference (Sterbenz).
template <u32 BIAS>
__device__ __forceinline__ float quant_value(uint2 q, u32 i) {
    u32 word = i < 4 ? q.x : q.y;
    // Result bytes: byte i of word, 0, 0, 0x4B (from 0x4B000000).
    float biased = __uint_as_float(__byte_perm(word, 0x4B000000u, (i & 3u) | 0x7440u));
    return __fsub_rn(biased, __uint_as_float(0x4B000000u | BIAS));
}

template <u32 KIND> struct BlockOf;
template <> struct BlockOf<GGML_Q8_0> { static const u32 len = 32, bytes = 34; };
template <> struct BlockOf<GGML_MXFP4> { static const u32 len = 32, bytes = 17; };
template <> struct BlockOf<GGML_Q4_K> { static const u32 len = 256, bytes = 144; };
template <> struct BlockOf<GGML_Q5_K> { static const u32 len = 256, bytes = 176; };
template <> struct BlockOf<GGML_Q6_K> { static const u32 len = 256, bytes = 210; };
template <> struct BlockOf<MT_FP8_B128> { static const u32 len = 128, bytes = 132; };

// The bytes of a block that its values j0..j0+7 need, loaded (raw_of)
// apart from their decoding (decode_raw), so a kernel can issue the loads
// of several groups before it decodes the first. Per type: Q8_0 and Q6_K
// keep the f16 scale in head and Q6_K its 8-bit scale in s0; Q4_K and
// Q5_K keep d and dmin in head, the 12 packed scale bytes in s0..s2; q
// holds the eight quants' bytes (Q6_K's low bits), qh the high bits.
struct Raw8 {
    u32 head, s0, s1, s2;
    uint2 q, qh;
};

template <u32 KIND>
__device__ __forceinline__ Raw8 raw_of(const unsigned char *b, u32 j0) {
    Raw8 r;
    if (KIND == MT_FP8_B128) {
        r.head = *(const u32 *)b;
        r.q = load8<false>(b + 4 + j0);
    } else if (KIND == GGML_Q8_0) {
        r.head = *(const u16 *)b;
        r.q = load8<false>(b + 2 + j0);
    } else if (KIND == GGML_MXFP4) {
        // 17-byte blocks: any alignment, so byte loads.
        const unsigned char *p = b + 1 + (j0 % 16u);
        r.head = b[0];
        r.q.x = (u32)p[0] | ((u32)p[1] << 8) | ((u32)p[2] << 16) | ((u32)p[3] << 24);
        r.q.y = (u32)p[4] | ((u32)p[5] << 8) | ((u32)p[6] << 16) | ((u32)p[7] << 24);
    } else if (KIND == GGML_Q4_K || KIND == GGML_Q5_K) {
        u32 pair = j0 / 64, byte = j0 % 32;
        r.head = *(const u32 *)b;
        r.s0 = *(const u32 *)(b + 4);
        r.s1 = *(const u32 *)(b + 8);
        r.s2 = *(const u32 *)(b + 12);
        r.q = load8<true>(b + (KIND == GGML_Q4_K ? 16 : 48) + 32 * pair + byte);
        if (KIND == GGML_Q5_K) r.qh = load8<true>(b + 16 + byte);
    } else {
        u32 n = j0 / 128, k = (j0 % 128) / 32, l = j0 % 32;
        r.head = *(const u16 *)(b + 208);
        r.s0 = (u32)(int)(signed char)b[192 + 8 * n + l / 16 + 2 * k];
        r.q = load8<false>(b + 64 * n + ((k & 1) ? 32 : 0) + l);
        r.qh = load8<false>(b + 128 + 32 * n + l);
    }
    return r;
}

// Values j0..j0+7 (j0 % 8 == 0) of a block of type KIND, from its bytes r
// (raw_of), into w.
template <u32 KIND>
__device__ __forceinline__ void decode_raw(Raw8 r, u32 j0, float *w) {
    uint2 q = r.q;
    if (KIND == MT_FP8_B128) {
        float scale = __uint_as_float(r.head);
#pragma unroll
        for (u32 i = 0; i < 8; i++) w[i] = __fmul_rn(e4m3_to_f32(((i < 4 ? q.x : q.y) >> (8 * (i & 3))) & 0xffu), scale);
    } else if (KIND == GGML_Q8_0) {
        float d = f16_bits_to_f32((u16)r.head);
        q.x ^= 0x80808080u; // signed bytes + 128
        q.y ^= 0x80808080u;
#pragma unroll
        for (u32 i = 0; i < 8; i++) w[i] = __fmul_rn(quant_value<128>(q, i), d);
    } else if (KIND == GGML_MXFP4) {
        float d = e8m0_half(r.head);
        u32 shift = j0 >= 16u ? 4u : 0u;
#pragma unroll
        for (u32 i = 0; i < 8; i++) w[i] = __fmul_rn(mxfp4_value(((i < 4 ? q.x : q.y) >> (8 * (i & 3) + shift)) & 0xfu), d);
    } else if (KIND == GGML_Q4_K || KIND == GGML_Q5_K) {
        // 64 values per pair of sub-blocks: the low nibbles of 32 bytes,
        // then their high nibbles; Q5_K adds a fifth bit from qh.
        u32 pair = j0 / 64, high = (j0 % 64) >= 32;
        // scale_min_k4 of sub-block 2 * pair + high from the three words.
        u32 j = 2 * pair + high, sc, m;
        if (j < 4) {
            sc = (r.s0 >> (8 * j)) & 63u;
            m = (r.s1 >> (8 * j)) & 63u;
        } else {
            u32 sh = 8 * (j - 4), lo = (r.s2 >> sh) & 0xffu;
            sc = (lo & 0xfu) | (((r.s0 >> sh) >> 6 & 3u) << 4);
            m = (lo >> 4) | (((r.s1 >> sh) >> 6 & 3u) << 4);
        }
        float d = __fmul_rn(f16_bits_to_f32((u16)r.head), (float)sc);
        float min = __fmul_rn(f16_bits_to_f32((u16)(r.head >> 16)), (float)m);
        u32 shift = high ? 4 : 0;
        q.x = (q.x >> shift) & 0x0f0f0f0fu;
        q.y = (q.y >> shift) & 0x0f0f0f0fu;
        if (KIND == GGML_Q5_K) {
            u32 bit = 2 * pair + high;
            q.x |= ((r.qh.x >> bit) & 0x01010101u) << 4;
            q.y |= ((r.qh.y >> bit) & 0x01010101u) << 4;
        }
#pragma unroll
        for (u32 i = 0; i < 8; i++) w[i] = __fsub_rn(__fmul_rn(d, quant_value<0>(q, i)), min);
    } else {
        // Q6_K: two halves of 128; in each, four groups of 32 with 4 low
        // bits from ql and 2 high bits from qh, a signed 8-bit scale per 16.
        u32 k = (j0 % 128) / 32;
        float s = __fmul_rn(f16_bits_to_f32((u16)r.head), (float)(int)r.s0);
        u32 shift = (k & 2) ? 4 : 0;
        q.x = ((q.x >> shift) & 0x0f0f0f0fu) | (((r.qh.x >> (2 * k)) & 0x03030303u) << 4);
        q.y = ((q.y >> shift) & 0x0f0f0f0fu) | (((r.qh.y >> (2 * k)) & 0x03030303u) << 4);
#pragma unroll
        for (u32 i = 0; i < 8; i++) w[i] = __fmul_rn(s, quant_value<32>(q, i));
    }
}

// Values j0..j0+7 (j0 % 8 == 0) of the block of type KIND at b into w.
template <u32 KIND>
__device__ __forceinline__ void dequant8(const unsigned char *b, u32 j0, float *w) {
    decode_raw<KIND>(raw_of<KIND>(b, j0), j0, w);
}

// dequant8 for a block type chosen at run time (uniform across a launch).
#define DISPATCH_KIND(kind, CALL)                     \
    switch (kind) {                                   \
    case GGML_Q8_0: { const u32 K = GGML_Q8_0; CALL; } break; \
    case GGML_MXFP4: { const u32 K = GGML_MXFP4; CALL; } break; \
    case GGML_Q4_K: { const u32 K = GGML_Q4_K; CALL; } break; \
    case GGML_Q5_K: { const u32 K = GGML_Q5_K; CALL; } break; \
    case GGML_Q6_K: { const u32 K = GGML_Q6_K; CALL; } break; \
    case MT_FP8_B128: { const u32 K = MT_FP8_B128; CALL; } break; \
    }

// DISPATCH_KIND without MXFP4, for the grouped tensor-core kernel (moe.cu),
// whose registers are tight: gpt-oss's MXFP4 experts take the warp-per-
// output path instead (the CUDA backend's moe.rs routes them there).
#define DISPATCH_KIND_TILES(kind, CALL)               \
    switch (kind) {                                   \
    case GGML_Q8_0: { const u32 K = GGML_Q8_0; CALL; } break; \
    case GGML_Q4_K: { const u32 K = GGML_Q4_K; CALL; } break; \
    case GGML_Q5_K: { const u32 K = GGML_Q5_K; CALL; } break; \
    case GGML_Q6_K: { const u32 K = GGML_Q6_K; CALL; } break; \
    case MT_FP8_B128: { const u32 K = MT_FP8_B128; CALL; } break; \
    }

// The block of type KIND holding value j of the row of blocks at `row`.
template <u32 KIND>
__device__ __forceinline__ const unsigned char *block_at(const unsigned char *row, u32 j) {
    return row + (u64)(j / BlockOf<KIND>::len) * BlockOf<KIND>::bytes;
}
