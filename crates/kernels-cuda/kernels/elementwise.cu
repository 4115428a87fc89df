// elementwise.cu: embedding lookup, bias, residual add, silu, sigmoid, mul, swiglu
// (f32 activations; one thread per element). Every activation store goes
// through store_act (common.cuh).
#include "common.cuh"

template <typename W>
__device__ void embedding_impl(float *out, const W *table, const unsigned int *tokens, u32 t_len, u32 h) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)t_len * h) return;
    u32 t = (u32)(i / h), c = (u32)(i % h);
    out[i] = store_act(load_w(table, (u64)tokens[t] * h + c));
}
WEIGHT_VARIANTS(embedding, (float *out, const W *table, const unsigned int *tokens, u32 t_len, u32 h), (out, table, tokens, t_len, h))

// Bf16 mode: activations are rounded to bf16 values after every stage.
extern "C" __global__ void round_bf16_f32(float *x, u64 n) {
    PDL_ENTRY();
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = bf16_bits_to_f32(f32_to_bf16_bits(x[i]));
}

// Bf16 mode: activations as bf16 bits for cuBLAS (exact for bf16 values).
extern "C" __global__ void to_bf16_bits_f32(u16 *out, const float *x, u64 n) {
    PDL_ENTRY();
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = f32_to_bf16_bits(x[i]);
}

extern "C" __global__ void add_bias_f32(float *out, const float *x, const float *bias, u64 n, u32 width) {
    PDL_ENTRY();
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = store_act(x[i] + bias[i % width]);
}

extern "C" __global__ void add_f32(float *out, const float *a, const float *b, u64 n) {
    PDL_ENTRY();
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = store_act(a[i] + b[i]);
}

extern "C" __global__ void mul_f32(float *out, const float *a, const float *b, u64 n) {
    PDL_ENTRY();
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = store_act(a[i] * b[i]);
}

__device__ __forceinline__ float silu(float x) { return x / (1.0f + expf(-x)); }

extern "C" __global__ void silu_f32(float *out, const float *x, u64 n) {
    PDL_ENTRY();
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = store_act(silu(x[i]));
}

extern "C" __global__ void sigmoid_f32(float *out, const float *x, u64 n) {
    PDL_ENTRY();
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = store_act(1.0f / (1.0f + expf(-x[i])));
}

extern "C" __global__ void swiglu_f32(float *out, const float *gate, const float *up, u64 n) {
    PDL_ENTRY();
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = store_act(silu(gate[i]) * up[i]);
}

// The greedy choice: the index of the largest of row[0..n) (lowest index on
// ties; NaN never wins; 0 when nothing beats -inf), as the host's argmax.
// argmax_f32: block b scans its contiguous part of the row and writes its
// best (value bits, index) to partial[2b], partial[2b + 1]; then
// argmax_final_f32 (one block) reduces the blocks' bests into out[0]. The
// order (larger value, then lower index) makes the result independent of
// how the row is split.
__device__ __forceinline__ bool argmax_beats(float va, u32 ia, float vb, u32 ib) {
    return va > vb || (va == vb && ia < ib);
}

// The block's best (v, i) of its threads' (v, i), in thread 0.
__device__ __forceinline__ void block_argmax(float &v, u32 &best) {
    __shared__ float values[32];
    __shared__ u32 indices[32];
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_down_sync(0xffffffffu, v, o);
        u32 oi = __shfl_down_sync(0xffffffffu, best, o);
        if (argmax_beats(ov, oi, v, best)) { v = ov; best = oi; }
    }
    u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) / 32;
    if (lane == 0) { values[warp] = v; indices[warp] = best; }
    __syncthreads();
    if (warp != 0) return;
    v = lane < warps ? values[lane] : -INFINITY;
    best = lane < warps ? indices[lane] : 0xffffffffu;
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_down_sync(0xffffffffu, v, o);
        u32 oi = __shfl_down_sync(0xffffffffu, best, o);
        if (argmax_beats(ov, oi, v, best)) { v = ov; best = oi; }
    }
}

extern "C" __global__ void argmax_f32(u32 *partial, const float *row, u32 n) {
    PDL_ENTRY();
    u32 chunk = (n + gridDim.x - 1) / gridDim.x, begin = blockIdx.x * chunk, end = min(n, begin + chunk);
    float v = -INFINITY;
    u32 best = 0xffffffffu;
    for (u32 i = begin + threadIdx.x; i < end; i += blockDim.x) {
        float x = row[i];
        if (x > v) { v = x; best = i; }
    }
    block_argmax(v, best);
    if (threadIdx.x == 0) { partial[2 * blockIdx.x] = __float_as_uint(v); partial[2 * blockIdx.x + 1] = best; }
}

extern "C" __global__ void argmax_final_f32(u32 *out, const u32 *partial, u32 blocks) {
    PDL_ENTRY();
    float v = -INFINITY;
    u32 best = 0xffffffffu;
    for (u32 b = threadIdx.x; b < blocks; b += blockDim.x) {
        float x = __uint_as_float(partial[2 * b]);
        u32 i = partial[2 * b + 1];
        if (argmax_beats(x, i, v, best)) { v = x; best = i; }
    }
    block_argmax(v, best);
    if (threadIdx.x == 0) out[0] = v == -INFINITY ? 0 : best;
}

// Capture reads of decode steps (pipeline's taps.rs): block row e copies
// entry e of the table, len[e] 32-bit words (times the step's positions,
// step_start + 1, when by_position[e]: attention scores and probabilities
// [nh, 1, P]) from src[e] to dst[e] (device memory, or pinned mapped host
// memory) plus half_bytes when the step's position is odd: a recorded step
// writes alternate halves of its arena, so one step's copies land on the
// host while the next step runs (an eager step passes half_bytes 0). Bits are
// copied unchanged (expert ids are int32). The layout matches
// kernels-cuda's gather.rs.
#define GATHER_MAX 32
struct GatherTable {
    u64 src[GATHER_MAX];
    u64 dst[GATHER_MAX];
    u32 len[GATHER_MAX];
    u32 by_position[GATHER_MAX];
    u32 n;
};

extern "C" __global__ void gather_words(GatherTable table, u64 half_bytes, const u32 *step_start) {
    PDL_ENTRY();
    u32 e = blockIdx.y;
    if (e >= table.n) return;
    u32 start = step_start[0];
    u64 n = (u64)table.len[e] * (table.by_position[e] ? (u64)start + 1 : 1);
    const u32 *src = (const u32 *)table.src[e];
    u32 *dst = (u32 *)(table.dst[e] + (start & 1u) * half_bytes);
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) dst[i] = src[i];
}

// Ranks' partial sums (issue 27): element i of the ranks' values gathered
// as [ranks, n], added in rank order in f64 from the first rank's value
// (as Rust's f64 sum, whose neutral element is -0.0), rounded once to f32:
// the all-reduce in rank order the CPU reference makes
// (math::matmul_t_split), the same on every rank.
extern "C" __global__ void rank_sum_f32(float *out, const float *gathered, u32 ranks, u64 n) {
    PDL_ENTRY();
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n || ranks == 0) return;
    double acc = (double)gathered[i];
    for (u32 r = 1; r < ranks; r++) acc += (double)gathered[(u64)r * n + i];
    out[i] = (float)acc;
}
