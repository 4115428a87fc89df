// quant.cu: ggml's block formats (Q8_0, Q4_K, Q5_K, Q6_K) decoded on the
// device, each value bit for bit as pipeline::weights::quant decodes it on
// the host: the same f16 scales, the same f32 products and differences,
// rounded one operation at a time (__fmul_rn / __fsub_rn: no FMA).
#include "common.cuh"

#define GGML_Q8_0 8u
#define GGML_Q4_K 12u
#define GGML_Q5_K 13u
#define GGML_Q6_K 14u

// IEEE half bits to f32, exactly (subnormals; a NaN keeps its payload with
// the quiet bit set, as the half crate converts it).
__device__ __forceinline__ float f16_bits_to_f32(u16 h) {
    u32 sign = ((u32)h & 0x8000u) << 16, exp = ((u32)h >> 10) & 0x1fu, mant = (u32)h & 0x3ffu;
    if (exp == 0) {
        float v = (float)mant * 5.9604644775390625e-8f; // mant * 2^-24, exact
        return __uint_as_float(__float_as_uint(v) | sign);
    }
    if (exp == 31) return __uint_as_float(sign | (mant ? 0x7fc00000u : 0x7f800000u) | (mant << 13));
    return __uint_as_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

__device__ __forceinline__ float f16_at(const unsigned char *b, u32 at) {
    return f16_bits_to_f32((u16)((u32)b[at] | ((u32)b[at + 1] << 8)));
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
    if (kind == GGML_Q8_0) return __fmul_rn((float)(signed char)b[2 + j], f16_at(b, 0));
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

// Values j0..j0+7 (j0 % 8 == 0) of the block of `kind` at b into w, each
// exactly as dequant_value gives it (the same operations in the same
// order), the sub-block's scale and minimum decoded once for the eight.
__device__ __forceinline__ void dequant8(u32 kind, const unsigned char *b, u32 j0, float *w) {
    if (kind == GGML_Q8_0) {
        float d = f16_at(b, 0);
#pragma unroll
        for (u32 i = 0; i < 8; i++) w[i] = __fmul_rn((float)(signed char)b[2 + j0 + i], d);
        return;
    }
    if (kind == GGML_Q4_K || kind == GGML_Q5_K) {
        u32 pair = j0 / 64, l = j0 % 64, high = l >= 32, byte = l % 32;
        const unsigned char *qs = b + (kind == GGML_Q4_K ? 16 : 48) + 32 * pair + byte;
        u32 sc, m;
        scale_min_k4(2 * pair + high, b + 4, &sc, &m);
        float d = __fmul_rn(f16_at(b, 0), (float)sc), min = __fmul_rn(f16_at(b, 2), (float)m);
        u32 bit = (high ? 2u : 1u) << (2 * pair);
#pragma unroll
        for (u32 i = 0; i < 8; i++) {
            u32 q = high ? (qs[i] >> 4) : (qs[i] & 0xfu);
            if (kind == GGML_Q5_K && (b[16 + byte + i] & bit)) q += 16;
            w[i] = __fsub_rn(__fmul_rn(d, (float)q), min);
        }
        return;
    }
    if (kind == GGML_Q6_K) {
        u32 n = j0 / 128, r = j0 % 128, k = r / 32, l = r % 32;
        const unsigned char *ql = b + 64 * n + ((k & 1) ? 32 : 0) + l, *qh = b + 128 + 32 * n + l;
        float s = __fmul_rn(f16_at(b, 208), (float)(signed char)b[192 + 8 * n + l / 16 + 2 * k]);
#pragma unroll
        for (u32 i = 0; i < 8; i++) {
            u32 low = (k & 2) ? (ql[i] >> 4) : (ql[i] & 0xfu);
            int q = (int)(low | (((qh[i] >> (2 * k)) & 3u) << 4)) - 32;
            w[i] = __fmul_rn(s, (float)q);
        }
        return;
    }
#pragma unroll
    for (u32 i = 0; i < 8; i++) w[i] = QUIET_NAN;
}

// out[i] = value i of n values stored as consecutive blocks of `kind`
// (block_len values in block_bytes bytes each; n a multiple of 8): each
// thread decodes eight consecutive values.
extern "C" __global__ void dequant_f32(float *out, const unsigned char *blocks, u32 kind, u32 block_len, u32 block_bytes, u64 n) {
    PDL_ENTRY();
    u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 c = (u64)blockIdx.x * blockDim.x + threadIdx.x; 8 * c < n; c += stride) {
        u64 i = 8 * c;
        float w[8];
        dequant8(kind, blocks + (i / block_len) * block_bytes, (u32)(i % block_len), w);
#pragma unroll
        for (u32 v = 0; v < 8; v++) out[i + v] = w[v];
    }
}

// The same values as bf16 bits (rounded to nearest even, as the host's
// half::bf16::from_f32).
extern "C" __global__ void dequant_bf16(u16 *out, const unsigned char *blocks, u32 kind, u32 block_len, u32 block_bytes, u64 n) {
    PDL_ENTRY();
    u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 c = (u64)blockIdx.x * blockDim.x + threadIdx.x; 8 * c < n; c += stride) {
        u64 i = 8 * c;
        float w[8];
        dequant8(kind, blocks + (i / block_len) * block_bytes, (u32)(i % block_len), w);
#pragma unroll
        for (u32 v = 0; v < 8; v++) out[i + v] = f32_to_bf16_bits(w[v]);
    }
}

// ---- Projections over weights kept quantized on the device ----
//
// A quantized weight matrix [n, k] is n rows of k / block_len consecutive
// blocks (as a GGUF file stores it; k is a multiple of block_len). Each
// weight value is decoded where it is used, exactly as above, and in Bf16
// mode rounded to bf16 as the weights decoded at upload are, so these
// kernels multiply by the same weights as the decoded path (accumulation
// in f32, as everywhere).

// Values j..j+7 (j % 8 == 0, j < k) of the row of blocks at `row`.
__device__ __forceinline__ void weights8(u32 kind, const unsigned char *row, u32 j, u32 block_len, u32 block_bytes, float *w) {
    dequant8(kind, row + (u64)(j / block_len) * block_bytes, j % block_len, w);
#if ROUND_BF16
#pragma unroll
    for (u32 i = 0; i < 8; i++) w[i] = bf16_bits_to_f32(f32_to_bf16_bits(w[i]));
#endif
}

// acc + w · x[0..8], in order (x 32-byte aligned).
__device__ __forceinline__ float dot8f(float acc, const float *w, const float *x) {
    float4 a = ((const float4 *)x)[0], b = ((const float4 *)x)[1];
    acc += a.x * w[0];
    acc += a.y * w[1];
    acc += a.z * w[2];
    acc += a.w * w[3];
    acc += b.x * w[4];
    acc += b.y * w[5];
    acc += b.z * w[6];
    acc += b.w * w[7];
    return acc;
}

// Dense projection of a few rows (decode): out[t * out_stride + col + n] =
// row(n) · x[t] for n < n_rows, t < t_len <= 8. One warp per output row
// reads its blocks once for all rows of x. raw = 1 stores the f32 sum as
// is (router logits), raw = 0 as an activation (store_act).
extern "C" __global__ void gemv_quant(float *out, const float *x, const unsigned char *w, u32 kind, u32 block_len, u32 block_bytes, u32 n_rows, u32 t_len, u32 k, u32 out_stride, u32 col, u32 raw) {
    PDL_ENTRY();
    u64 n = ((u64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (n >= n_rows) return; // uniform across the warp
    u32 lane = threadIdx.x & 31;
    const unsigned char *row = w + n * (u64)(k / block_len) * block_bytes;
    float acc[8];
#pragma unroll
    for (int t = 0; t < 8; t++) acc[t] = 0.0f;
    // Each lane eight consecutive values at a time (one scale decode).
    for (u32 j = 8 * lane; j < k; j += 256) {
        float wv[8];
        weights8(kind, row, j, block_len, block_bytes, wv);
#pragma unroll
        for (u32 t = 0; t < 8; t++)
            if (t < t_len) acc[t] = dot8f(acc[t], wv, x + (u64)t * k + j);
    }
#pragma unroll
    for (u32 t = 0; t < 8; t++) {
        if (t >= t_len) break;
        float v = acc[t];
        for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
        if (lane == 0) out[(u64)t * out_stride + col + n] = raw ? v : store_act(v);
    }
}

// Per-expert projection over quantized experts stacked [E, n_out, k] (each
// expert's rows after the previous expert's): out[t, j, n] =
// W[ids[t, j]][n] · x, x = input[t] (per_slot = 0) or input[t, j]
// (per_slot = 1). One warp per output element; an id outside 0..experts
// writes NaN (never reads out of bounds).
extern "C" __global__ void expert_linear_quant(float *out, const float *x, const int *ids, const unsigned char *w, u32 kind, u32 block_len, u32 block_bytes, u32 t_len, u32 top_k, u32 k, u32 n_out, u32 experts, u32 per_slot) {
    PDL_ENTRY();
    u64 warp = ((u64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (warp >= (u64)t_len * top_k * n_out) return;
    u32 lane = threadIdx.x & 31;
    u32 n = (u32)(warp % n_out);
    u64 slot = warp / n_out;
    u32 t = (u32)(slot / top_k);
    int e = ids[slot];
    if (e < 0 || (u32)e >= experts) {
        if (lane == 0) out[slot * n_out + n] = QUIET_NAN;
        return;
    }
    const float *xr = x + (per_slot ? slot : (u64)t) * k;
    const unsigned char *row = w + ((u64)e * n_out + n) * (u64)(k / block_len) * block_bytes;
    float acc = 0.0f;
    for (u32 j = 8 * lane; j < k; j += 256) {
        float wv[8];
        weights8(kind, row, j, block_len, block_bytes, wv);
        acc = dot8f(acc, wv, xr + j);
    }
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, o);
    if (lane == 0) out[slot * n_out + n] = store_act(acc);
}

// Embedding rows from a quantized table [V, h]: out[t, c] = table[tokens[t], c]
// as an activation (in Bf16 mode the same bits as a bf16-decoded table).
extern "C" __global__ void embedding_quant(float *out, const unsigned char *table, const unsigned int *tokens, u32 kind, u32 block_len, u32 block_bytes, u32 t_len, u32 h) {
    PDL_ENTRY();
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)t_len * h) return;
    u32 t = (u32)(i / h), c = (u32)(i % h);
    const unsigned char *row = table + (u64)tokens[t] * (h / block_len) * block_bytes;
    out[i] = store_act(dequant_value(kind, row + (u64)(c / block_len) * block_bytes, c % block_len));
}
