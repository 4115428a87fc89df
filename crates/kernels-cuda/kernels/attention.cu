// attention.cu: NeoX RoPE, causal attention scores, softmax and softmax·V
// over a per-layer KV cache of [positions, nkv*hd].
#include "common.cuh"

// Per-step values live in device memory (so that a captured decode step
// replays at any position): `start` points to the step's first position.
// A step of t_len rows at start sees start + t_len cached positions.

// Thread (t, head, i < hd/2): the pair (i, i + hd/2) of a head starting at
// column col_start + head*hd of row t; angle = position * theta^(-2i/hd) in
// double. parts = 2 rotates a second set of heads of the same rows in the
// same launch (q and k: heads1 heads from col_start1 into out1), each
// element computed exactly as with one part.
extern "C" __global__ void rope_f32(float *out0, float *out1, const float *x, u32 parts, u32 t_len, u32 in_width, u32 col_start0, u32 heads0, u32 col_start1, u32 heads1, u32 hd, double theta, const u32 *start) {
    PDL_ENTRY();
    u32 half = hd / 2;
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x, first = (u64)t_len * heads0 * half;
    if (i >= first + (parts == 2 ? (u64)t_len * heads1 * half : 0)) return;
    bool second = i >= first;
    if (second) i -= first;
    float *out = second ? out1 : out0;
    u32 heads = second ? heads1 : heads0, col_start = second ? col_start1 : col_start0;
    u32 start_position = *start;
    u32 p = (u32)(i % half), head = (u32)((i / half) % heads), t = (u32)(i / ((u64)half * heads));
    double angle = (double)(start_position + t) * pow(theta, -2.0 * (double)p / (double)hd);
    double s, c;
    sincos(angle, &s, &c);
    const float *xh = x + (u64)t * in_width + col_start + head * hd;
    float *oh = out + (u64)t * heads * hd + head * hd;
    double a = xh[p], b = xh[p + half];
    oh[p] = store_act((float)(a * c - b * s));
    oh[p + half] = store_act((float)(b * c + a * s));
}

// The KV cache append, keys and values in one launch: for r < rows and
// c < width, k_cache[(start + r) * width + c] = k[r * k_width + c] and
// v_cache[(start + r) * width + c] = v[r * v_width + v_col + c].
extern "C" __global__ void append_kv_f32(float *k_cache, float *v_cache, const float *k, const float *v, const u32 *start, u32 rows, u32 k_width, u32 v_width, u32 v_col, u32 width) {
    PDL_ENTRY();
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x, n = (u64)rows * width;
    if (i >= 2 * n) return;
    bool value = i >= n;
    u64 j = value ? i - n : i;
    u32 r = (u32)(j / width), c = (u32)(j % width);
    float x = value ? v[(u64)r * v_width + v_col + c] : k[(u64)r * k_width + c];
    (value ? v_cache : k_cache)[((u64)*start + r) * width + c] = store_act(x);
}

// scores[h, t, p] = q[t, h] · k[p, h / group] / sqrt(hd), 0 where p > start + t.
// Block (p tile, t tile, h) of 32 x 32 scores, 256 threads: thread (tx, ty)
// computes p = p0 + tx for rows t0 + ty + 8i, i < 4. q and k rows are staged
// through shared memory 64 dims at a time (padded: no bank conflicts), so
// each is read from memory once per tile. Each score sums over d in order.
#define AS_TILE 32
#define AS_D 64
extern "C" __global__ void __launch_bounds__(256) attn_scores_f32(float *scores, const float *q, const float *k_cache, u32 t_len, u32 p_len, u32 heads, u32 kv_heads, u32 hd, u32 start_position) {
    PDL_ENTRY();
    __shared__ float qs[AS_TILE][AS_D + 1];
    __shared__ float ks[AS_TILE][AS_D + 1];
    u32 p0 = blockIdx.x * AS_TILE, t0 = blockIdx.y * AS_TILE, h = blockIdx.z;
    u32 tx = threadIdx.x & 31, ty = threadIdx.x >> 5;
    u32 kvh = h / (heads / kv_heads);
    u32 p = p0 + tx;
    // A tile wholly above the diagonal is all masked: zeros, no reads.
    bool all_masked = p0 > start_position + min(t0 + AS_TILE - 1, t_len - 1);
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (!all_masked) {
        for (u32 d0 = 0; d0 < hd; d0 += AS_D) {
            u32 dn = min(AS_D, hd - d0);
            for (u32 i = threadIdx.x; i < AS_TILE * AS_D; i += blockDim.x) {
                u32 r = i / AS_D, c = i % AS_D;
                bool in_d = c < dn;
                qs[r][c] = (in_d && t0 + r < t_len) ? q[(u64)(t0 + r) * heads * hd + h * hd + d0 + c] : 0.0f;
                ks[r][c] = (in_d && p0 + r < p_len) ? k_cache[(u64)(p0 + r) * kv_heads * hd + kvh * hd + d0 + c] : 0.0f;
            }
            __syncthreads();
            for (u32 c = 0; c < dn; c++) {
                float kv = ks[tx][c];
                for (int i = 0; i < 4; i++) acc[i] += qs[ty + 8 * i][c] * kv;
            }
            __syncthreads();
        }
    }
    float scale = rsqrtf((float)hd);
    for (int i = 0; i < 4; i++) {
        u32 t = t0 + ty + 8 * i;
        if (t >= t_len || p >= p_len) continue;
        u64 at = ((u64)h * t_len + t) * p_len + p;
        scores[at] = p > start_position + t ? 0.0f : store_act(acc[i] * scale);
    }
}

// attn_scores for a single row (decode: it sees every cached position,
// P = start + 1) with hd % 4 == 0: block (chunk, h) of 8 warps; warp w of
// the grid's row computes p = w, w + 8 * gridDim.x, ... (a fixed grid for
// every P), one score per warp with 16-byte loads of q and k.
extern "C" __global__ void __launch_bounds__(256) attn_scores_row_f32(float *scores, const float *q, const float *k_cache, const u32 *start, u32 heads, u32 kv_heads, u32 hd) {
    PDL_ENTRY();
    u32 lane = threadIdx.x & 31, h = blockIdx.y, p_len = *start + 1;
    u32 kvh = h / (heads / kv_heads);
    const float4 *qv = (const float4 *)(q + (u64)h * hd);
    for (u32 p = blockIdx.x * 8 + (threadIdx.x >> 5); p < p_len; p += gridDim.x * 8) {
        const float4 *kv = (const float4 *)(k_cache + (u64)p * kv_heads * hd + kvh * hd);
        float acc = 0.0f;
        for (u32 i = lane; i < hd / 4; i += 32) {
            float4 a = qv[i], b = __ldg(kv + i);
            acc += a.x * b.x;
            acc += a.y * b.y;
            acc += a.z * b.z;
            acc += a.w * b.w;
        }
        for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, o);
        if (lane == 0) scores[(u64)h * p_len + p] = store_act(acc * rsqrtf((float)hd));
    }
}

// One warp per (h, t) row of P = start + t_len: causal softmax over the
// first start + t + 1 entries (max and NaN flag exact across lanes; the
// sum reduced once and broadcast, so every lane divides by the same value).
extern "C" __global__ void attn_softmax_f32(float *out, const float *scores, u32 rows, u32 t_len, const u32 *start) {
    PDL_ENTRY();
    u64 r = ((u64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (r >= rows) return; // uniform across the warp
    u32 lane = threadIdx.x & 31;
    u32 start_position = *start, p_len = start_position + t_len;
    u32 valid = min(start_position + (u32)(r % t_len) + 1, p_len);
    const float *s = scores + r * p_len;
    float *o = out + r * p_len;
    float m = -INFINITY;
    bool nan = false;
    for (u32 p = lane; p < valid; p += 32) { m = fmaxf(m, s[p]); nan |= isnan(s[p]); }
    for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
    nan = __any_sync(0xffffffffu, nan);
    float sum = 0.0f;
    for (u32 p = lane; p < valid; p += 32) sum += expf(s[p] - m);
    for (int off = 16; off > 0; off >>= 1) sum += __shfl_down_sync(0xffffffffu, sum, off);
    sum = __shfl_sync(0xffffffffu, sum, 0);
    for (u32 p = lane; p < p_len; p += 32) o[p] = p < valid ? store_act(nan ? QUIET_NAN : expf(s[p] - m) / sum) : 0.0f;
}

// out[t, h*hd + d] = Σ_p probs[h, t, p] · v[p, kvh*hd + d], over every p
// (masked probabilities are exact zeros). Block (t tile of 16 and split s,
// h, d chunk of 128), thread d: 16 rows at once, probabilities staged
// through shared memory 32 positions at a time, each v element read once
// per block. With one split the block covers every p and stores the
// result; with several (few rows, long contexts: decode) split s covers
// positions [s * split_len, (s + 1) * split_len) and stores its partial
// sums, unrounded, at out + s * T * nh * hd for attention_combine_f32.
// Each sum runs over p in order.
#define AV_ROWS 16
#define AV_P 32
extern "C" __global__ void __launch_bounds__(128) attention_f32(float *out, const float *probs, const float *v_cache, u32 t_len, u32 p_len, u32 heads, u32 kv_heads, u32 hd, u32 split_len, u32 splits) {
    PDL_ENTRY();
    __shared__ float ps[AV_ROWS][AV_P];
    u32 split = blockIdx.x % splits, t0 = (blockIdx.x / splits) * AV_ROWS;
    u32 h = blockIdx.y, d = blockIdx.z * blockDim.x + threadIdx.x;
    u32 kvh = h / (heads / kv_heads);
    u32 p_begin = split * split_len, p_end = min(p_len, p_begin + split_len);
    float acc[AV_ROWS];
    for (int i = 0; i < AV_ROWS; i++) acc[i] = 0.0f;
    for (u32 p0 = p_begin; p0 < p_end; p0 += AV_P) {
        for (u32 i = threadIdx.x; i < AV_ROWS * AV_P; i += blockDim.x) {
            u32 r = i / AV_P, c = i % AV_P;
            ps[r][c] = (t0 + r < t_len && p0 + c < p_end) ? probs[((u64)h * t_len + t0 + r) * p_len + p0 + c] : 0.0f;
        }
        __syncthreads();
        if (d < hd) {
            u32 pn = min(AV_P, p_end - p0);
            for (u32 c = 0; c < pn; c++) {
                float v = v_cache[(u64)(p0 + c) * kv_heads * hd + kvh * hd + d];
                for (int i = 0; i < AV_ROWS; i++) acc[i] += ps[i][c] * v;
            }
        }
        __syncthreads();
    }
    if (d >= hd) return;
    u64 row = (u64)heads * hd;
    for (int i = 0; i < AV_ROWS; i++) {
        u32 t = t0 + i;
        if (t >= t_len) break;
        if (splits == 1) out[t * row + h * hd + d] = store_act(acc[i]);
        else out[(u64)split * t_len * row + t * row + h * hd + d] = acc[i];
    }
}

// attention for a single row (decode, P = start + 1) with hd % 4 == 0 and
// hd <= 128: block (split s, h) of 4 warps over positions [s * ROW_SPLIT,
// (s + 1) * ROW_SPLIT); blocks past the last split exit (the grid is fixed
// for a cache's capacity). Lane l holds dims 4l..4l+3, warp w sums positions
// p_begin + w, + 4, ... of its split; the four warps' sums are added in warp
// order and stored, unrounded, at out + s * nh * hd for
// attention_combine_f32.
#define ROW_SPLIT 64
extern "C" __global__ void __launch_bounds__(128) attention_row_f32(float *out, const float *probs, const float *v_cache, const u32 *start, u32 heads, u32 kv_heads, u32 hd) {
    PDL_ENTRY();
    __shared__ float4 part[4][32];
    u32 split = blockIdx.x, h = blockIdx.y, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    u32 p_len = *start + 1;
    u32 p_begin = split * ROW_SPLIT, p_end = min(p_len, p_begin + ROW_SPLIT);
    if (p_begin >= p_len) return; // uniform across the block
    u32 kvh = h / (heads / kv_heads);
    float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (lane < hd / 4) {
        const float *pr = probs + (u64)h * p_len;
        for (u32 p = p_begin + warp; p < p_end; p += 4) {
            float w = pr[p];
            float4 v = __ldg((const float4 *)(v_cache + (u64)p * kv_heads * hd + kvh * hd) + lane);
            acc.x += w * v.x;
            acc.y += w * v.y;
            acc.z += w * v.z;
            acc.w += w * v.w;
        }
    }
    part[warp][lane] = acc;
    __syncthreads();
    if (warp != 0 || lane >= hd / 4) return;
    float4 sum = part[0][lane];
    for (int w = 1; w < 4; w++) {
        float4 o = part[w][lane];
        sum.x += o.x;
        sum.y += o.y;
        sum.z += o.z;
        sum.w += o.w;
    }
    *(float4 *)(out + (u64)split * heads * hd + (u64)h * hd + 4 * lane) = sum;
}

// out[i] = Σ_s partial[s * n + i] over the splits of split_len positions
// that P = start + t_len has, in order (attention_f32's and
// attention_row_f32's splits).
extern "C" __global__ void attention_combine_f32(float *out, const float *partial, u64 n, const u32 *start, u32 t_len, u32 split_len) {
    PDL_ENTRY();
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    u32 splits = (*start + t_len + split_len - 1) / split_len;
    float acc = partial[i];
    for (u32 s = 1; s < splits; s++) acc += partial[s * n + i];
    out[i] = store_act(acc);
}
