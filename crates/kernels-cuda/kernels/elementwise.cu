// elementwise.cu: embedding lookup, bias, residual add, silu, mul, swiglu
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
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = bf16_bits_to_f32(f32_to_bf16_bits(x[i]));
}

// Bf16 mode: activations as bf16 bits for cuBLAS (exact for bf16 values).
extern "C" __global__ void to_bf16_bits_f32(u16 *out, const float *x, u64 n) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = f32_to_bf16_bits(x[i]);
}

extern "C" __global__ void add_bias_f32(float *out, const float *x, const float *bias, u64 n, u32 width) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = store_act(x[i] + bias[i % width]);
}

extern "C" __global__ void add_f32(float *out, const float *a, const float *b, u64 n) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = store_act(a[i] + b[i]);
}

extern "C" __global__ void mul_f32(float *out, const float *a, const float *b, u64 n) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = store_act(a[i] * b[i]);
}

__device__ __forceinline__ float silu(float x) { return x / (1.0f + expf(-x)); }

extern "C" __global__ void silu_f32(float *out, const float *x, u64 n) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = store_act(silu(x[i]));
}

extern "C" __global__ void swiglu_f32(float *out, const float *gate, const float *up, u64 n) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = store_act(silu(gate[i]) * up[i]);
}
