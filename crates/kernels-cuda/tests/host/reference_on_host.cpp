// kernels/reference.cu compiled by the host's C++ compiler and run one
// thread per block (so __syncthreads has nothing to order): the reference
// kernel's own loop, chunks, lanes and tail, on the CPU. Reads from stdin
//   i32 m, n, k, format (ggml type id), round_bf16, weight bytes;
//   f32 xt[k][m]; the weight's bytes
// and writes f32 out[m][n] to stdout. Built and run by
// crates/pipeline/tests/reference_on_host.rs, which holds every output to
// math.rs's product bit for bit. Doubles are IEEE binary64 with one
// rounding per operation on x86-64 (SSE2; built with -ffp-contract=off).
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
#define __launch_bounds__(...)
#define __shared__ static
static void __syncthreads() {}
using std::min;
struct Dim3 { unsigned x, y, z; };
static Dim3 threadIdx, blockIdx, blockDim, gridDim;
static float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
static unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
static float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }

#include "../../kernels/reference.cu"

template <typename T>
static bool read_all(T *dst, size_t count) {
    return std::fread(dst, sizeof(T), count, stdin) == count;
}

int main() {
    int head[6];
    if (!read_all(head, 6)) return 2;
    const int m = head[0], n = head[1], k = head[2], format = head[3], round_bf16 = head[4];
    std::vector<float> xt((size_t)m * k);
    std::vector<unsigned char> w((size_t)head[5]);
    if (!read_all(xt.data(), xt.size()) || !read_all(w.data(), w.size())) return 2;
    std::vector<float> out((size_t)m * n, -1.0f);
    blockDim = {1, 1, 1};
    gridDim = {(unsigned)n, (unsigned)m, 1};
    threadIdx = {0, 0, 0};
    for (unsigned y = 0; y < gridDim.y; ++y) {
        for (unsigned x = 0; x < gridDim.x; ++x) {
            blockIdx = {x, y, 0};
            ref_matmul_t(xt.data(), w.data(), format, round_bf16, out.data(), m, n, k);
        }
    }
    return std::fwrite(out.data(), sizeof(float), out.size(), stdout) == out.size() ? 0 : 3;
}
