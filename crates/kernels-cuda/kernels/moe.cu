// moe.cu: routing on the device (softmax over all experts in f32, top-k
// descending with ties to the lower id, optional renormalisation) and the
// weighted sum of the chosen experts' outputs.
#include "common.cuh"

// One thread per token (E and k are small: 128 and 8 for Qwen3-30B-A3B).
extern "C" __global__ void router_top_k_f32(float *weights, int *ids, const float *logits, u32 t_len, u32 experts, u32 top_k, u32 normalise) {
    u32 t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= t_len) return;
    const float *l = logits + (u64)t * experts;
    float m = -INFINITY;
    bool nan = false;
    for (u32 e = 0; e < experts; e++) { m = fmaxf(m, l[e]); nan |= isnan(l[e]); }
    float sum = 0.0f;
    for (u32 e = 0; e < experts; e++) sum += expf(l[e] - m);
    float total = 0.0f;
    int chosen[64];
    for (u32 j = 0; j < top_k; j++) {
        int best = -1;
        float best_p = -INFINITY;
        for (u32 e = 0; e < experts; e++) {
            bool taken = false;
            for (u32 q = 0; q < j; q++) taken |= chosen[q] == (int)e;
            float p = expf(l[e] - m) / sum;
            if (!taken && (best < 0 || p > best_p)) { best = (int)e; best_p = isnan(p) ? -INFINITY : p; }
        }
        chosen[j] = best;
        ids[(u64)t * top_k + j] = best;
        weights[(u64)t * top_k + j] = nan ? QUIET_NAN : best_p;
        total += best_p;
    }
    if (normalise) for (u32 j = 0; j < top_k; j++) weights[(u64)t * top_k + j] /= total;
}

// out[t, c] = Σ_j weights[t, j] · expert_out[t, j, c]
extern "C" __global__ void moe_combine_f32(float *out, const float *expert_out, const float *weights, u32 t_len, u32 top_k, u32 h) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)t_len * h) return;
    u32 t = (u32)(i / h), c = (u32)(i % h);
    float acc = 0.0f;
    for (u32 j = 0; j < top_k; j++) acc += weights[(u64)t * top_k + j] * expert_out[((u64)t * top_k + j) * h + c];
    out[i] = acc;
}
