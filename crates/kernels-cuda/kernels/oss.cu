// oss.cu: gpt-oss's operations, written for clarity: one thread per output
// element (per (head, query) row for the softmax), sums in double in index
// order. The CPU backend's OssOps (pipeline crate, backend/cpu/oss.rs) is
// the reference these follow step for step; gpu_oss's parity test holds
// them to it.
#include "common.cuh"

// The first key position query t (at *start + t) sees through `window`
// (0: no window, all earlier positions).
__device__ __forceinline__ u32 oss_first(u32 position, u32 window) {
    return (window == 0 || position + 1 < window) ? 0u : position + 1 - window;
}

// NeoX (rotate-half) RoPE with a frequency table and YaRN's factor: out
// [rows, heads * hd] from the heads of x (rows of in_width, the heads
// from column col). Thread (t, h, i < hd / 2): pair i of head h.
extern "C" __global__ void oss_rope_f32(float *out, const float *x, const double *inv_freq, double factor, u32 rows, u32 heads, u32 hd, u32 in_width, u32 col, const u32 *start) {
    PDL_ENTRY();
    u32 half = hd / 2;
    u64 n = (u64)rows * heads * half, i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    u32 p = (u32)(i % half), h = (u32)((i / half) % heads), t = (u32)(i / ((u64)half * heads));
    const float *xh = x + (u64)t * in_width + col + (u64)h * hd;
    float *oh = out + ((u64)t * heads + h) * hd;
    double s, c;
    sincos((double)(*start + t) * inv_freq[p], &s, &c);
    s *= factor;
    c *= factor;
    double a = xh[p], b = xh[p + half];
    oh[p] = store_act((float)(a * c - b * s));
    oh[p + half] = store_act((float)(b * c + a * s));
}

// Scores [heads, t_len, p_len] with what the window hides set to 0 (the
// future is 0 already), into out.
extern "C" __global__ void oss_window_mask_f32(float *out, const float *scores, u32 heads, u32 t_len, u32 p_len, u32 window, const u32 *start) {
    PDL_ENTRY();
    u64 n = (u64)heads * t_len * p_len, i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    u32 p = (u32)(i % p_len), t = (u32)((i / p_len) % t_len);
    out[i] = p < oss_first(*start + t, window) ? 0.0f : scores[i];
}

// The softmax of each (head, query) row over the positions its window
// leaves it, the head's sink (sinks[h]; dropped when drop_sinks) in the
// denominator: probs [heads, t_len, p_len] (0 outside), the sink's share
// [heads, t_len]. In double, as the CPU: max over the row and the sink,
// exps, their sum; a NaN anywhere makes the row NaN.
extern "C" __global__ void oss_softmax_sinks_f32(float *probs, float *share, const float *scores, const float *sinks, u32 heads, u32 t_len, u32 p_len, u32 window, const u32 *start) {
    PDL_ENTRY();
    u64 r = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= (u64)heads * t_len) return;
    u32 t = (u32)(r % t_len), h = (u32)(r / t_len);
    u32 position = *start + t, first = oss_first(position, window);
    u32 last = position < p_len ? position : p_len - 1;
    const float *row = scores + r * p_len;
    float *out = probs + r * p_len;
    double s = sinks[h], m = s;
    bool nan = isnan(s);
    for (u32 p = first; p <= last; p++) {
        double v = row[p];
        nan = nan || isnan(v);
        m = v > m ? v : m;
    }
    double total = exp(s - m);
    for (u32 p = first; p <= last; p++) total += exp((double)row[p] - m);
    for (u32 p = 0; p < p_len; p++) {
        float v = (p < first || p > last) ? 0.0f : (nan ? QUIET_NAN : (float)(exp((double)row[p] - m) / total));
        out[p] = store_act(v);
    }
    share[r] = store_act(nan ? QUIET_NAN : (float)(exp(s - m) / total));
}

// The router's bias added to its logits [rows, w], stored as computed:
// the logits are the router's, f32 in every contract (never rounded).
extern "C" __global__ void oss_router_bias_f32(float *out, const float *x, const float *bias, u32 rows, u32 w) {
    PDL_ENTRY();
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)rows * w) return;
    out[i] = (float)((double)x[i] + (double)bias[i % w]);
}

// Each chosen expert's bias added to its slot: out[s * w + j] = x[s * w +
// j] + bias[ids[s] * w + j], the sum in double then rounded (the CPU's).
extern "C" __global__ void oss_expert_bias_f32(float *out, const float *x, const int *ids, const float *bias, u32 slots, u32 w) {
    PDL_ENTRY();
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)slots * w) return;
    u32 s = (u32)(i / w), j = (u32)(i % w);
    out[i] = store_act((float)((double)x[i] + (double)bias[(u64)ids[s] * w + j]));
}

// gate clamped above at `limit`, up to [-limit, limit] (comparisons: NaN
// stays NaN), side by side per slot: out [slots, 2i].
extern "C" __global__ void oss_clamp_f32(float *out, const float *gate, const float *up, u32 slots, u32 width, float limit) {
    PDL_ENTRY();
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)slots * width) return;
    u32 s = (u32)(i / width), j = (u32)(i % width);
    float g = gate[i], u = up[i];
    g = g > limit ? limit : g;
    u = u > limit ? limit : (u < -limit ? -limit : u);
    out[(u64)s * 2 * width + j] = store_act(g);
    out[(u64)s * 2 * width + width + j] = store_act(u);
}

// (up + 1) * gate * sigmoid(alpha * gate) of the clamped [slots, 2i]
// (gate first), in double: out [slots, i].
extern "C" __global__ void oss_swiglu_f32(float *out, const float *clamped, u32 slots, u32 width, double alpha) {
    PDL_ENTRY();
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)slots * width) return;
    u32 s = (u32)(i / width), j = (u32)(i % width);
    double g = clamped[(u64)s * 2 * width + j], u = clamped[(u64)s * 2 * width + width + j];
    out[i] = store_act((float)((u + 1.0) * g / (1.0 + exp(-alpha * g))));
}
