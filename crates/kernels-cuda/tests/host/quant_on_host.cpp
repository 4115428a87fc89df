// The block decoders of kernels/blocks.cuh (ggml's and the FP8 row block)
// and the decode-step dot products
// of kernels/quant.cu compiled by the host's C++ compiler (the CUDA
// intrinsics they use defined below with the same IEEE single-precision
// semantics), and checked against the one-value-at-a-time reference
// decoder `dequant_value` of the same file (which the GPU test
// device_block_decoders_match_the_host_bit_for_bit ties to the Rust
// decoder): every value bit for bit, including NaN and infinite scales.
// Built and run by tests/quant_on_host.rs; prints one line per check and
// exits 1 on any mismatch.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>

#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
#define __launch_bounds__(...)
struct Dim3 { unsigned x, y, z; };
static Dim3 threadIdx, blockIdx, blockDim, gridDim;
struct uint2 { unsigned x, y; };
struct uint4 { unsigned x, y, z, w; };
struct float4 { float x, y, z, w; };
// One rounding per operation, as on the device (volatile: no contraction).
static float __fmul_rn(float a, float b) { volatile float r = a * b; return r; }
static float __fsub_rn(float a, float b) { volatile float r = a - b; return r; }
static float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
static float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
static unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
static float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
static float __shfl_down_sync(unsigned, float v, int) { return v; }
// PTX prmt in its default mode: result byte n is byte (s >> 4n) & 7 of {y, x}.
static unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
    unsigned long long v = ((unsigned long long)y << 32) | x;
    unsigned r = 0;
    for (int n = 0; n < 4; n++) r |= (unsigned)((v >> (8 * ((s >> (4 * n)) & 7))) & 0xff) << (8 * n);
    return r;
}

#include "../../kernels/quant.cu"

static unsigned long long rng = 0x9e3779b97f4a7c15ull;
static unsigned next_byte() {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (unsigned)(rng >> 32) & 0xff;
}

// A row of `blocks` random blocks of type K, 16-byte aligned as on the
// device; with `finite`, the f16 scales' exponents are kept below 31.
template <u32 K>
static unsigned char *random_row(u32 blocks, bool finite) {
    u32 bytes = BlockOf<K>::bytes;
    auto *row = static_cast<unsigned char *>(std::aligned_alloc(16, (blocks * bytes + 15) / 16 * 16));
    for (u32 i = 0; i < blocks * bytes; i++) row[i] = (unsigned char)next_byte();
    for (u32 b = 0; finite && b < blocks; b++) {
        unsigned char *p = row + b * bytes;
        if (K == MT_FP8_B128) {
            // A finite f32 scale (exponent below 255), no NaN e4m3 byte.
            p[3] &= 0x3f;
            for (u32 i = 4; i < bytes; i++)
                if ((p[i] & 0x7f) == 0x7f) p[i] -= 1;
            continue;
        }
        if (K == GGML_MXFP4) {
            p[0] = (unsigned char)(100 + p[0] % 40); // 2^-28 .. 2^11: finite sums
            continue;
        }
        if (K == GGML_Q6_K) p[209] &= 0x3b;
        else p[1] &= 0x3b;
        if (K == GGML_Q4_K || K == GGML_Q5_K) p[3] &= 0x3b;
    }
    return row;
}

static bool same(float a, float b) { return __float_as_uint(a) == __float_as_uint(b); }

// dequant8 (eight values, one scale decode) against dequant_value.
template <u32 K>
static int check_dequant8(const char *name) {
    int bad = 0, values = 0;
    for (int trial = 0; trial < 300; trial++) {
        unsigned char *row = random_row<K>(3, trial % 4 != 0);
        for (u32 b = 0; b < 3; b++)
            for (u32 j0 = 0; j0 < BlockOf<K>::len; j0 += 8) {
                float w[8];
                const unsigned char *p = row + b * BlockOf<K>::bytes;
                dequant8<K>(p, j0, w);
                for (u32 i = 0; i < 8; i++, values++)
                    if (!same(w[i], dequant_value(K, p, j0 + i)) && bad++ < 3)
                        std::printf("%s value %u: %a, reference %a\n", name, j0 + i, w[i], dequant_value(K, p, j0 + i));
            }
        std::free(row);
    }
    std::printf("dequant8 %s: %d values, %d differ\n", name, values, bad);
    return bad;
}

// The weights the decode-step dot product (row_dot over 32 lanes) uses, one
// at a time through one-hot x, against dequant_value; then a random x
// against a double-precision sum.
template <u32 K>
static int check_row_dot(const char *name, u32 k) {
    u32 len = BlockOf<K>::len, bytes = BlockOf<K>::bytes;
    unsigned char *row = random_row<K>(k / len, true);
    auto *x = static_cast<float *>(std::aligned_alloc(64, k * sizeof(float)));
    int bad = 0;
    for (u32 j = 0; j < k; j++) {
        for (u32 i = 0; i < k; i++) x[i] = i == j ? 1.0f : 0.0f;
        float got = 0.0f;
        for (u32 lane = 0; lane < 32; lane++) got += row_dot<K>(row, x, k, lane);
        float want = dequant_value(K, row + (j / len) * bytes, j % len);
        if (!same(got, want) && !(got == 0.0f && want == 0.0f) && bad++ < 3)
            std::printf("%s k %u weight %u: %a, reference %a\n", name, k, j, got, want);
    }
    double sum = 0.0, mag = 0.0;
    for (u32 i = 0; i < k; i++) x[i] = (float)((int)next_byte() - 128) / 64.0f;
    for (u32 j = 0; j < k; j++) {
        double p = (double)dequant_value(K, row + (j / len) * bytes, j % len) * x[j];
        sum += p;
        mag += std::fabs(p);
    }
    float got = 0.0f;
    for (u32 lane = 0; lane < 32; lane++) got += row_dot<K>(row, x, k, lane);
    if (!(std::fabs(got - sum) <= 1e-5 * mag)) {
        std::printf("%s k %u: dot %g, reference %g\n", name, k, got, sum);
        bad++;
    }
    std::printf("row_dot %s k=%u: %d differ\n", name, k, bad);
    std::free(row);
    std::free(x);
    return bad;
}

// f16_bits_to_f32 (branch-free) against the definition, all 65536 halves.
static int check_f16() {
    int bad = 0;
    for (u32 h = 0; h < 65536; h++) {
        u32 sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu, bits;
        if (exp == 0) bits = __float_as_uint((float)mant * 5.9604644775390625e-8f) | sign;
        else if (exp == 31) bits = sign | (mant ? 0x7fc00000u : 0x7f800000u) | (mant << 13);
        else bits = sign | ((exp + 112u) << 23) | (mant << 13);
        if (__float_as_uint(f16_bits_to_f32((u16)h)) != bits && bad++ < 3) std::printf("f16 %04x differs\n", h);
    }
    std::printf("f16_bits_to_f32: 65536 halves, %d differ\n", bad);
    return bad;
}

// e4m3_to_f32 against the format's definition, all 256 bytes.
static int check_e4m3() {
    int bad = 0;
    for (u32 b = 0; b < 256; b++) {
        u32 exp = (b >> 3) & 0xfu, man = b & 7u;
        float mag = exp == 0 ? (float)man / 512.0f : std::ldexp(1.0f + (float)man / 8.0f, (int)exp - 7);
        float want = (b & 0x80u) ? -mag : mag;
        float got = e4m3_to_f32(b);
        bool ok = (exp == 15 && man == 7) ? std::isnan(got) : same(got, want);
        if (!ok && bad++ < 3) std::printf("e4m3 %02x: %a, definition %a\n", b, got, want);
    }
    std::printf("e4m3_to_f32: 256 bytes, %d differ\n", bad);
    return bad;
}

// One MXFP4 block against gguf-py 0.19's dequantize of it (llama.cpp's
// formula), so the reference decoder itself is tied to the format here.
static int check_mxfp4_vector() {
    const unsigned char block[17] = {0x78, 0x87, 0xea, 0x6b, 0xde, 0xa6, 0xc8, 0xde, 0x20,
                                     0x04, 0x07, 0xf6, 0x44, 0xda, 0x6c, 0x49, 0xbe};
    const float want[32] = {0.046875f, -0.0078125f, -0.01171875f, -0.03125f, 0.03125f, 0.0f, -0.03125f, 0.0f,
                            0.015625f, 0.046875f, 0.03125f, 0.015625f, -0.0078125f, -0.015625f, -0.00390625f,
                            -0.03125f, 0.0f, -0.03125f, 0.03125f, -0.0234375f, -0.0078125f, -0.015625f, -0.0234375f,
                            0.0078125f, 0.0f, 0.0f, -0.046875f, 0.015625f, -0.0234375f, 0.03125f, 0.015625f,
                            -0.01171875f};
    int bad = 0;
    for (u32 j = 0; j < 32; j++)
        if (dequant_value(GGML_MXFP4, block, j) != want[j] && bad++ < 3)
            std::printf("MXFP4 value %u: %a, gguf-py %a\n", j, dequant_value(GGML_MXFP4, block, j), want[j]);
    std::printf("MXFP4 against gguf-py: 32 values, %d differ\n", bad);
    return bad;
}

int main() {
    int bad = check_f16() + check_e4m3() + check_mxfp4_vector();
    bad += check_dequant8<MT_FP8_B128>("FP8_B128");
    for (u32 k : {128u, 384u, 2048u}) bad += check_row_dot<MT_FP8_B128>("FP8_B128", k);
    bad += check_dequant8<GGML_Q8_0>("Q8_0") + check_dequant8<GGML_Q4_K>("Q4_K") + check_dequant8<GGML_Q5_K>("Q5_K") +
           check_dequant8<GGML_Q6_K>("Q6_K");
    // Rows of one and several blocks; 768 and 1280 leave lanes idle.
    for (u32 k : {256u, 768u, 1280u, 2048u}) {
        bad += check_row_dot<GGML_Q4_K>("Q4_K", k) + check_row_dot<GGML_Q5_K>("Q5_K", k) +
               check_row_dot<GGML_Q6_K>("Q6_K", k);
    }
    for (u32 k : {32u, 96u, 544u, 2048u}) bad += check_row_dot<GGML_Q8_0>("Q8_0", k);
    bad += check_dequant8<GGML_MXFP4>("MXFP4");
    for (u32 k : {32u, 96u, 544u, 2880u}) bad += check_row_dot<GGML_MXFP4>("MXFP4", k);
    std::printf("%s\n", bad ? "FAILED" : "all identical");
    return bad ? 1 : 0;
}
