// moe.cu: routing on the device (one warp per token) (softmax over all experts in f32, top-k
// descending with ties to the lower id, optional renormalisation) and the
// weighted sum of the chosen experts' outputs.
#include "common.cuh"
#include "blocks.cuh"

// Does candidate (pa, ia) beat (pb, ib)? Larger probability first, the
// lower id on ties; id -1 is "no candidate" and loses to any other.
__device__ __forceinline__ bool beats(float pa, int ia, float pb, int ib) {
    if (ib < 0) return ia >= 0;
    if (ia < 0) return false;
    return pa > pb || (pa == pb && ia < ib);
}

// Warp-wide max and min of a u32 (sm_80+: one instruction each).
__device__ __forceinline__ u32 redux_max(u32 x) {
    u32 r;
    asm volatile("redux.sync.max.u32 %0, %1, 0xffffffff;" : "=r"(r) : "r"(x));
    return r;
}
__device__ __forceinline__ u32 redux_min(u32 x) {
    u32 r;
    asm volatile("redux.sync.min.u32 %0, %1, 0xffffffff;" : "=r"(r) : "r"(x));
    return r;
}

#define TOPK_CACHED 8   // probabilities per lane kept in registers (experts <= 256)
#define TOPK_WARPS 8    // warps (tokens) per block
#define TOPK_MAX_K 64

// One warp per token, TOPK_WARPS tokens per block. Lane l owns experts l,
// l + 32, ...; a lane's "taken" bits cover its own experts (at most 128
// each: experts <= 4096, checked by the host). The max and the NaN flag are
// exact across lanes; the softmax sum is reduced once (lane 0's result,
// broadcast), so every lane divides by the same value and the
// probabilities are identical wherever computed. Up to 256 experts a lane
// keeps its logits and probabilities in registers (computed once) and a
// round is two warp reductions (redux.sync); more experts are re-read and
// recomputed in every round, identically, and compared by shuffles. Each of
// the k rounds picks the best untaken expert (a NaN probability counts as
// -inf but can still be picked when nothing else is left), as the CPU
// reference does; the chosen probabilities wait in shared memory for the
// renormalisation, so each weight is stored once.
extern "C" __global__ void __launch_bounds__(32 * TOPK_WARPS) router_top_k_f32(float *weights, int *ids, const float *logits, u32 t_len, u32 experts, u32 top_k, u32 normalise) {
    PDL_ENTRY();
    __shared__ float chosen[TOPK_WARPS][TOPK_MAX_K];
    u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    u64 t = (u64)blockIdx.x * TOPK_WARPS + warp;
    if (t >= t_len) return; // uniform across the warp
    const float *l = logits + t * experts;
    bool cached = experts <= 32 * TOPK_CACHED;
    float pc[TOPK_CACHED];
    float m = -INFINITY;
    bool nan = false;
    if (cached) {
#pragma unroll
        for (u32 i = 0; i < TOPK_CACHED; i++) {
            u32 e = lane + 32 * i;
            pc[i] = e < experts ? l[e] : -INFINITY;
            m = fmaxf(m, pc[i]);
            nan |= isnan(pc[i]);
        }
    } else {
        for (u32 e = lane; e < experts; e += 32) { m = fmaxf(m, l[e]); nan |= isnan(l[e]); }
    }
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    nan = __any_sync(0xffffffffu, nan);
    float sum = 0.0f;
    if (cached) {
#pragma unroll
        for (u32 i = 0; i < TOPK_CACHED; i++)
            if (lane + 32 * i < experts) sum += expf(pc[i] - m);
    } else {
        for (u32 e = lane; e < experts; e += 32) sum += expf(l[e] - m);
    }
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_down_sync(0xffffffffu, sum, o);
    sum = __shfl_sync(0xffffffffu, sum, 0);
    if (cached) {
        // Probabilities as ordered keys: an untakeable slot 0, -inf (NaN
        // included) 1, p >= 0 its bits + 2 (non-negative floats order as
        // their bits). The best key, then the lowest id holding it: the
        // order of `beats`, in two warp reductions a round.
        u32 keys[TOPK_CACHED];
#pragma unroll
        for (u32 i = 0; i < TOPK_CACHED; i++) {
            float p = expf(pc[i] - m) / sum;
            keys[i] = lane + 32 * i >= experts ? 0u : (isnan(p) || p == -INFINITY) ? 1u : __float_as_uint(p) + 2u;
        }
        for (u32 j = 0; j < top_k; j++) {
            u32 key = 0, id = 0xffffffffu;
#pragma unroll
            for (u32 i = 0; i < TOPK_CACHED; i++)
                if (keys[i] > key) { key = keys[i]; id = lane + 32 * i; }
            u32 best_key = redux_max(key);
            u32 best = redux_min(key == best_key ? id : 0xffffffffu);
#pragma unroll
            for (u32 i = 0; i < TOPK_CACHED; i++)
                if (best_key != 0 && lane + 32 * i == best) keys[i] = 0; // taken: untakeable from now on
            if (lane == 0) {
                ids[t * top_k + j] = best_key == 0 ? -1 : (int)best;
                chosen[warp][j] = best_key < 2 ? -INFINITY : __uint_as_float(best_key - 2u);
            }
        }
    } else {
        u64 taken_lo = 0, taken_hi = 0;
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
                chosen[warp][j] = best_p;
            }
        }
    }
    if (lane != 0) return;
    float total = 0.0f;
    for (u32 j = 0; j < top_k; j++) total += chosen[warp][j];
    for (u32 j = 0; j < top_k; j++) {
        float w = nan ? QUIET_NAN : chosen[warp][j];
        weights[t * top_k + j] = normalise ? w / total : w;
    }
}

// Σ_j weights[t, j] · expert_out[t, j, c], in f32, slot order.
__device__ __forceinline__ float routed_sum(const float *expert_out, const float *weights, u32 t, u32 c, u32 top_k,
                                            u32 h) {
    float acc = 0.0f;
    for (u32 j = 0; j < top_k; j++) acc += weights[(u64)t * top_k + j] * expert_out[((u64)t * top_k + j) * h + c];
    return acc;
}

// out[t, c] = Σ_j weights[t, j] · expert_out[t, j, c]
extern "C" __global__ void moe_combine_f32(float *out, const float *expert_out, const float *weights, u32 t_len, u32 top_k, u32 h) {
    PDL_ENTRY();
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)t_len * h) return;
    u32 t = (u32)(i / h), c = (u32)(i % h);
    out[i] = store_act(routed_sum(expert_out, weights, t, c, top_k, h));
}

// out[t, c] = Σ_j weights[t, j] · expert_out[t, j, c] + g_t · shared[t, c]
// with g_t = shared_weight[t] when gated, else 1: the routed sum as
// moe_combine_f32 makes it, then the shared expert's term, in f32.
extern "C" __global__ void moe_combine_shared_f32(float *out, const float *expert_out, const float *weights,
                                                  const float *shared, const float *shared_weight, u32 gated,
                                                  u32 t_len, u32 top_k, u32 h) {
    PDL_ENTRY();
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)t_len * h) return;
    u32 t = (u32)(i / h), c = (u32)(i % h);
    float g = gated ? shared_weight[t] : 1.0f;
    out[i] = store_act(routed_sum(expert_out, weights, t, c, top_k, h) + g * shared[i]);
}

// ---- Grouped expert projections (prefill): slots sorted by expert on the
// device, then one tensor-core tile kernel reading each expert's weights
// once per 32 of its slots. No host round trip: the per-expert counts stay
// in device memory and blocks of empty experts exit at once.

// counts[e] = how many of the `slots` ids are e. One block per expert.
extern "C" __global__ void moe_count_slots(int *counts, const int *ids, u32 slots) {
    PDL_ENTRY();
    __shared__ u32 partial[32];
    u32 e = blockIdx.x, c = 0;
    for (u32 s = threadIdx.x; s < slots; s += blockDim.x) c += (u32)(ids[s] == (int)e);
    for (int o = 16; o > 0; o >>= 1) c += __shfl_down_sync(0xffffffffu, c, o);
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = c;
    __syncthreads();
    if (threadIdx.x == 0) {
        u32 total = 0;
        for (u32 w = 0; w < (blockDim.x + 31) / 32; w++) total += partial[w];
        counts[e] = (int)total;
    }
}

// offsets[e] = Σ counts[< e]; sorted[offsets[e] + i] = the i-th slot (in
// ascending order) whose id is e. One block per expert; deterministic.
extern "C" __global__ void moe_sort_slots(int *sorted, int *offsets, const int *counts, const int *ids, u32 slots) {
    PDL_ENTRY();
    __shared__ u32 warp_hits[32];
    __shared__ u32 base;
    u32 e = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) / 32;
    if (threadIdx.x == 0) {
        u32 offset = 0;
        for (u32 i = 0; i < e; i++) offset += (u32)counts[i];
        offsets[e] = (int)offset;
        base = offset;
    }
    __syncthreads();
    for (u32 s0 = 0; s0 < slots; s0 += blockDim.x) {
        u32 s = s0 + threadIdx.x;
        bool hit = s < slots && ids[s] == (int)e;
        u32 ballot = __ballot_sync(0xffffffffu, hit);
        if (lane == 0) warp_hits[warp] = __popc(ballot);
        __syncthreads();
        u32 before = base;
        for (u32 w = 0; w < warp; w++) before += warp_hits[w];
        if (hit) sorted[before + __popc(ballot & ((1u << lane) - 1u))] = (int)s;
        __syncthreads();
        if (threadIdx.x == 0) for (u32 w = 0; w < warps; w++) base += warp_hits[w];
        __syncthreads();
    }
}

// Rows of slots whose id is not an expert are NaN (the contract of
// expert_linear); the grouped kernel never visits them. One warp per slot.
extern "C" __global__ void moe_invalid_rows(float *out, const int *ids, u32 slots, u32 n_out, u32 experts) {
    PDL_ENTRY();
    u64 s = ((u64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (s >= slots) return;
    int e = ids[s];
    if (e >= 0 && (u32)e < experts) return;
    for (u32 n = threadIdx.x & 31; n < n_out; n += 32) out[s * n_out + n] = QUIET_NAN;
}

#define GT_ROWS 64   // weight rows (outputs n) per block: 16 per warp
#define GT_SLOTS 32  // slots per tile: 4 mma columns of 8 (bf16 weights)
#define GT_K 64      // k per shared-memory stage: 4 mma steps
#define GT_PAD 8     // bf16 of padding per shared row (no bank conflicts)
#define GT_STAGES 3  // shared-memory stages in flight (cp.async)
#define GT_W_PIECES (GT_ROWS * GT_K / 8 / 128)  // 16-byte W copies per thread per stage

// 16 bytes from global to shared memory without passing through registers
// (sm_80+); with `full` false the 16 shared bytes are zero-filled and
// nothing is read.
__device__ __forceinline__ void cp_async16(void *dst, const void *src, bool full) {
    u32 d = (u32)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(full ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most STAGES - 2 groups are still in flight.
template <u32 STAGES>
__device__ __forceinline__ void cp_async_wait_stage() { asm volatile("cp.async.wait_group %0;\n" ::"n"(STAGES - 2)); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::); }

// Where the grouped projection's weight rows come from. Each stage, a
// source fills one shared buffer of GT_ROWS rows x GT_K bf16 in two steps:
// `issue` starts the loads (before the tensor cores run an earlier stage)
// and `finish` completes the buffer (after they ran it).

// bf16 rows, copied straight into shared memory (cp.async): nothing to
// finish.
struct Bf16Rows {
    const u16 *we; // row n0 of expert e
    u32 k;
    __device__ __forceinline__ void issue(u16 (*ws)[GT_K + GT_PAD], u32 k0, u32 tid) {
        for (int i = 0; i < GT_W_PIECES; i++) {
            u32 piece = tid + 128 * i, r = piece / (GT_K / 8), c = (piece % (GT_K / 8)) * 8;
            cp_async16(&ws[r][c], we + (u64)r * k + k0 + c, true);
        }
    }
    __device__ __forceinline__ void finish(u16 (*)[GT_K + GT_PAD], u32) {}
};

// Rows of ggml blocks of type KIND (blocks.cuh): `issue` loads each piece's
// block bytes into registers, `finish` decodes them and stores the bf16
// values, rounded to nearest even as dequant_bf16 rounds them (so the
// products are those of the decoded stack, bit for bit; a NaN weight is
// the canonical NaN here, and so is any product with it).
template <u32 KIND>
struct QuantRows {
    const unsigned char *we; // row n0 of expert e
    u32 k;
    Raw8 raw[GT_W_PIECES];
    u32 k0; // the stage being loaded
    __device__ __forceinline__ void issue(u16 (*)[GT_K + GT_PAD], u32 stage_k0, u32 tid) {
        u64 row_bytes = (u64)(k / BlockOf<KIND>::len) * BlockOf<KIND>::bytes;
        k0 = stage_k0;
#pragma unroll
        for (int i = 0; i < GT_W_PIECES; i++) {
            u32 piece = tid + 128 * i, r = piece / (GT_K / 8), c = (piece % (GT_K / 8)) * 8;
            raw[i] = raw_of<KIND>(block_at<KIND>(we + r * row_bytes, k0 + c), (k0 + c) % BlockOf<KIND>::len);
        }
    }
    __device__ __forceinline__ void finish(u16 (*ws)[GT_K + GT_PAD], u32 tid) {
#pragma unroll
        for (int i = 0; i < GT_W_PIECES; i++) {
            u32 piece = tid + 128 * i, r = piece / (GT_K / 8), c = (piece % (GT_K / 8)) * 8;
            float w[8];
            decode_raw<KIND>(raw[i], (k0 + c) % BlockOf<KIND>::len, w);
            uint4 v;
            v.x = pack_bf16_rn(w[0], w[1]);
            v.y = pack_bf16_rn(w[2], w[3]);
            v.z = pack_bf16_rn(w[4], w[5]);
            v.w = pack_bf16_rn(w[6], w[7]);
            *(uint4 *)&ws[r][c] = v;
        }
    }
};

// The shared memory of one grouped block (declared by each entry point, so
// a kernel over several block types holds one copy, not one per type).
#define GT_SHARED(STAGES, SLOTS)                                       \
    __shared__ __align__(16) u16 ws[STAGES][GT_ROWS][GT_K + GT_PAD];  \
    __shared__ __align__(16) u16 xs[STAGES][SLOTS][GT_K + GT_PAD];    \
    __shared__ int slot_of[SLOTS];

// out[slot, n] = W[e][n] · x(slot) for every slot routed to expert e, where
// x(slot) = x[slot] (per_slot) or x[slot / top_k], x as bf16 bits (the
// Bf16 backend's activations are bf16 values: exact), W's rows from `src`.
// Block (n tile, e): 4 warps, 64 rows of W[e] against its slots SLOTS (32
// or 64) at a time; f32 accumulation over k in order, one 64-wide stage
// after another. STAGES stages of W and x are loaded ahead of the tensor
// cores (x by cp.async), so several loads per block are in flight while
// the mma of an earlier stage runs. Needs k % 64 == 0 and n_out % 64 == 0
// (the host checks).
template <u32 STAGES, u32 SLOTS, class Rows>
__device__ __forceinline__ void expert_linear_grouped_impl(
    Rows src, u16 (*ws)[GT_ROWS][GT_K + GT_PAD], u16 (*xs)[SLOTS][GT_K + GT_PAD], int *slot_of,
    float *out, const u16 *x, const int *sorted, const int *offsets, const int *counts, u32 top_k, u32 k, u32 n_out, u32 per_slot) {
    u32 e = blockIdx.y, n0 = blockIdx.x * GT_ROWS;
    int count = counts[e];
    if (count == 0) return;
    int first = offsets[e];
    u32 tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, q = lane & 3;
    u32 stages = k / GT_K;
    const u32 X_PIECES = SLOTS * GT_K / 8 / 128; // 16-byte x copies per thread per stage
    for (int tile = 0; tile < count; tile += SLOTS) {
        u32 in_tile = (u32)min(SLOTS, count - tile);
        __syncthreads(); // the last tile's shared memory is no longer read
        if (tid < SLOTS) slot_of[tid] = tid < in_tile ? sorted[first + tile + tid] : -1;
        __syncthreads();
        // This thread's x rows (one slot per piece; none: zeros).
        const u16 *xrow[X_PIECES];
        u32 xr[X_PIECES], xcol[X_PIECES];
#pragma unroll
        for (int i = 0; i < X_PIECES; i++) {
            u32 piece = tid + 128 * i;
            xr[i] = piece / (GT_K / 8);
            xcol[i] = (piece % (GT_K / 8)) * 8;
            int slot = slot_of[xr[i]];
            xrow[i] = slot < 0 ? 0 : x + (per_slot ? (u64)slot : (u64)slot / top_k) * k;
        }
        // x copies of stage s (k0 = s * GT_K) into buffer s % STAGES.
#define GT_COPY_X(s)                                                                                      \
        {                                                                                                 \
            u32 buf = (s) % STAGES, k0 = (s) * GT_K;                                                   \
            _Pragma("unroll") for (int i = 0; i < X_PIECES; i++)                                       \
                cp_async16(&xs[buf][xr[i]][xcol[i]], xrow[i] ? xrow[i] + k0 + xcol[i] : x, xrow[i] != 0); \
        }
        for (u32 s = 0; s < STAGES - 1; s++) {
            if (s < stages) {
                src.issue(ws[s], s * GT_K, tid);
                src.finish(ws[s], tid);
                GT_COPY_X(s)
            }
            cp_async_commit(); // one group per stage, empty or not
        }
        float acc[SLOTS / 8][4];
#pragma unroll
        for (int j = 0; j < SLOTS / 8; j++)
#pragma unroll
            for (int c = 0; c < 4; c++) acc[j][c] = 0.0f;
        u32 r0 = warp * 16;
        for (u32 s = 0; s < stages; s++) {
            cp_async_wait_stage<STAGES>(); // stage s has landed (for this thread)...
            __syncthreads();       // ... for every thread; stage s - 1's buffer is free
            u32 ahead = s + STAGES - 1;
            if (ahead < stages) {
                src.issue(ws[ahead % STAGES], ahead * GT_K, tid);
                GT_COPY_X(ahead)
            }
            cp_async_commit();
            u32 buf = s % STAGES;
            for (u32 kk = 0; kk < GT_K; kk += 16) {
                u32 a0 = *(const u32 *)&ws[buf][r0 + g][kk + 2 * q];
                u32 a1 = *(const u32 *)&ws[buf][r0 + g + 8][kk + 2 * q];
                u32 a2 = *(const u32 *)&ws[buf][r0 + g][kk + 2 * q + 8];
                u32 a3 = *(const u32 *)&ws[buf][r0 + g + 8][kk + 2 * q + 8];
#pragma unroll
                for (int j = 0; j < SLOTS / 8; j++) {
                    u32 b0 = *(const u32 *)&xs[buf][j * 8 + g][kk + 2 * q];
                    u32 b1 = *(const u32 *)&xs[buf][j * 8 + g][kk + 2 * q + 8];
                    mma_bf16_16816(acc[j], a0, a1, a2, a3, b0, b1);
                }
            }
            // The stage ahead's weights, now that this stage's mma ran; the
            // next iteration's barrier publishes them.
            if (ahead < stages) src.finish(ws[ahead % STAGES], tid);
        }
#undef GT_COPY_X
        cp_async_wait_all();
        // acc[j]: rows r0 + g (c 0, 1) and r0 + g + 8 (c 2, 3); slots
        // j * 8 + 2q (c 0, 2) and j * 8 + 2q + 1 (c 1, 3).
#pragma unroll
        for (int j = 0; j < SLOTS / 8; j++) {
#pragma unroll
            for (int c = 0; c < 4; c++) {
                u32 col = j * 8 + 2 * q + (c & 1), row = r0 + g + (c >> 1) * 8;
                int slot = slot_of[col];
                if (slot >= 0) out[(u64)slot * n_out + n0 + row] = store_act(acc[j][c]);
            }
        }
    }
}

// Experts stacked [E, n_out, k] as bf16.
extern "C" __global__ void __launch_bounds__(128) expert_linear_grouped_bf16w(
    float *out, const u16 *x, const int *sorted, const int *offsets, const int *counts, const u16 *w,
    u32 top_k, u32 k, u32 n_out, u32 per_slot) {
    PDL_ENTRY();
    GT_SHARED(GT_STAGES, GT_SLOTS)
    Bf16Rows src = {w + ((u64)blockIdx.y * n_out + blockIdx.x * GT_ROWS) * k, k};
    expert_linear_grouped_impl<GT_STAGES, GT_SLOTS>(src, ws, xs, slot_of, out, x, sorted, offsets, counts, top_k, k, n_out, per_slot);
}

// Experts stacked [E, n_out, k] as rows of ggml blocks of type `kind`
// (k a multiple of 256 for the K-quants: rows of whole blocks). Tiles of
// 64 slots, so each stage of an expert's weights is decoded once for up to
// 64 slots (a prompt of 512 tokens gives about 32 an expert, often more),
// in two stages (the weights' loads are in registers, not in flight to
// shared memory, so a third stage would only hold x).
#define GQ_STAGES 2
#define GQ_SLOTS 64
// (At most 170 registers a thread, three blocks an SM: the two 64-slot
// accumulators and four pieces of block bytes in registers need more than
// the 128 the compiler would otherwise keep to, and spilled.)
extern "C" __global__ void __launch_bounds__(128, 3) expert_linear_grouped_quant(
    float *out, const u16 *x, const int *sorted, const int *offsets, const int *counts, const unsigned char *w,
    u32 kind, u32 top_k, u32 k, u32 n_out, u32 per_slot) {
    PDL_ENTRY();
    GT_SHARED(GQ_STAGES, GQ_SLOTS)
    u64 row0 = (u64)blockIdx.y * n_out + blockIdx.x * GT_ROWS;
    DISPATCH_KIND_TILES(kind, (expert_linear_grouped_impl<GQ_STAGES, GQ_SLOTS>(QuantRows<K>{w + row0 * (k / BlockOf<K>::len) * BlockOf<K>::bytes, k, {}, 0}, ws, xs, slot_of, out, x, sorted, offsets, counts, top_k, k, n_out, per_slot)));
}

// ---- Virtual expert-parallel ranks (pipeline backend/expert_parallel.rs;
// the CPU's cpu/expert_parallel.rs is the reference). Sums in f32 in the
// order moe_combine_f32 sums, so that slot order with a correct dispatch
// is moe_combine_f32's result to the bit.

// moe_dispatch [R, slots]: one thread per rank walks the slots in order,
// numbering those it serves in its own view (map[r][e] == r), -1 the rest.
extern "C" __global__ void ep_dispatch(int *out, const int *ids, const int *map, u32 slots, u32 experts, u32 ranks) {
    PDL_ENTRY();
    u32 r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= ranks) return;
    int received = 0;
    for (u32 s = 0; s < slots; s++) {
        int e = ids[s];
        bool mine = e >= 0 && (u32)e < experts && map[(u64)r * experts + (u32)e] == (int)r;
        out[(u64)r * slots + s] = mine ? received++ : -1;
    }
}

// moe_combine [R, T, H]: each rank's received slots, weighted, in slot order.
extern "C" __global__ void ep_combine_partials(float *out, const float *expert_out, const float *weights,
                                               const int *dispatch, u32 ranks, u32 t_len, u32 top_k, u32 h) {
    PDL_ENTRY();
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)ranks * t_len * h) return;
    u32 r = (u32)(i / ((u64)t_len * h)), t = (u32)(i / h % t_len), c = (u32)(i % h);
    float acc = 0.0f;
    for (u32 j = 0; j < top_k; j++) {
        if (dispatch[((u64)r * t_len + t) * top_k + j] >= 0) {
            acc += weights[(u64)t * top_k + j] * expert_out[((u64)t * top_k + j) * h + c];
        }
    }
    out[i] = store_act(acc);
}

// moe_ffn_out of ranks [T, H]: with rank_sum, the partials in rank order;
// else each slot once per rank that received it, in slot order; then the
// shared expert's term (shared_kind 0: none, 1: ungated, 2: gated), as
// moe_combine_shared_f32 adds it.
extern "C" __global__ void ep_reduce(float *out, const float *expert_out, const float *weights, const int *dispatch,
                                     const float *partials, u32 rank_sum, const float *shared,
                                     const float *shared_weight, u32 shared_kind, u32 ranks, u32 t_len, u32 top_k,
                                     u32 h) {
    PDL_ENTRY();
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)t_len * h) return;
    u32 t = (u32)(i / h), c = (u32)(i % h);
    float acc = 0.0f;
    if (rank_sum) {
        for (u32 r = 0; r < ranks; r++) acc += partials[((u64)r * t_len + t) * h + c];
    } else {
        for (u32 j = 0; j < top_k; j++) {
            for (u32 r = 0; r < ranks; r++) {
                if (dispatch[((u64)r * t_len + t) * top_k + j] >= 0) {
                    acc += weights[(u64)t * top_k + j] * expert_out[((u64)t * top_k + j) * h + c];
                }
            }
        }
    }
    if (shared_kind != 0) {
        float g = shared_kind == 2 ? shared_weight[t] : 1.0f;
        acc = acc + g * shared[i];
    }
    out[i] = store_act(acc);
}
