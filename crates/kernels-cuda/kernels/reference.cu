// reference.cu: the CPU reference's matrix product, on the device, to the
// bit (the `Cuda(dtype: F64)` reference; pipeline backend/cpu/math.rs is
// the specification). Written for clarity, not speed, and sharing nothing
// with the fast paths: it uses none of common.cuh's helpers.
//
// out[i][r] = (float) dot(x[i], w[r]) where dot is math.rs's `dot`: f32
// values widened exactly to f64, multiplied, and summed into eight lanes
// (element c of each full group of eight goes to lane c % 8), the elements
// past the last full group summed in order into a ninth, then
//   ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)) + tail,
// rounded to nearest even to f32. Every operation is one IEEE f64 multiply
// or add (the module is compiled with --fmad=false), so each sum is the
// CPU's to the last bit.
#include "common.cuh"

// Weight elements staged in shared memory per pass (a multiple of 8, so a
// pass never splits a group of eight).
#define REF_CHUNK 4096

// bf16 bits -> f32: exact (the bits are the f32's high half).
__device__ float ref_bf16_to_f32(unsigned short b) {
    return __uint_as_float(((unsigned int)b) << 16);
}

// f32 -> nearest bf16 (ties to even), NaN kept quiet: half::bf16::from_f32
// written as the half crate writes it, back in f32.
__device__ float ref_round_to_bf16(float value) {
    unsigned int x = __float_as_uint(value);
    unsigned int b;
    if ((x & 0x7fffffffu) > 0x7f800000u) {
        b = (x >> 16) | 0x0040u;
    } else {
        unsigned int round_bit = 0x00008000u;
        b = x >> 16;
        if ((x & round_bit) != 0 && (x & (3u * round_bit - 1u)) != 0) {
            b += 1;
        }
    }
    return __uint_as_float((b & 0xffffu) << 16);
}

// Element c of weight row r: f32 or bf16 storage, then the contract's
// rounding of weights (round_bf16 = 1: multiplied as bf16 values).
__device__ float ref_weight(const void* w, int w_is_bf16, int round_bf16, long long r, int k, int c) {
    long long i = r * (long long)k + c;
    float v = w_is_bf16 ? ref_bf16_to_f32(((const unsigned short*)w)[i]) : ((const float*)w)[i];
    return round_bf16 ? ref_round_to_bf16(v) : v;
}

// One block per weight row r (blockIdx.x) and up to blockDim.x inputs
// (input i = blockIdx.y * blockDim.x + threadIdx.x). The inputs are given
// transposed, xt[c * m + i], so the block's threads read one element each
// of consecutive addresses. out is [m, n] row-major.
extern "C" __global__ void ref_matmul_t(const float* xt, const void* w, int w_is_bf16, int round_bf16, float* out,
                                        int m, int n, int k) {
    __shared__ float row[REF_CHUNK];
    const long long r = blockIdx.x;
    const int i = blockIdx.y * blockDim.x + threadIdx.x;
    double lane[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
    double tail = 0.0;
    for (int base = 0; base < k; base += REF_CHUNK) {
        const int len = min(REF_CHUNK, k - base);
        __syncthreads();  // the previous pass is read by every thread
        for (int j = threadIdx.x; j < len; j += blockDim.x) {
            row[j] = ref_weight(w, w_is_bf16, round_bf16, r, k, base + j);
        }
        __syncthreads();
        if (i < m) {
            // base is a multiple of 8: a whole group of this pass is a
            // whole group of the row; what is left is the row's tail.
            int j = 0;
            for (; j + 8 <= len; j += 8) {
#pragma unroll
                for (int l = 0; l < 8; ++l) {
                    double product = (double)xt[(long long)(base + j + l) * m + i] * (double)row[j + l];
                    lane[l] = lane[l] + product;
                }
            }
            for (; j < len; ++j) {
                tail = tail + (double)xt[(long long)(base + j) * m + i] * (double)row[j];
            }
        }
    }
    if (i < m && r < n) {
        double sum = ((lane[0] + lane[4]) + (lane[2] + lane[6])) + ((lane[1] + lane[5]) + (lane[3] + lane[7]));
        out[(long long)i * n + r] = (float)(sum + tail);
    }
}
