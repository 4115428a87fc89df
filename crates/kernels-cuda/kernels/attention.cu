// attention.cu: NeoX RoPE, causal attention scores, softmax and softmax·V
// over a per-layer KV cache of [positions, nkv*hd].
#include "common.cuh"

// Thread (t, head, i < hd/2): the pair (i, i + hd/2) of a head starting at
// column col_start + head*hd of row t; angle = position * theta^(-2i/hd) in
// double.
extern "C" __global__ void rope_f32(float *out, const float *x, u32 t_len, u32 in_width, u32 col_start, u32 heads, u32 hd, double theta, u32 start_position) {
    u32 half = hd / 2;
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)t_len * heads * half) return;
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

// scores[h, t, p] = q[t, h] · k[p, h / group] / sqrt(hd), 0 where p > start + t.
extern "C" __global__ void attn_scores_f32(float *scores, const float *q, const float *k_cache, u32 t_len, u32 p_len, u32 heads, u32 kv_heads, u32 hd, u32 start_position) {
    u64 warp = ((u64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (warp >= (u64)heads * t_len * p_len) return;
    u32 p = (u32)(warp % p_len), t = (u32)((warp / p_len) % t_len), h = (u32)(warp / ((u64)p_len * t_len));
    u32 lane = threadIdx.x & 31;
    if (p > start_position + t) {
        if (lane == 0) scores[warp] = 0.0f;
        return;
    }
    u32 kvh = h / (heads / kv_heads);
    const float *qv = q + (u64)t * heads * hd + h * hd;
    const float *kv = k_cache + (u64)p * kv_heads * hd + kvh * hd;
    float acc = 0.0f;
    for (u32 i = lane; i < hd; i += 32) acc += qv[i] * kv[i];
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, o);
    if (lane == 0) scores[warp] = store_act(acc * rsqrtf((float)hd));
}

// One thread per (h, t) row: causal softmax over the first start + t + 1 entries.
extern "C" __global__ void attn_softmax_f32(float *out, const float *scores, u32 rows, u32 t_len, u32 p_len, u32 start_position) {
    u64 r = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    u32 valid = min(start_position + (u32)(r % t_len) + 1, p_len);
    const float *s = scores + r * p_len;
    float *o = out + r * p_len;
    float m = -INFINITY;
    bool nan = false;
    for (u32 p = 0; p < valid; p++) { m = fmaxf(m, s[p]); nan |= isnan(s[p]); }
    float sum = 0.0f;
    for (u32 p = 0; p < valid; p++) sum += expf(s[p] - m);
    for (u32 p = 0; p < p_len; p++) o[p] = p < valid ? store_act(nan ? QUIET_NAN : expf(s[p] - m) / sum) : 0.0f;
}

// out[t, h*hd + d] = Σ_p probs[h, t, p] · v[p, kvh*hd + d]
extern "C" __global__ void attention_f32(float *out, const float *probs, const float *v_cache, u32 t_len, u32 p_len, u32 heads, u32 kv_heads, u32 hd) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)t_len * heads * hd) return;
    u32 d = (u32)(i % hd), h = (u32)((i / hd) % heads), t = (u32)(i / ((u64)hd * heads));
    u32 kvh = h / (heads / kv_heads);
    const float *pr = probs + ((u64)h * t_len + t) * p_len;
    float acc = 0.0f;
    for (u32 p = 0; p < p_len; p++) acc += pr[p] * v_cache[(u64)p * kv_heads * hd + kvh * hd + d];
    out[i] = store_act(acc);
}
