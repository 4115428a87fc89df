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

// Fused causal attention over many rows, without [nh, T, P] in memory:
// scores, causal softmax and softmax·V of a block's rows in one kernel.
// Block (t tile of FA_ROWS rows, h), 128 threads, hd <= FA_MAX_HD. Each
// score is computed exactly as attn_scores_f32 computes it (one f32 FMA
// chain over d in order, times 1/sqrt(hd), rounded as a stage output).
// Pass 1 keeps, per row and lane, a running max and a running sum of
// exp(score - max) over positions p = p0 + lane of each 32-position tile
// (rescaled when the max grows), then combines the lanes. Pass 2 computes
// the scores again, each probability exp(score - max) / sum (NaN for every
// valid entry of a row holding a NaN score, as attn_softmax_f32), rounded
// as a stage output, and adds probability · v over p in order into f32
// accumulators (one FMA per position, as attention_f32).
//
// `store` says what the kernel writes: FA_SCORES the scores [nh, T, P]
// (pass 1 only), FA_PROBS the probabilities [nh, T, P], FA_OUT the output
// [T, nh*hd]. Every write is a store switched on: the values computed are
// the same whichever are stored, so a stage materialised for capture has
// the bits the fused output was computed from. Masked entries (p > start
// + t) are stored as 0, positions past the block's last valid one too.
#define FA_ROWS 16
#define FA_P 32
#define FA_MAX_HD 128
#define FA_SCORES 1u
#define FA_PROBS 2u
#define FA_OUT 4u

// The scores of tile p0 for this thread's rows (ty + 4i) at p = p0 + lane,
// from the block's q rows in shared memory and the tile's keys, staged here.
__device__ __forceinline__ void fa_tile_scores(float s[4], float (*qs)[FA_MAX_HD + 1], float (*ks)[FA_MAX_HD + 1], const float *k_cache, u32 p0, u32 p_len, u32 kv_width, u32 kvh, u32 hd, float scale) {
    __syncthreads(); // the last tile's keys are no longer read
    for (u32 i = threadIdx.x; i < FA_P * hd; i += blockDim.x) {
        u32 r = i / hd, c = i % hd;
        ks[r][c] = p0 + r < p_len ? k_cache[(u64)(p0 + r) * kv_width + kvh * hd + c] : 0.0f;
    }
    __syncthreads();
    u32 lane = threadIdx.x & 31, ty = threadIdx.x >> 5;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (u32 c = 0; c < hd; c++) {
        float kv = ks[lane][c];
        for (int i = 0; i < 4; i++) acc[i] += qs[ty + 4 * i][c] * kv;
    }
    for (int i = 0; i < 4; i++) s[i] = store_act(acc[i] * scale);
}

// Stores 0 at positions [p_hi, p_len) of this thread's rows of a
// [nh, T, P] output (positions no row of the block sees).
__device__ __forceinline__ void fa_zero_tail(float *dst, u32 h, u32 t0, u32 t_len, u32 p_hi, u32 p_len) {
    u32 lane = threadIdx.x & 31, ty = threadIdx.x >> 5;
    for (u32 p = p_hi + lane; p < p_len; p += 32)
        for (int i = 0; i < 4; i++) {
            u32 t = t0 + ty + 4 * i;
            if (t < t_len) dst[((u64)h * t_len + t) * p_len + p] = 0.0f;
        }
}

extern "C" __global__ void __launch_bounds__(128) attention_fused_f32(float *out, float *scores, float *probs, const float *q, const float *k_cache, const float *v_cache, u32 t_len, u32 p_len, u32 heads, u32 kv_heads, u32 hd, u32 start_position, u32 store) {
    PDL_ENTRY();
    __shared__ float qs[FA_ROWS][FA_MAX_HD + 1];
    __shared__ float ks[FA_P][FA_MAX_HD + 1];
    __shared__ float ps[FA_ROWS][FA_P];
    u32 t0 = blockIdx.x * FA_ROWS, h = blockIdx.y;
    u32 lane = threadIdx.x & 31, ty = threadIdx.x >> 5;
    u32 kvh = h / (heads / kv_heads), kv_width = kv_heads * hd;
    float scale = rsqrtf((float)hd);
    for (u32 i = threadIdx.x; i < FA_ROWS * hd; i += blockDim.x) {
        u32 r = i / hd, c = i % hd;
        qs[r][c] = t0 + r < t_len ? q[(u64)(t0 + r) * heads * hd + h * hd + c] : 0.0f;
    }
    // Positions some row of the block sees: [0, p_hi).
    u32 last_row = min(t0 + FA_ROWS, t_len) - 1;
    u32 p_hi = min(p_len, start_position + last_row + 1);
    // Pass 1: per (row, lane) running max, sum and NaN flag.
    float m[4], l[4];
    bool nan[4];
    for (int i = 0; i < 4; i++) { m[i] = -INFINITY; l[i] = 0.0f; nan[i] = false; }
    for (u32 p0 = 0; p0 < p_hi; p0 += FA_P) {
        float s[4];
        fa_tile_scores(s, qs, ks, k_cache, p0, p_len, kv_width, kvh, hd, scale);
        u32 p = p0 + lane;
        for (int i = 0; i < 4; i++) {
            u32 t = t0 + ty + 4 * i;
            if (t >= t_len) continue;
            bool valid = p <= start_position + t && p < p_len;
            if (store & FA_SCORES && p < p_len) scores[((u64)h * t_len + t) * p_len + p] = valid ? s[i] : 0.0f;
            if (!valid) continue;
            nan[i] |= isnan(s[i]);
            if (s[i] > m[i]) { l[i] *= expf(m[i] - s[i]); m[i] = s[i]; }
            l[i] += expf(s[i] - m[i]);
        }
    }
    if (store & FA_SCORES) fa_zero_tail(scores, h, t0, t_len, p_hi, p_len);
    if (!(store & (FA_PROBS | FA_OUT))) return; // uniform across the block
    // Each row's max and sum over its lanes (every lane ends with both).
    for (int i = 0; i < 4; i++) {
        float row_max = m[i];
        for (int o = 16; o > 0; o >>= 1) row_max = fmaxf(row_max, __shfl_xor_sync(0xffffffffu, row_max, o));
        float part = m[i] == -INFINITY ? 0.0f : l[i] * expf(m[i] - row_max);
        for (int o = 16; o > 0; o >>= 1) part += __shfl_down_sync(0xffffffffu, part, o);
        l[i] = __shfl_sync(0xffffffffu, part, 0);
        m[i] = row_max;
        nan[i] = __any_sync(0xffffffffu, nan[i]);
    }
    // Pass 2: probabilities, and probability · v.
    float acc[FA_ROWS];
    for (int r = 0; r < FA_ROWS; r++) acc[r] = 0.0f;
    u32 d = threadIdx.x;
    for (u32 p0 = 0; p0 < p_hi; p0 += FA_P) {
        float s[4];
        fa_tile_scores(s, qs, ks, k_cache, p0, p_len, kv_width, kvh, hd, scale);
        u32 p = p0 + lane;
        for (int i = 0; i < 4; i++) {
            u32 t = t0 + ty + 4 * i;
            bool valid = t < t_len && p <= start_position + t && p < p_len;
            float pr = valid ? store_act(nan[i] ? QUIET_NAN : expf(s[i] - m[i]) / l[i]) : 0.0f;
            ps[ty + 4 * i][lane] = pr;
            if (store & FA_PROBS && t < t_len && p < p_len) probs[((u64)h * t_len + t) * p_len + p] = pr;
        }
        __syncthreads();
        if (store & FA_OUT && d < hd) {
            u32 pn = min(FA_P, p_hi - p0);
            for (u32 c = 0; c < pn; c++) {
                float v = v_cache[(u64)(p0 + c) * kv_width + kvh * hd + d];
                for (int r = 0; r < FA_ROWS; r++) acc[r] += ps[r][c] * v;
            }
        }
    }
    if (store & FA_PROBS) fa_zero_tail(probs, h, t0, t_len, p_hi, p_len);
    if (!(store & FA_OUT) || d >= hd) return;
    for (int r = 0; r < FA_ROWS; r++) {
        u32 t = t0 + r;
        if (t < t_len) out[(u64)t * heads * hd + h * hd + d] = store_act(acc[r]);
    }
}

// attention_fused_f32 on tensor cores, for the Bf16 backend (q and the
// caches hold bf16 values, so converting them to bf16 is exact) with
// hd % 16 == 0 and hd <= FM_HD: block (t tile of FM_ROWS rows, h), 8
// warps: warps w and w + 4 take the same 16 rows and compute the same
// scores and softmax statistics, and each accumulates softmax·V for its
// half of hd (twice the warps a block has for the same registers a
// thread holds: the kernel is latency-bound); positions FM_P at a time,
// their scores computed half a tile (FM_HALF n-tiles) at a time so that a
// thread fits 128 registers (two blocks an SM) without spilling. Scores are mma.sync m16n8k16
// products (bf16 inputs, f32 accumulation), scaled and rounded as a stage
// output; pass 1 keeps each row's running max (uniform across the 4 lanes
// that hold a row) and each lane's running sum; pass 2 computes the same
// scores again, the probabilities exp(s - max) / sum rounded to bf16 (NaN
// for every valid entry of a row with a NaN score), and probabilities · v
// with mma.sync, the probabilities taken from the score accumulators as
// the A operand. Stores as attention_fused_f32 (`store`); the values do not
// depend on what is stored.
#define FM_ROWS 64
#define FM_P 64
#define FM_HD 128
#define FM_PAD 8

// Rows [r0, r0 + FM_P) of a [*, width] f32 matrix, columns [col, col + hd),
// into dst as bf16 (rows at or past `rows` zero); hd % 4 == 0.
__device__ __forceinline__ void fm_load_rows(u16 (*dst)[FM_HD + FM_PAD], const float *src, u32 r0, u32 rows, u32 width, u32 col, u32 hd) {
    u32 quads = hd / 4;
    for (u32 i = threadIdx.x; i < FM_P * quads; i += blockDim.x) {
        u32 r = i / quads, c = (i % quads) * 4;
        float4 x = r0 + r < rows ? *(const float4 *)(src + (u64)(r0 + r) * width + col + c) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        *(uint2 *)&dst[r][c] = make_uint2(pack_bf16(x.x, x.y), pack_bf16(x.z, x.w));
    }
}

// The same rows transposed: dst[c][r] (v as the B operand of P·V).
__device__ __forceinline__ void fm_load_rows_t(u16 (*dst)[FM_P + FM_PAD], const float *src, u32 r0, u32 rows, u32 width, u32 col, u32 hd) {
    u32 quads = hd / 4;
    for (u32 i = threadIdx.x; i < FM_P * quads; i += blockDim.x) {
        u32 r = i / quads, c = (i % quads) * 4;
        float4 x = r0 + r < rows ? *(const float4 *)(src + (u64)(r0 + r) * width + col + c) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        dst[c][r] = f32_to_bf16_bits(x.x);
        dst[c + 1][r] = f32_to_bf16_bits(x.y);
        dst[c + 2][r] = f32_to_bf16_bits(x.z);
        dst[c + 3][r] = f32_to_bf16_bits(x.w);
    }
}

// One tile of scores: s[nt][e] for rows (g, g + 8) of the warp and
// positions nt * 8 + 2 * (lane & 3) + (e & 1), scaled and rounded.
// Half a tile at a time (FM_HALF n-tiles of 8 positions from n-tile nt0),
// so that fewer accumulators are live.
#define FM_HALF (FM_P / 16)
__device__ __forceinline__ void fm_scores(float s[FM_HALF][4], const u32 qf[FM_HD / 16][4], u16 (*ks)[FM_HD + FM_PAD], u32 hd, float scale, u32 nt0) {
    u32 lane = threadIdx.x & 31, g = lane >> 2, qd = lane & 3;
#pragma unroll
    for (int nt = 0; nt < FM_HALF; nt++) {
        s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
        for (int kstep = 0; kstep < FM_HD / 16; kstep++) {
            if (kstep * 16 >= hd) break;
            u32 kk = kstep * 16;
            u32 b0 = *(const u32 *)&ks[(nt0 + nt) * 8 + g][kk + 2 * qd];
            u32 b1 = *(const u32 *)&ks[(nt0 + nt) * 8 + g][kk + 2 * qd + 8];
            mma_bf16_16816(s[nt], qf[kstep][0], qf[kstep][1], qf[kstep][2], qf[kstep][3], b0, b1);
        }
#pragma unroll
        for (int e = 0; e < 4; e++) s[nt][e] = store_act(s[nt][e] * scale);
    }
}

extern "C" __global__ void __launch_bounds__(256, 2) attention_fused_mma(float *out, float *scores, float *probs, const float *q, const float *k_cache, const float *v_cache, u32 t_len, u32 p_len, u32 heads, u32 kv_heads, u32 hd, u32 start_position, u32 store) {
    PDL_ENTRY();
    __shared__ __align__(16) u16 ks[FM_P][FM_HD + FM_PAD];
    __shared__ __align__(16) u16 vt[FM_HD][FM_P + FM_PAD];
    // The last row tiles, which see the most positions, start first.
    u32 t0 = (gridDim.x - 1 - blockIdx.x) * FM_ROWS, h = blockIdx.y;
    u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, qd = lane & 3;
    u32 kvh = h / (heads / kv_heads), kv_width = kv_heads * hd, q_width = heads * hd;
    float scale = rsqrtf((float)hd);
    // The warp's q rows as A fragments, through shared memory.
    fm_load_rows(ks, q, t0, t_len, q_width, h * hd, hd);
    __syncthreads();
    u32 qf[FM_HD / 16][4];
    // Rows r0..r0+16; output columns [d0, d0 + hd / 2).
    u32 r0 = (warp & 3) * 16, half_group = warp >> 2, d0 = half_group * (hd / 2);
#pragma unroll
    for (int kstep = 0; kstep < FM_HD / 16; kstep++) {
        u32 kk = kstep * 16;
        bool in = kk < hd;
        qf[kstep][0] = in ? *(const u32 *)&ks[r0 + g][kk + 2 * qd] : 0u;
        qf[kstep][1] = in ? *(const u32 *)&ks[r0 + g + 8][kk + 2 * qd] : 0u;
        qf[kstep][2] = in ? *(const u32 *)&ks[r0 + g][kk + 2 * qd + 8] : 0u;
        qf[kstep][3] = in ? *(const u32 *)&ks[r0 + g + 8][kk + 2 * qd + 8] : 0u;
    }
    u32 rows[2] = {t0 + r0 + g, t0 + r0 + g + 8};
    u32 last_row = min(t0 + FM_ROWS, t_len) - 1;
    u32 p_hi = min(p_len, start_position + last_row + 1);
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
    bool nan[2] = {false, false};
    float s[FM_HALF][4];
    // Pass 1: running max (per row) and sums (per lane), half a tile at a time.
    for (u32 p0 = 0; p0 < p_hi; p0 += FM_P) {
        __syncthreads();
        fm_load_rows(ks, k_cache, p0, p_len, kv_width, kvh * hd, hd);
        __syncthreads();
      for (u32 half = 0; half < 2; half++) {
        fm_scores(s, qf, ks, hd, scale, half * FM_HALF);
        float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int nt = 0; nt < FM_HALF; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                u32 t = rows[e >> 1], p = p0 + (half * FM_HALF + nt) * 8 + 2 * qd + (e & 1);
                bool valid = t < t_len && p < p_len && p <= start_position + t;
                if (store & FA_SCORES && half_group == 0 && t < t_len && p < p_len) scores[((u64)h * t_len + t) * p_len + p] = valid ? s[nt][e] : 0.0f;
                if (!valid) s[nt][e] = -INFINITY; // no weight below
                else if (isnan(s[nt][e])) nan[e >> 1] = true;
                else tile_max[e >> 1] = fmaxf(tile_max[e >> 1], s[nt][e]);
            }
#pragma unroll
        for (int r = 0; r < 2; r++) {
            float mx = tile_max[r];
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            float m_new = fmaxf(m[r], mx);
            if (m_new == -INFINITY) continue; // nothing valid in this row yet
            l[r] *= expf(m[r] - m_new);
            m[r] = m_new;
#pragma unroll
            for (int nt = 0; nt < FM_HALF; nt++) {
                float a = s[nt][2 * r], b = s[nt][2 * r + 1];
                if (a != -INFINITY) l[r] += expf(a - m_new);
                if (b != -INFINITY) l[r] += expf(b - m_new);
            }
        }
      }
    }
    if (store & (FA_PROBS | FA_OUT)) {
#pragma unroll
        for (int r = 0; r < 2; r++) {
            l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
            l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
            bool any = nan[r];
            any |= __shfl_xor_sync(0xffffffffu, (int)any, 1) != 0;
            any |= __shfl_xor_sync(0xffffffffu, (int)any, 2) != 0;
            nan[r] = any;
        }
        // Pass 2: probabilities and probabilities · v.
        float o[FM_HD / 16][4]; // columns d0 + 8 * i + ...
#pragma unroll
        for (int i = 0; i < FM_HD / 16; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
        for (u32 p0 = 0; p0 < p_hi; p0 += FM_P) {
            __syncthreads();
            fm_load_rows(ks, k_cache, p0, p_len, kv_width, kvh * hd, hd);
            if (store & FA_OUT) fm_load_rows_t(vt, v_cache, p0, p_len, kv_width, kvh * hd, hd);
            __syncthreads();
          for (u32 half = 0; half < 2; half++) {
            fm_scores(s, qf, ks, hd, scale, half * FM_HALF);
#pragma unroll
            for (int nt = 0; nt < FM_HALF; nt++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    u32 t = rows[e >> 1], p = p0 + (half * FM_HALF + nt) * 8 + 2 * qd + (e & 1);
                    bool valid = t < t_len && p < p_len && p <= start_position + t;
                    float pr = valid ? store_act(nan[e >> 1] ? QUIET_NAN : expf(s[nt][e] - m[e >> 1]) / l[e >> 1]) : 0.0f;
                    if (store & FA_PROBS && half_group == 0 && t < t_len && p < p_len) probs[((u64)h * t_len + t) * p_len + p] = pr;
                    s[nt][e] = pr;
                }
            if (!(store & FA_OUT)) continue;
#pragma unroll
            for (int j = 0; j < FM_HALF / 2; j++) {
                u32 a0 = pack_bf16(s[2 * j][0], s[2 * j][1]), a1 = pack_bf16(s[2 * j][2], s[2 * j][3]);
                u32 a2 = pack_bf16(s[2 * j + 1][0], s[2 * j + 1][1]), a3 = pack_bf16(s[2 * j + 1][2], s[2 * j + 1][3]);
#pragma unroll
                for (int i = 0; i < FM_HD / 16; i++) {
                    if (i * 16 >= hd) break; // hd / 2 columns: hd / 16 tiles of 8
                    u32 col = d0 + i * 8, pos = half * (FM_P / 2) + j * 16;
                    u32 b0 = *(const u32 *)&vt[col + g][pos + 2 * qd];
                    u32 b1 = *(const u32 *)&vt[col + g][pos + 2 * qd + 8];
                    mma_bf16_16816(o[i], a0, a1, a2, a3, b0, b1);
                }
            }
          }
        }
        if (store & FA_OUT) {
#pragma unroll
            for (int i = 0; i < FM_HD / 16; i++) {
                if (i * 16 >= hd) break;
                u32 d = d0 + i * 8 + 2 * qd;
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    u32 t = rows[e >> 1];
                    if (t < t_len) out[(u64)t * q_width + h * hd + d + (e & 1)] = store_act(o[i][e]);
                }
            }
        }
    }
    // Positions no row of the block sees: stored as zeros.
    u32 width = p_len - p_hi, rows_here = last_row + 1 - t0;
    for (u32 i = threadIdx.x; i < rows_here * width; i += blockDim.x) {
        u64 at = ((u64)h * t_len + t0 + i / width) * p_len + p_hi + i % width;
        if (store & FA_SCORES) scores[at] = 0.0f;
        if (store & FA_PROBS) probs[at] = 0.0f;
    }
}
