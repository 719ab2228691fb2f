// Causal softmax attention over a padded batch with a key/value cache and grouped-query heads
// (the semantics of the CPU twin's AttnShape).
//
// Shapes: q, out, dout [B, Tq, H * D] T; k, v [B, Cap, Hkv * D] T; q_start, q_valid [B] i32;
//   lse [B, H, Tq] f32 (log-sum-exp of the scaled scores, saved for the backward);
//   dq [B, Tq, H * D], dk, dv [B, Cap, Hkv * D] f32, accumulated (+=) like the CPU twin.
//   Query i of sequence b sits at absolute position q_start[b] + i and sees keys 0 ..= that position;
//   rows i >= q_valid[b] are padding and get zero output (lse 0, no gradient).
//   Head h reads key/value head h / (H / Hkv).
// Launch: one warp per (b, i, h) query row, 4 warps per 128-thread block, grid = ceil(B*Tq*H / 4).
//   Each lane holds D / 32 elements of q and of the output accumulator (D <= 256, a multiple of 32
//   is fastest; any D <= 256 works). Keys are consumed in chunks of 32 with an online softmax
//   (running max / running sum, FlashAttention style), so no score matrix is materialised.
//   Decode (Tq = 1) is the same kernel: one warp per (b, h) streaming its KV cache.
//   The backward recomputes p = exp(s - lse) and uses delta = <dout, out> instead of saved probs;
//   dk and dv are accumulated with f32 atomics (several query rows and GQA heads share a key).
// Bound: prefill is compute-light at ELDER sizes; decode is memory-bound on the KV cache,
//   2 * B * Hkv * L * D * sizeof(T) bytes per step (K/V rows are re-read per GQA head through L2).
#include "common.cuh"

using namespace elder;

namespace {

constexpr int MAX_SLOTS = 8;  // D <= 256

struct AttnDims {
    int batch, q_len, kv_cap, n_heads, n_kv_heads, head_dim;
    float scale;
};

// Decodes the warp's (b, i, h) and the number of keys it sees; false for padding/out-of-range warps.
__device__ __forceinline__ bool attn_row(const AttnDims& s, const int* q_start, const int* q_valid, int& b, int& i,
                                         int& h, int& n_keys) {
    const long long w = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    h = (int)(w % s.n_heads);
    const long long bi = w / s.n_heads;
    i = (int)(bi % s.q_len);
    b = (int)(bi / s.q_len);
    if (b >= s.batch) return false;
    n_keys = min(q_start[b] + i + 1, s.kv_cap);
    return i < q_valid[b];
}

template <typename T>
__device__ void attention_forward(const T* q, const T* k, const T* v, const int* q_start, const int* q_valid,
                                  AttnDims s, T* out, float* lse) {
    const int lane = threadIdx.x & 31;
    int b, i, h, n_keys;
    const bool valid = attn_row(s, q_start, q_valid, b, i, h, n_keys);
    if (b >= s.batch) return;
    const int D = s.head_dim, qw = s.n_heads * D, kvw = s.n_kv_heads * D;
    const int kvh = h / (s.n_heads / s.n_kv_heads);
    T* orow = out + ((size_t)b * s.q_len + i) * qw + (size_t)h * D;
    float* lse_slot = lse ? lse + ((size_t)b * s.n_heads + h) * s.q_len + i : nullptr;
    if (!valid) {
        for (int d = lane; d < D; d += 32) orow[d] = from_f32<T>(0.0f);
        if (lse_slot && lane == 0) *lse_slot = 0.0f;
        return;
    }
    const T* qrow = q + ((size_t)b * s.q_len + i) * qw + (size_t)h * D;
    const T* kbase = k + (size_t)b * s.kv_cap * kvw + (size_t)kvh * D;
    const T* vbase = v + (size_t)b * s.kv_cap * kvw + (size_t)kvh * D;

    float qv[MAX_SLOTS], acc[MAX_SLOTS];
#pragma unroll
    for (int c = 0; c < MAX_SLOTS; ++c) {
        const int d = lane + 32 * c;
        qv[c] = d < D ? to_f32(qrow[d]) : 0.0f;
        acc[c] = 0.0f;
    }
    float run_max = -INFINITY, run_sum = 0.0f;
    for (int j0 = 0; j0 < n_keys; j0 += 32) {
        const int chunk = min(32, n_keys - j0);
        // Scores of the chunk: lane jj ends up holding the score of key j0 + jj.
        float score = -INFINITY;
        for (int jj = 0; jj < chunk; ++jj) {
            const T* krow = kbase + (size_t)(j0 + jj) * kvw;
            float part = 0.0f;
#pragma unroll
            for (int c = 0; c < MAX_SLOTS; ++c) {
                const int d = lane + 32 * c;
                if (d < D) part += qv[c] * to_f32(krow[d]);
            }
            part = warp_sum(part) * s.scale;
            if (lane == jj) score = part;
        }
        const float new_max = fmaxf(run_max, warp_max(score));  // finite: chunk >= 1
        const float correction = expf(run_max - new_max);       // 0 on the first chunk
        const float p = lane < chunk ? expf(score - new_max) : 0.0f;
        run_sum = run_sum * correction + warp_sum(p);
#pragma unroll
        for (int c = 0; c < MAX_SLOTS; ++c) acc[c] *= correction;
        for (int jj = 0; jj < chunk; ++jj) {
            const float pj = __shfl_sync(0xffffffffu, p, jj);
            const T* vrow = vbase + (size_t)(j0 + jj) * kvw;
#pragma unroll
            for (int c = 0; c < MAX_SLOTS; ++c) {
                const int d = lane + 32 * c;
                if (d < D) acc[c] += pj * to_f32(vrow[d]);
            }
        }
        run_max = new_max;
    }
    const float inv = 1.0f / run_sum;
#pragma unroll
    for (int c = 0; c < MAX_SLOTS; ++c) {
        const int d = lane + 32 * c;
        if (d < D) orow[d] = from_f32<T>(acc[c] * inv);
    }
    if (lse_slot && lane == 0) *lse_slot = run_max + logf(run_sum);
}

template <typename T>
__device__ void attention_backward(const T* q, const T* k, const T* v, const T* out, const T* dout,
                                   const float* lse, const int* q_start, const int* q_valid, AttnDims s, float* dq,
                                   float* dk, float* dv) {
    const int lane = threadIdx.x & 31;
    int b, i, h, n_keys;
    if (!attn_row(s, q_start, q_valid, b, i, h, n_keys)) return;
    const int D = s.head_dim, qw = s.n_heads * D, kvw = s.n_kv_heads * D;
    const int kvh = h / (s.n_heads / s.n_kv_heads);
    const size_t qoff = ((size_t)b * s.q_len + i) * qw + (size_t)h * D;
    const size_t kvoff = (size_t)b * s.kv_cap * kvw + (size_t)kvh * D;
    const float row_lse = lse[((size_t)b * s.n_heads + h) * s.q_len + i];

    float qv[MAX_SLOTS], dov[MAX_SLOTS], dqv[MAX_SLOTS];
    float delta = 0.0f;
#pragma unroll
    for (int c = 0; c < MAX_SLOTS; ++c) {
        const int d = lane + 32 * c;
        qv[c] = d < D ? to_f32(q[qoff + d]) : 0.0f;
        dov[c] = d < D ? to_f32(dout[qoff + d]) : 0.0f;
        delta += d < D ? dov[c] * to_f32(out[qoff + d]) : 0.0f;
        dqv[c] = 0.0f;
    }
    delta = warp_sum(delta);  // = sum_j p_j dp_j
    for (int j = 0; j < n_keys; ++j) {
        const T* krow = k + kvoff + (size_t)j * kvw;
        const T* vrow = v + kvoff + (size_t)j * kvw;
        float qk = 0.0f, dp = 0.0f;
#pragma unroll
        for (int c = 0; c < MAX_SLOTS; ++c) {
            const int d = lane + 32 * c;
            if (d < D) {
                qk += qv[c] * to_f32(krow[d]);
                dp += dov[c] * to_f32(vrow[d]);
            }
        }
        qk = warp_sum(qk);
        dp = warp_sum(dp);
        const float p = expf(qk * s.scale - row_lse);
        const float ds = p * (dp - delta) * s.scale;
        float* dkrow = dk + kvoff + (size_t)j * kvw;
        float* dvrow = dv + kvoff + (size_t)j * kvw;
#pragma unroll
        for (int c = 0; c < MAX_SLOTS; ++c) {
            const int d = lane + 32 * c;
            if (d < D) {
                dqv[c] += ds * to_f32(krow[d]);
                atomicAdd(&dkrow[d], ds * qv[c]);
                atomicAdd(&dvrow[d], p * dov[c]);
            }
        }
    }
#pragma unroll
    for (int c = 0; c < MAX_SLOTS; ++c) {
        const int d = lane + 32 * c;
        if (d < D) dq[qoff + d] += dqv[c];  // this warp alone owns the (b, i, h) slice of dq
    }
}

}  // namespace

#define ATTENTION_ENTRY_POINTS(S, T)                                                                             \
    extern "C" __global__ void attention_fwd_##S(const T* q, const T* k, const T* v, const int* q_start,         \
                                                 const int* q_valid, int batch, int q_len, int kv_cap,            \
                                                 int n_heads, int n_kv_heads, int head_dim, float scale, T* out,  \
                                                 float* lse) {                                                    \
        attention_forward<T>(q, k, v, q_start, q_valid,                                                          \
                             AttnDims{batch, q_len, kv_cap, n_heads, n_kv_heads, head_dim, scale}, out, lse);    \
    }                                                                                                            \
    extern "C" __global__ void attention_bwd_##S(const T* q, const T* k, const T* v, const T* out, const T* dout, \
                                                 const float* lse, const int* q_start, const int* q_valid,        \
                                                 int batch, int q_len, int kv_cap, int n_heads, int n_kv_heads,   \
                                                 int head_dim, float scale, float* dq, float* dk, float* dv) {    \
        attention_backward<T>(q, k, v, out, dout, lse, q_start, q_valid,                                         \
                              AttnDims{batch, q_len, kv_cap, n_heads, n_kv_heads, head_dim, scale}, dq, dk, dv); \
    }

ELDER_FOR_DTYPES(ATTENTION_ENTRY_POINTS)
