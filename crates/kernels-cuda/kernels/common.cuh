// common.cuh: helpers shared by every kernel family. Prepended to each
// family's source before NVRTC compiles it (NVRTC reads no files).
#pragma once

typedef unsigned long long u64;
typedef unsigned int u32;
typedef unsigned short u16;

// NVRTC has no <math.h>; the constants kernels need.
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif
#define QUIET_NAN __int_as_float(0x7fc00000)

// Round-to-nearest-even f32 -> bf16 bits (NaN kept quiet), identical to
// half::bf16::from_f32 on the host.
__device__ __forceinline__ u16 f32_to_bf16_bits(float x) {
    u32 bits = __float_as_uint(x);
    if ((bits & 0x7fffffffu) > 0x7f800000u) {
        return (u16)((bits >> 16) | 0x0040u);
    }
    u32 rounding = 0x7fffu + ((bits >> 16) & 1u);
    return (u16)((bits + rounding) >> 16);
}

__device__ __forceinline__ float bf16_bits_to_f32(u16 b) {
    return __uint_as_float(((u32)b) << 16);
}

// What a kernel stores as an activation (a stage's output). Built with
// ROUND_BF16=1 (the Bf16 backend) it is rounded to a bf16 value here, at
// the store, which gives exactly the bits a separate rounding pass after
// the kernel gave; with ROUND_BF16=0 (F32) it is stored as computed.
#ifndef ROUND_BF16
#define ROUND_BF16 0
#endif
__device__ __forceinline__ float store_act(float x) {
#if ROUND_BF16
    return bf16_bits_to_f32(f32_to_bf16_bits(x));
#else
    return x;
#endif
}

// Two bf16 (bits) in one 32-bit register, the lower index in the low half.
__device__ __forceinline__ u32 pack_bf16(float lo, float hi) {
    return (u32)f32_to_bf16_bits(lo) | ((u32)f32_to_bf16_bits(hi) << 16);
}

// pack_bf16 by the hardware's conversion (one instruction for the two):
// the same bits for every value but NaN, which becomes the canonical NaN
// instead of keeping its payload.
__device__ __forceinline__ u32 pack_bf16_rn(float lo, float hi) {
    u32 pair;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(pair) : "f"(hi), "f"(lo));
    return pair;
}

// D = A·B + D for one m16n8k16 tile: A 16x16 bf16 (row), B 16x8 bf16 (col),
// f32 accumulators.
__device__ __forceinline__ void mma_bf16_16816(float *d, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// A launch of `parts` (1 or 2) per-expert projections of per_part outputs
// each, one warp per output (the gate and up projections of a decode step
// in one launch): whether this warp has an output, and then which part
// (second) and which output of that part (warp).
__device__ __forceinline__ bool expert_part_warp(u32 parts, u64 per_part, u64 *warp, bool *second) {
    *warp = ((u64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (*warp >= parts * per_part) return false;
    *second = *warp >= per_part;
    if (*second) *warp -= per_part;
    return true;
}

// Weights are f32 (F32 mode) or bf16 bits (Bf16 mode); kernels read them
// through these overloads and accumulate in f32 either way.
__device__ __forceinline__ float load_w(const float *w, u64 i) { return w[i]; }
__device__ __forceinline__ float load_w(const u16 *w, u64 i) { return bf16_bits_to_f32(w[i]); }

// Programmatic dependent launch (sm_90): in a recorded decode step each
// kernel may be launched while the one before it still runs (graph.rs
// makes the edges programmatic). Every entry point starts by waiting for
// the kernels it depends on to finish and their memory to be visible,
// before any load or store, then lets the next kernel start launching.
// Launched the ordinary way, both are no-ops.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define PDL_ENTRY() asm volatile("griddepcontrol.wait;\n\tgriddepcontrol.launch_dependents;" ::: "memory")
#else
#define PDL_ENTRY()
#endif

// Entry points for both weight types: NAME_f32 (float weights) and
// NAME_bf16w (bf16 weights), from one template body NAME_impl<W>.
// (C linkage ignores the namespaces, which only scope the typedef of W.)
#define WEIGHT_VARIANTS(NAME, PARAMS, ARGS) \
    namespace NAME##_f32_variant { typedef float W; extern "C" __global__ void NAME##_f32 PARAMS { PDL_ENTRY(); NAME##_impl<W> ARGS; } } \
    namespace NAME##_bf16w_variant { typedef u16 W; extern "C" __global__ void NAME##_bf16w PARAMS { PDL_ENTRY(); NAME##_impl<W> ARGS; } }
