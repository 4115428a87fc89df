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
