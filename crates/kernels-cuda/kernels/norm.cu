// norm.cu: RMSNorm of rows, and Qwen3's per-head QK-norm. One block per row
// (or per token and head); sum of squares in f32 with a tree reduction.
#include "common.cuh"

__device__ float block_sum(float v) {
    __shared__ float partial[32];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    int warps = (blockDim.x + 31) >> 5;
    v = (threadIdx.x < warps) ? partial[threadIdx.x] : 0.0f;
    if (warp == 0) for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    __shared__ float total;
    if (threadIdx.x == 0) total = v;
    __syncthreads();
    return total;
}

// out[row] = x[row] * rsqrt(mean(x[row]^2) + eps) * w; rows of `width`
// starting every `in_stride` elements of x at `in_col`, written densely.
template <typename W>
__device__ void rms_row(float *out, const float *x, const W *w, u32 width, float eps) {
    float ss = 0.0f;
    for (u32 c = threadIdx.x; c < width; c += blockDim.x) ss += x[c] * x[c];
    float inv = rsqrtf(block_sum(ss) / (float)width + eps);
    for (u32 c = threadIdx.x; c < width; c += blockDim.x) out[c] = store_act(x[c] * inv * load_w(w, c));
}

template <typename W>
__device__ void rms_norm_impl(float *out, const float *x, const W *w, u32 width, float eps) {
    u64 row = blockIdx.x;
    rms_row(out + row * width, x + row * width, w, width, eps);
}

// Block (t, head): head < q_heads uses q_w, else k_w. Input rows have
// `in_width` columns; output rows (q_heads + kv_heads) * hd.
template <typename W>
__device__ void qk_norm_impl(float *out, const float *x, const W *q_w, const W *k_w, u32 in_width, u32 q_heads, u32 kv_heads, u32 hd, float eps) {
    u32 t = blockIdx.x, head = blockIdx.y;
    u32 out_width = (q_heads + kv_heads) * hd;
    const W *w = head < q_heads ? q_w : k_w;
    rms_row(out + (u64)t * out_width + head * hd, x + (u64)t * in_width + head * hd, w, hd, eps);
}

// RMSNorm of each row's first `width` columns, rows of `in_width` (MLA's
// latent, before the shared key's rope columns); written densely.
template <typename W>
__device__ void rms_norm_cols_impl(float *out, const float *x, const W *w, u32 in_width, u32 width, float eps) {
    u64 row = blockIdx.x;
    rms_row(out + row * width, x + row * in_width, w, width, eps);
}

WEIGHT_VARIANTS(rms_norm, (float *out, const float *x, const W *w, u32 width, float eps), (out, x, w, width, eps))
WEIGHT_VARIANTS(qk_norm, (float *out, const float *x, const W *q_w, const W *k_w, u32 in_width, u32 q_heads, u32 kv_heads, u32 hd, float eps),
                (out, x, q_w, k_w, in_width, q_heads, kv_heads, hd, eps))
WEIGHT_VARIANTS(rms_norm_cols, (float *out, const float *x, const W *w, u32 in_width, u32 width, float eps), (out, x, w, in_width, width, eps))
