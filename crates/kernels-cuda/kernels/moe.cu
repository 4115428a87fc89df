// moe.cu: routing on the device (one warp per token) (softmax over all experts in f32, top-k
// descending with ties to the lower id, optional renormalisation) and the
// weighted sum of the chosen experts' outputs.
#include "common.cuh"

// Does candidate (pa, ia) beat (pb, ib)? Larger probability first, the
// lower id on ties; id -1 is "no candidate" and loses to any other.
__device__ __forceinline__ bool beats(float pa, int ia, float pb, int ib) {
    if (ib < 0) return ia >= 0;
    if (ia < 0) return false;
    return pa > pb || (pa == pb && ia < ib);
}

// One warp per token. Lane l owns experts l, l + 32, ...; a lane's "taken"
// bits cover its own experts (at most 128 each: experts <= 4096, checked by
// the host). The max and the NaN flag are exact across lanes; the softmax
// sum is reduced once (lane 0's result, broadcast), so every lane divides
// by the same value and the probabilities are identical wherever computed.
// Each of the k rounds picks the best untaken expert (a NaN probability
// counts as -inf but can still be picked when nothing else is left), as
// the CPU reference does.
extern "C" __global__ void router_top_k_f32(float *weights, int *ids, const float *logits, u32 t_len, u32 experts, u32 top_k, u32 normalise) {
    u64 t = ((u64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    u32 lane = threadIdx.x & 31;
    if (t >= t_len) return; // uniform across the warp
    const float *l = logits + t * experts;
    float m = -INFINITY;
    bool nan = false;
    for (u32 e = lane; e < experts; e += 32) { m = fmaxf(m, l[e]); nan |= isnan(l[e]); }
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    nan = __any_sync(0xffffffffu, nan);
    float sum = 0.0f;
    for (u32 e = lane; e < experts; e += 32) sum += expf(l[e] - m);
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_down_sync(0xffffffffu, sum, o);
    sum = __shfl_sync(0xffffffffu, sum, 0);
    u64 taken_lo = 0, taken_hi = 0;
    float total = 0.0f;
    for (u32 j = 0; j < top_k; j++) {
        int best = -1;
        float best_p = -INFINITY;
        for (u32 e = lane, i = 0; e < experts; e += 32, i++) {
            bool taken = i < 64 ? (taken_lo >> i) & 1 : (taken_hi >> (i - 64)) & 1;
            if (taken) continue;
            float p = expf(l[e] - m) / sum;
            p = isnan(p) ? -INFINITY : p;
            if (beats(p, (int)e, best_p, best)) { best = (int)e; best_p = p; }
        }
        for (int o = 16; o > 0; o >>= 1) {
            float op = __shfl_down_sync(0xffffffffu, best_p, o);
            int oi = __shfl_down_sync(0xffffffffu, best, o);
            if (beats(op, oi, best_p, best)) { best = oi; best_p = op; }
        }
        best = __shfl_sync(0xffffffffu, best, 0);
        best_p = __shfl_sync(0xffffffffu, best_p, 0);
        if (best >= 0 && (u32)best % 32 == lane) {
            u32 i = (u32)best / 32;
            if (i < 64) taken_lo |= 1ull << i; else taken_hi |= 1ull << (i - 64);
        }
        if (lane == 0) {
            ids[t * top_k + j] = best;
            weights[t * top_k + j] = nan ? QUIET_NAN : best_p;
            total += best_p;
        }
    }
    if (normalise && lane == 0) for (u32 j = 0; j < top_k; j++) weights[t * top_k + j] /= total;
}

// out[t, c] = Σ_j weights[t, j] · expert_out[t, j, c]
extern "C" __global__ void moe_combine_f32(float *out, const float *expert_out, const float *weights, u32 t_len, u32 top_k, u32 h) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)t_len * h) return;
    u32 t = (u32)(i / h), c = (u32)(i % h);
    float acc = 0.0f;
    for (u32 j = 0; j < top_k; j++) acc += weights[(u64)t * top_k + j] * expert_out[((u64)t * top_k + j) * h + c];
    out[i] = store_act(acc);
}
