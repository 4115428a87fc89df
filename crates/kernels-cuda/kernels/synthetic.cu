// synthetic.cu: synthetic model weights generated on the device, bit for bit
// the values of pipeline::weights::synthetic_value on the host (splitmix64 of
// key + index * golden ratio, four 16-bit uniforms summed, scaled in f32
// without FMA, rounded to bf16).
#include "common.cuh"

__device__ __forceinline__ u64 mix64(u64 z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// bf16(mean + scale * (sum of four 16-bit lanes of mix64(key + i*golden) - 131070))
// `scale` is std / sqrt(4 * (65536^2 - 1) / 12), computed on the host.
__device__ __forceinline__ u16 synthetic_bf16(u64 key, u64 i, float mean, float scale) {
    u64 h = mix64(key + i * 0x9e3779b97f4a7c15ull);
    long long sum = (long long)((h & 0xffff) + ((h >> 16) & 0xffff) + ((h >> 32) & 0xffff) + (h >> 48));
    float centred = (float)(sum - 131070);
    return f32_to_bf16_bits(__fadd_rn(__fmul_rn(centred, scale), mean));
}

// out[i] = element i of the tensor, as bf16 bits.
extern "C" __global__ void synthetic_fill_bf16(u16 *out, u64 n, u64 key, float mean, float scale) {
    PDL_ENTRY();
    u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        out[i] = synthetic_bf16(key, i, mean, scale);
    }
}

// out[i] = element i of the tensor, the same bf16 value widened to f32.
extern "C" __global__ void synthetic_fill_f32(float *out, u64 n, u64 key, float mean, float scale) {
    PDL_ENTRY();
    u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        out[i] = bf16_bits_to_f32(synthetic_bf16(key, i, mean, scale));
    }
}

// Blocks of a synthetic block-format tensor, bit for bit as pipeline's
// synthetic_blocks.rs makes them: byte j of block b is byte j % 8 of
// mix64(key + (b * words + j / 8) * golden) (words = ceil(block_bytes / 8)),
// except the f16 scale fields: d at d_at and dmin at dmin_at (u32 max: none),
// two little-endian bytes each. One thread per byte of `blocks` blocks.
extern "C" __global__ void synthetic_blocks(unsigned char *out, u64 blocks, u32 block_bytes, u64 key, u32 d_at, u32 d, u32 dmin_at, u32 dmin) {
    PDL_ENTRY();
    u64 n = blocks * block_bytes, stride = (u64)gridDim.x * blockDim.x;
    u64 words = (block_bytes + 7) / 8;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        u64 b = i / block_bytes;
        u32 j = (u32)(i % block_bytes);
        u32 v;
        if (j - d_at < 2u) v = d >> (8 * (j - d_at));
        else if (dmin_at != 0xffffffffu && j - dmin_at < 2u) v = dmin >> (8 * (j - dmin_at));
        else v = (u32)(mix64(key + (b * words + j / 8) * 0x9e3779b97f4a7c15ull) >> (8 * (j % 8)));
        out[i] = (unsigned char)(v & 0xffu);
    }
}
