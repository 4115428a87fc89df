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

// Weight storage formats, by ggml type id (the store's own bytes).
#define REF_F32 0
#define REF_F16 1
#define REF_Q8_0 8
#define REF_Q4_K 12
#define REF_Q5_K 13
#define REF_Q6_K 14
#define REF_BF16 30
#define REF_MXFP4 39

// f16 bits -> f32: exact (half::f16::to_f32; a NaN keeps its payload, quieted).
__device__ float ref_f16_to_f32(unsigned short h) {
    unsigned int sign = ((unsigned int)h & 0x8000u) << 16;
    unsigned int exp = ((unsigned int)h >> 10) & 0x1fu, man = (unsigned int)h & 0x3ffu;
    if (exp == 0) {
        float v = (float)man * 5.9604644775390625e-8f;  // man * 2^-24, exact
        return __uint_as_float(__float_as_uint(v) | sign);
    }
    if (exp == 31) return __uint_as_float(sign | 0x7f800000u | (man ? 0x00400000u | (man << 13) : 0u));
    return __uint_as_float(sign | ((exp + 112u) << 23) | (man << 13));
}

__device__ float ref_half_at(const unsigned char* b, int at) {
    return ref_f16_to_f32((unsigned short)(b[at] | (b[at + 1] << 8)));
}

// Values per block and bytes per block of a block format (1 and the
// element size for plain storage).
__device__ int ref_block_len(int format) {
    switch (format) {
        case REF_Q8_0: case REF_MXFP4: return 32;
        case REF_Q4_K: case REF_Q5_K: case REF_Q6_K: return 256;
        default: return 1;
    }
}
__device__ int ref_block_bytes(int format) {
    switch (format) {
        case REF_Q8_0: return 34;
        case REF_MXFP4: return 17;
        case REF_Q4_K: return 144;
        case REF_Q5_K: return 176;
        case REF_Q6_K: return 210;
        case REF_F32: return 4;
        default: return 2;
    }
}

// Q4_K / Q5_K sub-block j's 6-bit scale and min (ggml's get_scale_min_k4).
__device__ void ref_scale_min_k4(int j, const unsigned char* q, unsigned int* sc, unsigned int* m) {
    if (j < 4) {
        *sc = q[j] & 63u;
        *m = q[j + 4] & 63u;
    } else {
        *sc = (q[j + 4] & 0xfu) | ((unsigned int)(q[j - 4] >> 6) << 4);
        *m = (unsigned int)(q[j + 4] >> 4) | ((unsigned int)(q[j] >> 6) << 4);
    }
}

// One block's values into y, as the reference's decoders (pipeline
// weights/quant.rs, quant_legacy.rs) compute them, operation for operation.
__device__ void ref_decode_block(int format, const unsigned char* b, float* y) {
    if (format == REF_Q8_0) {
        float d = ref_half_at(b, 0);
        for (int l = 0; l < 32; ++l) y[l] = (float)(signed char)b[2 + l] * d;
    } else if (format == REF_MXFP4) {
        const int doubled[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};
        unsigned int e = b[0];
        float d = __uint_as_float(e < 2 ? 0x00200000u << e : (e - 1) << 23);
        for (int j = 0; j < 16; ++j) {
            y[j] = (float)doubled[b[1 + j] & 0x0f] * d;
            y[j + 16] = (float)doubled[b[1 + j] >> 4] * d;
        }
    } else if (format == REF_Q4_K || format == REF_Q5_K) {
        bool five = format == REF_Q5_K;
        float d = ref_half_at(b, 0), min = ref_half_at(b, 2);
        const unsigned char* scales = b + 4;
        const unsigned char* qh = b + 16;
        const unsigned char* qs = b + (five ? 48 : 16);
        for (int j = 0; j < 4; ++j) {
            unsigned int sc1, m1, sc2, m2;
            ref_scale_min_k4(2 * j, scales, &sc1, &m1);
            ref_scale_min_k4(2 * j + 1, scales, &sc2, &m2);
            float d1 = d * (float)sc1, fm1 = min * (float)m1, d2 = d * (float)sc2, fm2 = min * (float)m2;
            for (int l = 0; l < 32; ++l) {
                unsigned int lo = qs[32 * j + l] & 0xfu, hi = qs[32 * j + l] >> 4;
                if (five) {
                    lo += (qh[l] & (1u << (2 * j))) ? 16u : 0u;
                    hi += (qh[l] & (2u << (2 * j))) ? 16u : 0u;
                }
                y[64 * j + l] = d1 * (float)lo - fm1;
                y[64 * j + 32 + l] = d2 * (float)hi - fm2;
            }
        }
    } else if (format == REF_Q6_K) {
        float d = ref_half_at(b, 208);
        for (int n = 0; n < 2; ++n) {
            const unsigned char* ql = b + 64 * n;
            const unsigned char* qh = b + 128 + 32 * n;
            const unsigned char* sc = b + 192 + 8 * n;
            for (int l = 0; l < 32; ++l) {
                int is = l / 16;
                int q[4] = {
                    (int)((ql[l] & 0xfu) | (((qh[l] >> 0) & 3u) << 4)) - 32,
                    (int)((ql[l + 32] & 0xfu) | (((qh[l] >> 2) & 3u) << 4)) - 32,
                    (int)((ql[l] >> 4) | (((qh[l] >> 4) & 3u) << 4)) - 32,
                    (int)((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3u) << 4)) - 32,
                };
                for (int k = 0; k < 4; ++k) {
                    y[128 * n + 32 * k + l] = d * (float)(signed char)sc[is + 2 * k] * (float)q[k];
                }
            }
        }
    }
}

// Element c of weight row r of plain storage (f32, f16, bf16).
__device__ float ref_plain(const void* w, int format, long long r, int k, int c) {
    long long i = r * (long long)k + c;
    if (format == REF_F32) return ((const float*)w)[i];
    unsigned short h = ((const unsigned short*)w)[i];
    return format == REF_BF16 ? ref_bf16_to_f32(h) : ref_f16_to_f32(h);
}

// One block per weight row r (blockIdx.x) and up to blockDim.x inputs
// (the row staged in shared memory, decoded from its format and rounded
// to bf16 when the contract multiplies bf16 weights)
// (input i = blockIdx.y * blockDim.x + threadIdx.x). The inputs are given
// transposed, xt[c * m + i], so the block's threads read one element each
// of consecutive addresses. out is [m, n] row-major.
extern "C" __global__ void ref_matmul_t(const float* xt, const void* w, int format, int round_bf16, float* out,
                                        int m, int n, int k) {
    __shared__ float row[REF_CHUNK];
    const long long r = blockIdx.x;
    const int i = blockIdx.y * blockDim.x + threadIdx.x;
    double lane[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
    double tail = 0.0;
    for (int base = 0; base < k; base += REF_CHUNK) {
        const int len = min(REF_CHUNK, k - base);
        __syncthreads();  // the previous pass is read by every thread
        const int block_len = ref_block_len(format);
        if (block_len == 1) {
            for (int j = threadIdx.x; j < len; j += blockDim.x) row[j] = ref_plain(w, format, r, k, base + j);
        } else {
            // Whole blocks (REF_CHUNK and a row are multiples of a block).
            const long long first = (r * (long long)k + base) / block_len;
            for (int q = threadIdx.x; q < len / block_len; q += blockDim.x) {
                ref_decode_block(format, (const unsigned char*)w + (first + q) * ref_block_bytes(format), row + q * block_len);
            }
        }
        __syncthreads();
        if (round_bf16) {
            for (int j = threadIdx.x; j < len; j += blockDim.x) row[j] = ref_round_to_bf16(row[j]);
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
