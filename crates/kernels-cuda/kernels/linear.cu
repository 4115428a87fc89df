// linear.cu: the per-expert projections, which read the chosen expert ids
// themselves (one warp per output element, f32 accumulation, shuffle
// reduction). The dense projections go through cuBLAS (kernels-cuda's blas.rs).
#include "common.cuh"

template <typename W>
__device__ __forceinline__ float warp_dot(const float *a, const W *b, u32 k) {
    u32 lane = threadIdx.x & 31;
    float acc = 0.0f;
    for (u32 i = lane; i < k; i += 32) acc += a[i] * load_w(b, i);
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, o);
    return acc;
}

// out[t, j, n] = W[ids[t, j]][n] · x, x = input[t] (per_slot = 0) or
// input[t, j] (per_slot = 1). W is all experts stacked: [E, n_out, k].
// An id outside 0..experts writes NaN (never reads out of bounds).
template <typename W>
__device__ void expert_linear_impl(float *out, const float *x, const int *ids, const W *w, u32 t_len, u32 top_k, u32 k, u32 n_out, u32 experts, u32 per_slot) {
    u64 warp = ((u64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (warp >= (u64)t_len * top_k * n_out) return;
    u32 n = (u32)(warp % n_out);
    u64 slot = warp / n_out;
    u32 t = (u32)(slot / top_k);
    int e = ids[slot];
    if (e < 0 || (u32)e >= experts) {
        if ((threadIdx.x & 31) == 0) out[slot * n_out + n] = QUIET_NAN;
        return;
    }
    const float *xr = x + (per_slot ? slot : (u64)t) * k;
    float v = warp_dot(xr, w + ((u64)e * n_out + n) * k, k);
    if ((threadIdx.x & 31) == 0) out[slot * n_out + n] = store_act(v);
}

WEIGHT_VARIANTS(expert_linear, (float *out, const float *x, const int *ids, const W *w, u32 t_len, u32 top_k, u32 k, u32 n_out, u32 experts, u32 per_slot),
                (out, x, ids, w, t_len, top_k, k, n_out, experts, per_slot))

// Eight bf16 weights (one 16-byte load) dotted with eight f32 inputs (two
// 16-byte loads), accumulated in order into acc.
__device__ __forceinline__ float dot8(float acc, uint4 w, const float4 *x) {
    float4 a = x[0], b = x[1];
    acc += a.x * bf16_bits_to_f32((u16)(w.x & 0xffffu));
    acc += a.y * bf16_bits_to_f32((u16)(w.x >> 16));
    acc += a.z * bf16_bits_to_f32((u16)(w.y & 0xffffu));
    acc += a.w * bf16_bits_to_f32((u16)(w.y >> 16));
    acc += b.x * bf16_bits_to_f32((u16)(w.z & 0xffffu));
    acc += b.y * bf16_bits_to_f32((u16)(w.z >> 16));
    acc += b.z * bf16_bits_to_f32((u16)(w.w & 0xffffu));
    acc += b.w * bf16_bits_to_f32((u16)(w.w >> 16));
    return acc;
}

// expert_linear for bf16 weights when k is a multiple of 8 (so every row of
// W and x starts 16-byte aligned): each lane reads 8 weights per 16-byte
// load, through the read-only path. Same contract as expert_linear, for
// one projection (parts = 1: w0 into out0) or two of the same shape over
// the same input and ids in one launch (parts = 2: the gate and up
// projections, w1 into out1); each output element is computed exactly as
// with one part.
extern "C" __global__ void expert_linear_bf16w_v8(float *out0, float *out1, const float *x, const int *ids, const u16 *w0, const u16 *w1, u32 parts, u32 t_len, u32 top_k, u32 k, u32 n_out, u32 experts, u32 per_slot) {
    PDL_ENTRY();
    u64 warp;
    bool second;
    if (!expert_part_warp(parts, (u64)t_len * top_k * n_out, &warp, &second)) return;
    float *out = second ? out1 : out0;
    const u16 *w = second ? w1 : w0;
    u32 lane = threadIdx.x & 31;
    u32 n = (u32)(warp % n_out);
    u64 slot = warp / n_out;
    u32 t = (u32)(slot / top_k);
    int e = ids[slot];
    if (e < 0 || (u32)e >= experts) {
        if (lane == 0) out[slot * n_out + n] = QUIET_NAN;
        return;
    }
    const float4 *xr = (const float4 *)(x + (per_slot ? slot : (u64)t) * k);
    const uint4 *wr = (const uint4 *)(w + ((u64)e * n_out + n) * k);
    float acc = 0.0f;
#pragma unroll 4
    for (u32 i = lane; i < k / 8; i += 32) acc = dot8(acc, __ldg(wr + i), xr + 2 * i);
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, o);
    if (lane == 0) out[slot * n_out + n] = store_act(acc);
}

// Dense projection of a few rows (decode), bf16 weights with k % 8 == 0,
// over up to three weight matrices side by side (q, k and v in one
// launch): output feature n < n0 is row n of w0, n0 <= n < n0 + n1 row
// n - n0 of w1, the rest rows of w2. out[t * out_stride + col + n] =
// row(n) · x[t] for t < t_len <= 8. One warp per output feature reads its
// weight row once (16-byte loads) for all rows of x. raw = 1 stores the
// f32 sum as is (the router logits, which stay f32); raw = 0 stores it as
// an activation (store_act).
extern "C" __global__ void gemv_bf16w_v8(float *out, const float *x, const u16 *w0, const u16 *w1, const u16 *w2, u32 n0, u32 n1, u32 n2, u32 t_len, u32 k, u32 out_stride, u32 col, u32 raw) {
    PDL_ENTRY();
    u64 n = ((u64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (n >= (u64)n0 + n1 + n2) return; // uniform across the warp
    u32 lane = threadIdx.x & 31;
    const u16 *w = n < n0 ? w0 + n * k : n < (u64)n0 + n1 ? w1 + (n - n0) * k : w2 + (n - n0 - n1) * k;
    const uint4 *wr = (const uint4 *)w;
    float acc[8];
#pragma unroll
    for (int t = 0; t < 8; t++) acc[t] = 0.0f;
#pragma unroll 4
    for (u32 i = lane; i < k / 8; i += 32) {
        uint4 q = __ldg(wr + i);
#pragma unroll
        for (u32 t = 0; t < 8; t++)
            if (t < t_len) acc[t] = dot8(acc[t], q, (const float4 *)(x + (u64)t * k) + 2 * i);
    }
#pragma unroll
    for (u32 t = 0; t < 8; t++) {
        if (t >= t_len) break;
        float v = acc[t];
        for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
        if (lane == 0) out[(u64)t * out_stride + col + n] = raw ? v : store_act(v);
    }
}
