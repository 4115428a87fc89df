// quant.cu: projections over ggml blocks kept quantized on the device
// (blocks.cuh decodes them): whole tensors decoded for the prompt's
// projections, a decode step's dot products read from the blocks, and
// embedding rows.
#include "common.cuh"
#include "blocks.cuh"

// Value i of n values stored as consecutive blocks of type KIND (n a
// multiple of 8) into out_f32[i], or as bf16 bits (rounded to nearest
// even, as the host's half::bf16::from_f32) into out_bf16[i] when out_f32
// is null: each thread eight consecutive values, stored with one 16-byte
// (bf16) or two (f32) stores when the output is aligned for them.
template <u32 KIND>
__device__ __forceinline__ void dequant_impl(float *out_f32, u16 *out_bf16, const unsigned char *blocks, u64 n) {
    bool wide = ((unsigned long long)(out_f32 ? (const void *)out_f32 : (const void *)out_bf16) & 31u) == 0;
    u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 c = (u64)blockIdx.x * blockDim.x + threadIdx.x; 8 * c < n; c += stride) {
        u64 i = 8 * c;
        float w[8];
        dequant8<KIND>(blocks + (i / BlockOf<KIND>::len) * BlockOf<KIND>::bytes, (u32)(i % BlockOf<KIND>::len), w);
        if (wide && out_f32) {
            float4 a, b;
            a.x = w[0]; a.y = w[1]; a.z = w[2]; a.w = w[3];
            b.x = w[4]; b.y = w[5]; b.z = w[6]; b.w = w[7];
            ((float4 *)(out_f32 + i))[0] = a;
            ((float4 *)(out_f32 + i))[1] = b;
        } else if (wide) {
            uint4 v;
            v.x = pack_bf16(w[0], w[1]); v.y = pack_bf16(w[2], w[3]);
            v.z = pack_bf16(w[4], w[5]); v.w = pack_bf16(w[6], w[7]);
            *(uint4 *)(out_bf16 + i) = v;
        } else {
#pragma unroll
            for (u32 v = 0; v < 8; v++) {
                if (out_f32) out_f32[i + v] = w[v];
                else out_bf16[i + v] = f32_to_bf16_bits(w[v]);
            }
        }
    }
}

extern "C" __global__ void dequant_f32(float *out, const unsigned char *blocks, u32 kind, u64 n) {
    PDL_ENTRY();
    DISPATCH_KIND(kind, dequant_impl<K>(out, nullptr, blocks, n));
}

extern "C" __global__ void dequant_bf16(u16 *out, const unsigned char *blocks, u32 kind, u64 n) {
    PDL_ENTRY();
    DISPATCH_KIND(kind, dequant_impl<K>(nullptr, out, blocks, n));
}

// ---- Projections over weights kept quantized on the device ----
//
// A quantized weight matrix [n, k] is n rows of k / block_len consecutive
// blocks (as a GGUF file stores it; k is a multiple of block_len). Each
// weight value is decoded where it is used, exactly as above, and in Bf16
// mode rounded to bf16 as the weights decoded at upload are, so these
// kernels multiply by the same weights as the decoded path (accumulation
// in f32, as everywhere).

// The eight weights w in Bf16 mode rounded to bf16 by the hardware's
// conversion, which rounds every finite value to nearest even exactly as
// the host does (a NaN weight stays NaN, its payload not kept: a dot
// product's NaN is the canonical one anyway). F32 mode: unchanged.
__device__ __forceinline__ void round_weights8(float *w) {
#if ROUND_BF16
#pragma unroll
    for (u32 i = 0; i < 8; i += 2) {
        u32 pair = pack_bf16_rn(w[i], w[i + 1]);
        w[i] = __uint_as_float(pair << 16);
        w[i + 1] = __uint_as_float(pair & 0xffff0000u);
    }
#endif
}

// acc + w · (a, b), in order, fused multiply-adds.
__device__ __forceinline__ float dot8(float acc, const float *w, float4 a, float4 b) {
    acc = __fmaf_rn(a.x, w[0], acc);
    acc = __fmaf_rn(a.y, w[1], acc);
    acc = __fmaf_rn(a.z, w[2], acc);
    acc = __fmaf_rn(a.w, w[3], acc);
    acc = __fmaf_rn(b.x, w[4], acc);
    acc = __fmaf_rn(b.y, w[5], acc);
    acc = __fmaf_rn(b.z, w[6], acc);
    acc = __fmaf_rn(b.w, w[7], acc);
    return acc;
}

// acc + w · x[0..8] (x 32-byte aligned).
__device__ __forceinline__ float dot8f(float acc, const float *w, const float *x) {
    return dot8(acc, w, ((const float4 *)x)[0], ((const float4 *)x)[1]);
}

// One lane's part of row · x for a row of k values in blocks of type KIND:
// values 8 * lane + 256 * i .. + 8. Four groups of eight at a time, their
// loads (weights and x) all issued before the first is decoded, so a warp
// waits for memory once per four groups, not once per group.
template <u32 KIND>
__device__ __forceinline__ float lane_dot(const unsigned char *__restrict__ row, const float *__restrict__ x, u32 k, u32 lane) {
    const u32 U = 4;
    float acc = 0.0f;
    for (u32 j = 8 * lane; j < k; j += 256 * U) {
        Raw8 raw[U];
        float4 xa[U], xb[U];
#pragma unroll
        for (u32 u = 0; u < U; u++) {
            u32 ju = j + 256 * u;
            if (ju < k) {
                raw[u] = raw_of<KIND>(block_at<KIND>(row, ju), ju % BlockOf<KIND>::len);
                xa[u] = ((const float4 *)(x + ju))[0];
                xb[u] = ((const float4 *)(x + ju))[1];
            }
        }
#pragma unroll
        for (u32 u = 0; u < U; u++) {
            u32 ju = j + 256 * u;
            if (ju < k) {
                float w[8];
                decode_raw<KIND>(raw[u], ju % BlockOf<KIND>::len, w);
                round_weights8(w);
                acc = dot8(acc, w, xa[u], xb[u]);
            }
        }
    }
    return acc;
}

// ---- A decode step's dot products over K-quant rows ----
//
// A lane takes 32 values of a block that share their block's loads: for
// Q4_K and Q5_K, 16 bytes of quants give 16 values of sub-block 2p (low
// nibbles) and 16 of sub-block 2p + 1 (high nibbles); for Q6_K, 8 bytes at
// l0 of each of ql's two rows and of qh give the values at l0..l0 + 8 of
// the half's four groups of 32. Eight lanes per block: the scale decoding
// and address arithmetic are shared by 32 values instead of 8. The values
// are dequant_value's, operation for operation.

// acc + w[0..16] · x[0..16] (four float4 of x).
__device__ __forceinline__ float dot16f(float acc, const float *w, const float4 *x) {
    acc = dot8(acc, w, x[0], x[1]);
    return dot8(acc, w + 8, x[2], x[3]);
}

// Unit u (0..8) of the Q4_K or Q5_K block at b against x (the block's
// 256 values of x): the 32 values' contribution to the dot product.
template <u32 KIND>
__device__ __forceinline__ float unit_dot_k45(const unsigned char *b, u32 u, const float *x) {
    u32 p = u / 2, h = u % 2;
    u32 head = *(const u32 *)b, s0 = *(const u32 *)(b + 4), s1 = *(const u32 *)(b + 8), s2 = *(const u32 *)(b + 12);
    uint4 q = *(const uint4 *)(b + (KIND == GGML_Q4_K ? 16 : 48) + 32 * p + 16 * h);
    uint4 qh;
    if (KIND == GGML_Q5_K) qh = *(const uint4 *)(b + 16 + 16 * h);
    float4 xl[4], xh[4];
#pragma unroll
    for (u32 i = 0; i < 4; i++) {
        xl[i] = ((const float4 *)(x + 64 * p + 16 * h))[i];
        xh[i] = ((const float4 *)(x + 64 * p + 32 + 16 * h))[i];
    }
    float acc = 0.0f;
#pragma unroll
    for (u32 sub = 0; sub < 2; sub++) {
        // scale_min_k4 of sub-block j = 2p + sub from the three words.
        u32 j = 2 * p + sub, sc, m;
        if (j < 4) {
            sc = (s0 >> (8 * j)) & 63u;
            m = (s1 >> (8 * j)) & 63u;
        } else {
            u32 sh = 8 * (j - 4), lo = (s2 >> sh) & 0xffu;
            sc = (lo & 0xfu) | (((s0 >> sh) >> 6 & 3u) << 4);
            m = (lo >> 4) | (((s1 >> sh) >> 6 & 3u) << 4);
        }
        float d = __fmul_rn(f16_bits_to_f32((u16)head), (float)sc);
        float min = __fmul_rn(f16_bits_to_f32((u16)(head >> 16)), (float)m);
        u32 words[4] = {q.x, q.y, q.z, q.w}, highs[4] = {qh.x, qh.y, qh.z, qh.w};
        float w[16];
#pragma unroll
        for (u32 c = 0; c < 2; c++) {
            uint2 v;
            v.x = (words[2 * c] >> (4 * sub)) & 0x0f0f0f0fu;
            v.y = (words[2 * c + 1] >> (4 * sub)) & 0x0f0f0f0fu;
            if (KIND == GGML_Q5_K) {
                v.x |= ((highs[2 * c] >> j) & 0x01010101u) << 4;
                v.y |= ((highs[2 * c + 1] >> j) & 0x01010101u) << 4;
            }
#pragma unroll
            for (u32 i = 0; i < 8; i++) w[8 * c + i] = __fsub_rn(__fmul_rn(d, quant_value<0>(v, i)), min);
        }
        round_weights8(w);
        round_weights8(w + 8);
        acc = dot16f(acc, w, sub ? xh : xl);
    }
    return acc;
}

// Unit u (0..8) of the Q6_K block at b against x (the block's 256 values).
__device__ __forceinline__ float unit_dot_q6k(const unsigned char *b, u32 u, const float *x) {
    u32 n = u / 4, l0 = 8 * (u % 4);
    uint2 qa = load8<false>(b + 64 * n + l0), qb = load8<false>(b + 64 * n + 32 + l0), qh = load8<false>(b + 128 + 32 * n + l0);
    // The four groups' signed scales: bytes l0 / 16 + 2k of the half's 8.
    uint2 scales = load8<false>(b + 192 + 8 * n);
    float d = f16_bits_to_f32(*(const u16 *)(b + 208));
    float acc = 0.0f;
#pragma unroll
    for (u32 k = 0; k < 4; k++) {
        uint2 low = (k & 1) ? qb : qa;
        u32 shift = (k & 2) ? 4 : 0;
        uint2 v;
        v.x = ((low.x >> shift) & 0x0f0f0f0fu) | (((qh.x >> (2 * k)) & 0x03030303u) << 4);
        v.y = ((low.y >> shift) & 0x0f0f0f0fu) | (((qh.y >> (2 * k)) & 0x03030303u) << 4);
        u32 at = l0 / 16 + 2 * k; // 0..8, which word and byte
        u32 sbyte = (((at < 4 ? scales.x : scales.y) >> (8 * (at & 3))) & 0xffu);
        float s = __fmul_rn(d, (float)(int)(signed char)sbyte);
        float w[8];
#pragma unroll
        for (u32 i = 0; i < 8; i++) w[i] = __fmul_rn(s, quant_value<32>(v, i));
        round_weights8(w);
        const float4 *xk = (const float4 *)(x + 32 * k + 128 * n + l0);
        acc = dot8(acc, w, xk[0], xk[1]);
    }
    return acc;
}

// One lane's part of row · x for a row of k values in K-quant blocks of
// type KIND: units lane, lane + 32, ... of the row's k / 256 * 8.
template <u32 KIND>
__device__ __forceinline__ float lane_dot_k(const unsigned char *__restrict__ row, const float *__restrict__ x, u32 k, u32 lane) {
    u32 units = k / 256 * 8;
    float acc = 0.0f;
#pragma unroll 2
    for (u32 unit = lane; unit < units; unit += 32) {
        const unsigned char *b = row + (u64)(unit / 8) * BlockOf<KIND>::bytes;
        const float *xb = x + 256 * (unit / 8);
        if (KIND == GGML_Q6_K) acc += unit_dot_q6k(b, unit % 8, xb);
        else acc += unit_dot_k45<KIND>(b, unit % 8, xb);
    }
    return acc;
}

// The lane's part of row · x for any block type.
template <u32 KIND>
__device__ __forceinline__ float row_dot(const unsigned char *__restrict__ row, const float *__restrict__ x, u32 k, u32 lane) {
    if (KIND == GGML_Q8_0 || KIND == GGML_MXFP4 || KIND == MT_FP8_B128) return lane_dot<KIND>(row, x, k, lane);
    return lane_dot_k<KIND>(row, x, k, lane);
}

// The warp's sum of v, in lane 0.
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    return v;
}

// Dense projection of a few rows: out[t * out_stride + col + n] =
// row(n) · x[t] for n < n_rows, t < t_len <= 8, one warp per output row.
// One row of x (a decode step): lane_dot. Up to eight: the warp reads its
// row's blocks once for all rows of x, each lane eight consecutive values
// at a time. raw = 1 stores the f32 sum as is (router logits), raw = 0 as
// an activation (store_act).
template <u32 KIND>
__device__ __forceinline__ void gemv_impl(float *out, const float *__restrict__ x, const unsigned char *__restrict__ w, u32 n, u32 t_len, u32 k, u32 out_stride, u32 col, u32 raw) {
    u32 lane = threadIdx.x & 31;
    const unsigned char *row = w + n * (u64)(k / BlockOf<KIND>::len) * BlockOf<KIND>::bytes;
    if (t_len == 1) {
        float v = warp_sum(row_dot<KIND>(row, x, k, lane));
        if (lane == 0) out[col + n] = raw ? v : store_act(v);
        return;
    }
    float acc[8];
#pragma unroll
    for (u32 t = 0; t < 8; t++) acc[t] = 0.0f;
    for (u32 j = 8 * lane; j < k; j += 256) {
        float wv[8];
        dequant8<KIND>(block_at<KIND>(row, j), j % BlockOf<KIND>::len, wv);
        round_weights8(wv);
#pragma unroll
        for (u32 t = 0; t < 8; t++)
            if (t < t_len) acc[t] = dot8f(acc[t], wv, x + (u64)t * k + j);
    }
#pragma unroll
    for (u32 t = 0; t < 8; t++) {
        if (t >= t_len) break;
        float v = warp_sum(acc[t]);
        if (lane == 0) out[(u64)t * out_stride + col + n] = raw ? v : store_act(v);
    }
}

// gemv_impl over up to three quantized matrices side by side (q, k and v in
// one launch, as gemv_bf16w_v8 for bf16 weights): output feature f < n0 is
// row f of w0 (blocks of type kind0), n0 <= f < n0 + n1 row f - n0 of w1,
// the rest rows of w2; one warp per feature.
extern "C" __global__ void gemv_quant(float *out, const float *x, const unsigned char *w0, const unsigned char *w1, const unsigned char *w2, u32 kind0, u32 kind1, u32 kind2, u32 n0, u32 n1, u32 n2, u32 t_len, u32 k, u32 out_stride, u32 col, u32 raw) {
    PDL_ENTRY();
    u64 f = ((u64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (f >= (u64)n0 + n1 + n2) return; // uniform across the warp
    u32 part = f < n0 ? 0 : f < (u64)n0 + n1 ? 1 : 2;
    u32 first = part == 0 ? 0 : part == 1 ? n0 : n0 + n1;
    const unsigned char *w = part == 0 ? w0 : part == 1 ? w1 : w2;
    u32 kind = part == 0 ? kind0 : part == 1 ? kind1 : kind2;
    DISPATCH_KIND(kind, gemv_impl<K>(out, x, w, (u32)f - first, t_len, k, out_stride, col + first, raw));
}

// Per-expert projection over quantized experts stacked [E, n_out, k] (each
// expert's rows after the previous expert's): out[t, j, n] =
// W[ids[t, j]][n] · x, x = input[t] (per_slot = 0) or input[t, j]
// (per_slot = 1). One warp per output element; an id outside 0..experts
// writes NaN (never reads out of bounds).
template <u32 KIND>
__device__ __forceinline__ void expert_linear_quant_impl(float *out, const float *__restrict__ x, const int *ids, const unsigned char *__restrict__ w, u64 warp, u32 top_k, u32 k, u32 n_out, u32 experts, u32 per_slot) {
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
    const unsigned char *row = w + ((u64)e * n_out + n) * (u64)(k / BlockOf<KIND>::len) * BlockOf<KIND>::bytes;
    float v = warp_sum(row_dot<KIND>(row, xr, k, lane));
    if (lane == 0) out[slot * n_out + n] = store_act(v);
}

// One or two (parts) such projections over the same input and ids in one
// launch (the gate and up projections of a decode step, as
// expert_linear_bf16w_v8 for bf16 experts): part p writes out_p from the
// stack w_p of blocks of type kind_p.
extern "C" __global__ void expert_linear_quant(float *out0, float *out1, const float *x, const int *ids, const unsigned char *w0, const unsigned char *w1, u32 kind0, u32 kind1, u32 parts, u32 t_len, u32 top_k, u32 k, u32 n_out, u32 experts, u32 per_slot) {
    PDL_ENTRY();
    u64 warp;
    bool second;
    if (!expert_part_warp(parts, (u64)t_len * top_k * n_out, &warp, &second)) return;
    float *out = second ? out1 : out0;
    DISPATCH_KIND(second ? kind1 : kind0, expert_linear_quant_impl<K>(out, x, ids, second ? w1 : w0, warp, top_k, k, n_out, experts, per_slot));
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
