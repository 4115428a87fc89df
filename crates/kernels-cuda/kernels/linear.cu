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
    if ((threadIdx.x & 31) == 0) out[slot * n_out + n] = v;
}

// The same projections for many slots (prefill): slots grouped by expert
// (moe.cu's moe_group_by_expert), one block per (expert, 64 outputs), so
// each expert's weights are read once per 16 of its slots instead of once
// per slot. Tiles of weights and inputs in shared memory; each thread sums
// 4 outputs over k in order (f32, no FMA). Block (0, 0) also writes NaN
// for slots whose id is outside 0..experts, as the per-slot kernel does.
#define GROUP_N 64
#define GROUP_K 128
#define GROUP_S 16
template <typename W>
__device__ void expert_linear_grouped_impl(float *out, const float *x, const int *order, const u32 *offsets, const int *ids, const W *w, u32 t_len, u32 top_k, u32 k, u32 n_out, u32 experts, u32 per_slot) {
    __shared__ float ws[GROUP_N][GROUP_K + 1];
    __shared__ float xs[GROUP_S][GROUP_K + 1];
    u32 e = blockIdx.x, n0 = blockIdx.y * GROUP_N;
    if (e == 0 && n0 == 0) {
        for (u64 i = threadIdx.x; i < (u64)t_len * top_k * n_out; i += blockDim.x) {
            int id = ids[i / n_out];
            if (id < 0 || (u32)id >= experts) out[i] = QUIET_NAN;
        }
    }
    u32 begin = offsets[e], end = offsets[e + 1];
    u32 n = threadIdx.x % GROUP_N, row = threadIdx.x / GROUP_N;  // 256 threads: rows 0..3
    const u32 rows_per_pass = blockDim.x / GROUP_N;
    for (u32 s0 = begin; s0 < end; s0 += GROUP_S) {
        float acc[GROUP_S / 4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (u32 k0 = 0; k0 < k; k0 += GROUP_K) {
            u32 kk = min(GROUP_K, k - k0);
            for (u32 i = threadIdx.x; i < GROUP_N * GROUP_K; i += blockDim.x) {
                u32 r = i / GROUP_K, c = i % GROUP_K;
                ws[r][c] = (n0 + r < n_out && c < kk) ? load_w(w, ((u64)e * n_out + n0 + r) * k + k0 + c) : 0.0f;
            }
            for (u32 i = threadIdx.x; i < GROUP_S * GROUP_K; i += blockDim.x) {
                u32 r = i / GROUP_K, c = i % GROUP_K;
                float v = 0.0f;
                if (s0 + r < end && c < kk) {
                    u32 slot = (u32)order[s0 + r];
                    v = x[(u64)(per_slot ? slot : slot / top_k) * k + k0 + c];
                }
                xs[r][c] = v;
            }
            __syncthreads();
            for (u32 c = 0; c < kk; c++) {
                float wv = ws[n][c];
                for (u32 j = 0; j < GROUP_S / 4; j++) acc[j] = __fadd_rn(acc[j], __fmul_rn(xs[row + j * rows_per_pass][c], wv));
            }
            __syncthreads();
        }
        for (u32 j = 0; j < GROUP_S / 4; j++) {
            u32 r = row + j * rows_per_pass;
            if (s0 + r < end && n0 + n < n_out) out[(u64)order[s0 + r] * n_out + n0 + n] = acc[j];
        }
    }
}

WEIGHT_VARIANTS(expert_linear_grouped, (float *out, const float *x, const int *order, const u32 *offsets, const int *ids, const W *w, u32 t_len, u32 top_k, u32 k, u32 n_out, u32 experts, u32 per_slot),
                (out, x, order, offsets, ids, w, t_len, top_k, k, n_out, experts, per_slot))
WEIGHT_VARIANTS(expert_linear, (float *out, const float *x, const int *ids, const W *w, u32 t_len, u32 top_k, u32 k, u32 n_out, u32 experts, u32 per_slot),
                (out, x, ids, w, t_len, top_k, k, n_out, experts, per_slot))
