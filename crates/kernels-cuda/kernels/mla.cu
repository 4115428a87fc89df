// mla.cu: multi-head latent attention (DeepSeek-V2/V3) and DeepSeek's
// grouped router, written for clarity: one thread per output element (or
// per token for the router), every sum in one thread in index order. The
// CPU backend's MlaOps and GroupedTopK (pipeline crate) are the reference
// these follow step for step; gpu_mla's parity test holds them to it.
#include "common.cuh"

// One rotated pair of MLA's rope columns, as MlaRope::rotate computes it:
// pair i of `x` (interleaved: x[2i], x[2i+1]; else x[i], x[i + half]),
// angle position * inv_freq[i] in double, cos and sin times `factor`
// (YaRN's attention factor), written as out[i] and out[i + half].
__device__ __forceinline__ void mla_rotate_pair(float *out, const float *x, const double *inv_freq, double factor, u32 interleave, u32 half, u32 i, u32 position) {
    double s, c;
    sincos((double)position * inv_freq[i], &s, &c);
    s *= factor;
    c *= factor;
    double a = interleave ? x[2 * i] : x[i];
    double b = interleave ? x[2 * i + 1] : x[i + half];
    out[i] = store_act((float)(a * c - b * s));
    out[i + half] = store_act((float)(b * c + a * s));
}

// The query with each head's rope columns rotated: q and out are
// [rows, heads * (nope + rope)]. Thread (t, h, j): j < nope copies a
// column, j = nope + i rotates pair i.
extern "C" __global__ void mla_query_rope_f32(float *out, const float *q, const double *inv_freq, double factor, u32 interleave, u32 rows, u32 heads, u32 nope, u32 rope, const u32 *start) {
    PDL_ENTRY();
    u32 half = rope / 2, per = nope + half, qk = nope + rope;
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)rows * heads * per) return;
    u32 j = (u32)(i % per), h = (u32)((i / per) % heads), t = (u32)(i / ((u64)per * heads));
    u64 at = ((u64)t * heads + h) * qk;
    if (j < nope) {
        out[at + j] = store_act(q[at + j]);
    } else {
        mla_rotate_pair(out + at + nope, q + at + nope, inv_freq, factor, interleave, half, j - nope, *start + t);
    }
}

// Each head's key, [rows, heads * (nope + rope)]: its k_nope columns of
// kv_b (rows of heads * (nope + v_dim)), then kv_a's rope columns (after
// its `latent` ones) rotated, the same for every head.
extern "C" __global__ void mla_keys_f32(float *out, const float *kv_a, const float *kv_b, const double *inv_freq, double factor, u32 interleave, u32 rows, u32 heads, u32 latent, u32 nope, u32 rope, u32 v_dim, const u32 *start) {
    PDL_ENTRY();
    u32 half = rope / 2, per = nope + half, qk = nope + rope;
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)rows * heads * per) return;
    u32 j = (u32)(i % per), h = (u32)((i / per) % heads), t = (u32)(i / ((u64)per * heads));
    float *key = out + ((u64)t * heads + h) * qk;
    if (j < nope) {
        key[j] = store_act(kv_b[(u64)t * heads * (nope + v_dim) + h * (nope + v_dim) + j]);
    } else {
        const float *a = kv_a + (u64)t * (latent + rope) + latent;
        mla_rotate_pair(key + nope, a, inv_freq, factor, interleave, half, j - nope, *start + t);
    }
}

// Appends a step's keys ([rows, heads * qk]) and values (each head's last
// v_dim columns of kv_b's heads of nope + v_dim) to the caches at rows
// *start..: k_cache rows of heads * qk, v_cache rows of heads * v_dim.
extern "C" __global__ void mla_append_kv_f32(float *k_cache, float *v_cache, const float *keys, const float *kv_b, const u32 *start, u32 rows, u32 heads, u32 qk, u32 nope, u32 v_dim) {
    PDL_ENTRY();
    u64 kw = (u64)heads * qk, vw = (u64)heads * v_dim, nk = rows * kw;
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= nk + rows * vw) return;
    u64 base = (u64)*start;
    if (i < nk) {
        u64 r = i / kw, c = i % kw;
        k_cache[(base + r) * kw + c] = store_act(keys[i]);
    } else {
        u64 j = i - nk, r = j / vw, c = j % vw, h = c / v_dim, d = c % v_dim;
        v_cache[(base + r) * vw + c] = store_act(kv_b[r * heads * (nope + v_dim) + h * (nope + v_dim) + nope + d]);
    }
}

// scores[h, t, p] = (q[t, h] · k[p, h]) * scale for p <= start + t, else
// 0; q rows of heads * qk, the key cache rows of heads * qk. Thread (h, t, p).
extern "C" __global__ void mla_scores_f32(float *scores, const float *q, const float *k_cache, u32 t_len, u32 p_len, u32 heads, u32 qk, float scale, u32 start_position) {
    PDL_ENTRY();
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)heads * t_len * p_len) return;
    u32 p = (u32)(i % p_len), t = (u32)((i / p_len) % t_len), h = (u32)(i / ((u64)p_len * t_len));
    float acc = 0.0f;
    if (p <= start_position + t) {
        const float *qv = q + ((u64)t * heads + h) * qk;
        const float *kv = k_cache + ((u64)p * heads + h) * qk;
        for (u32 d = 0; d < qk; d++) acc += qv[d] * kv[d];
        acc *= scale;
    }
    scores[i] = store_act(acc);
}

// out[t, h * v_dim + d] = sum over p <= start + t of probs[h, t, p] *
// v[p, h * v_dim + d], in order of p. Thread (t, h, d).
extern "C" __global__ void mla_attention_f32(float *out, const float *probs, const float *v_cache, u32 t_len, u32 p_len, u32 heads, u32 v_dim, u32 start_position) {
    PDL_ENTRY();
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)t_len * heads * v_dim) return;
    u32 d = (u32)(i % v_dim), h = (u32)((i / v_dim) % heads), t = (u32)(i / ((u64)v_dim * heads));
    const float *pr = probs + ((u64)h * t_len + t) * p_len;
    u32 last = min(start_position + t + 1, p_len);
    float acc = 0.0f;
    for (u32 p = 0; p < last; p++) acc += pr[p] * v_cache[((u64)p * heads + h) * v_dim + d];
    out[i] = store_act(acc);
}

#define GROUPED_MAX_GROUPS 64
#define GROUPED_MAX_EXPERTS 1024

// Ordering of best_first (grouped_routing.rs): a NaN counts as -inf, ties
// go to the lower index; candidate i (value v) beats the best so far?
__device__ __forceinline__ bool grouped_beats(double v, u32 i, double best_v, int best) {
    v = isnan(v) ? -INFINITY : v;
    best_v = isnan(best_v) ? -INFINITY : best_v;
    return best < 0 || v > best_v || (v == best_v && i < (u32)best);
}

__device__ __forceinline__ double grouped_score(float logit) { return 1.0 / (1.0 + exp(-(double)logit)); }

// DeepSeek-V3's router (GroupedTopK::route), one thread per token, in
// double: sigmoid scores, plus the correction bias to choose; each group
// scored by the sum of its two best biased scores; the best topk_group
// groups kept, the rest masked to -inf; the top_k best of all experts so
// masked; their unbiased scores as weights, over their sum + 1e-20 when
// `normalise`, times `scaling`. Weights [T, k] f32 (not rounded: routing
// stays f32), ids [T, k].
template <typename W>
__device__ void router_grouped_impl(float *weights, int *ids, float *group_scores, int *groups, const float *logits, const W *bias, u32 t_len, u32 experts, u32 n_group, u32 topk_group, u32 top_k, u32 normalise, double scaling) {
    u64 t = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= t_len) return;
    const float *l = logits + t * experts;
    u32 per_group = experts / n_group;
    double group_score[GROUPED_MAX_GROUPS];
    for (u32 g = 0; g < n_group; g++) {
        int first = -1, second = -1;
        double fv = 0.0, sv = 0.0;
        for (u32 e = g * per_group; e < (g + 1) * per_group; e++) {
            double v = grouped_score(l[e]) + (double)load_w(bias, e);
            if (grouped_beats(v, e, fv, first)) {
                second = first; sv = fv; first = (int)e; fv = v;
            } else if (grouped_beats(v, e, sv, second)) {
                second = (int)e; sv = v;
            }
        }
        group_score[g] = fv + (second >= 0 ? sv : 0.0);
        group_scores[t * n_group + g] = (float)group_score[g];
    }
    u64 kept = 0;
    for (u32 j = 0; j < topk_group; j++) {
        int best = -1;
        for (u32 g = 0; g < n_group; g++)
            if (!((kept >> g) & 1) && grouped_beats(group_score[g], g, best < 0 ? 0.0 : group_score[best], best)) best = (int)g;
        kept |= 1ull << best;
        groups[t * topk_group + j] = best;
    }
    u32 taken[GROUPED_MAX_EXPERTS / 32];
    for (u32 w = 0; w < (experts + 31) / 32; w++) taken[w] = 0;
    double chosen[64];
    double total = 0.0;
    for (u32 j = 0; j < top_k; j++) {
        int best = -1;
        double best_v = 0.0;
        for (u32 e = 0; e < experts; e++) {
            if ((taken[e / 32] >> (e % 32)) & 1) continue;
            double v = ((kept >> (e / per_group)) & 1) ? grouped_score(l[e]) + (double)load_w(bias, e) : -INFINITY;
            if (grouped_beats(v, e, best_v, best)) { best = (int)e; best_v = v; }
        }
        taken[best / 32] |= 1u << (best % 32);
        ids[t * top_k + j] = best;
        chosen[j] = grouped_score(l[best]);
        total += chosen[j];
    }
    double denominator = normalise ? total + 1e-20 : 1.0;
    for (u32 j = 0; j < top_k; j++) weights[t * top_k + j] = (float)(chosen[j] / denominator * scaling);
}

WEIGHT_VARIANTS(router_grouped,
                (float *weights, int *ids, float *group_scores, int *groups, const float *logits, const W *bias, u32 t_len, u32 experts, u32 n_group, u32 topk_group, u32 top_k, u32 normalise, double scaling),
                (weights, ids, group_scores, groups, logits, bias, t_len, experts, n_group, topk_group, top_k, normalise, scaling))
