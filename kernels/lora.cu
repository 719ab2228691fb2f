// Batched MoLoRA for one site (one wrapped linear layer): every sequence b has its own k experts,
// gates and in-scope flag; only the selected experts are computed.
//
//   shrink[b, j, t, :] = x[b, t, :] A[e]                      e = experts[b, j]; f32 [B, k, T, r]
//   out[b, t, :]      += in_scope[b] * sum_j gates[b, j] * scale * shrink[b, j, t, :] B[e]
// Shapes: x [B, T, d_in] T; A [E, d_in, r] f32; Bm [E, r, d_out] f32; experts [B, k] u32;
//   gates [B, k] f32; in_scope [B] u8 (null = all in scope, as while training); out [B, T, d_out] T.
// Backward (scale folded into g = gates * scale):
//   dh_raw[b, j, t, :] = dout[b, t, :] Bm[e]^T                               f32 [B, k, T, r]
//   dgates[b, j]      = scale * <shrink[b, j], dh_raw[b, j]>                (0 when out of scope)
//   dB[e]            += (g shrink[b, j])^T dout[b]                           f32 atomics
//   dA[e]            += x[b]^T (g dh_raw[b, j])                              f32 atomics
//   dx[b]            += sum_j (g dh_raw[b, j]) A[e]^T
// Launch shapes:
//   shrink / dh_raw: grid (B*k, ceil(T / 8)), 256 threads, one warp per token; lanes stride over the
//     reduction dimension and keep r <= MAX_RANK partial sums in registers, then warp-reduce.
//   expand / dx: grid (B*T, ceil(d / 256)), 256 threads, one thread per output column; the k*r
//     coefficients of the token sit in shared memory.
//   dA / dB: grid (B*k, ceil(d / 256)), one thread per row of the expert matrix, looping over T.
//   dgates: grid B*k, 256 threads, block reduction over T*r.
// Bound: launch latency at ELDER sizes (r = 8: an expert is 2 * d * r * 4 = 100 kB for d = 1600).
//   Bytes per site: x and out once, k experts per sequence; FLOPs 2*B*T*k*r*(d_in + d_out).
#include "common.cuh"

using namespace elder;

namespace {

constexpr int MAX_RANK = 32;
constexpr int MAX_K = 8;
constexpr int TOKENS_PER_BLOCK = 8;  // one per warp of a 256-thread block

__device__ __forceinline__ bool seq_in_scope(const uint8_t* in_scope, int b) { return !in_scope || in_scope[b]; }

// y[b, j, t, c] = sum_i src[b, t, i] * M[e, i, c] (for shrink: M = A viewed [d, r]) or, with
// `transposed`, sum_i src[b, t, i] * M[e, c, i] (for dh_raw: M = Bm, [r, d]).
template <typename T, bool transposed>
__device__ void project_to_rank(const T* src, const float* m, const uint32_t* experts, const uint8_t* in_scope,
                                int batch, int seq, int d, int rank, int k, int n_experts, float* y) {
    const int bj = blockIdx.x, b = bj / k;
    const int t = blockIdx.y * TOKENS_PER_BLOCK + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (b >= batch || t >= seq) return;
    float* yrow = y + ((size_t)bj * seq + t) * rank;
    const uint32_t e = experts[bj];
    if (!seq_in_scope(in_scope, b) || e >= (uint32_t)n_experts) {
        // Out of scope: defined zeros. Bad expert index: NaN so the error cannot pass silently.
        const float fill = seq_in_scope(in_scope, b) ? NAN : 0.0f;
        for (int c = lane; c < rank; c += 32) yrow[c] = fill;
        return;
    }
    const T* srow = src + ((size_t)b * seq + t) * d;
    const float* me = m + (size_t)e * d * rank;
    float acc[MAX_RANK];
#pragma unroll
    for (int c = 0; c < MAX_RANK; ++c) acc[c] = 0.0f;
    for (int i = lane; i < d; i += 32) {
        const float xv = to_f32(srow[i]);
#pragma unroll
        for (int c = 0; c < MAX_RANK; ++c)
            if (c < rank) acc[c] += xv * (transposed ? me[(size_t)c * d + i] : me[(size_t)i * rank + c]);
    }
#pragma unroll
    for (int c = 0; c < MAX_RANK; ++c) {
        if (c < rank) {
            const float v = warp_sum(acc[c]);
            if (lane == 0) yrow[c] = v;
        }
    }
}

// dst[b, t, o] += sum_j coef[j, c] * M[e_j, ...] where coef = gates * scale * src[b, j, t, c];
// M[e, c, o] for expand (Bm [E, r, d]) or M[e, o, c] for dx (A [E, d, r], `transposed`).
template <typename T, bool transposed>
__device__ void expand_from_rank(const float* src, const float* m, const uint32_t* experts, const float* gates,
                                 const uint8_t* in_scope, int batch, int seq, int d, int rank, int k,
                                 int n_experts, float scale, T* dst) {
    __shared__ float coef[MAX_K * MAX_RANK];
    __shared__ uint32_t chosen[MAX_K];
    const int bt = blockIdx.x, b = bt / seq, t = bt % seq;
    if (b >= batch || !seq_in_scope(in_scope, b)) return;  // out of scope: dst untouched
    for (int jc = threadIdx.x; jc < k * rank; jc += blockDim.x) {
        const int j = jc / rank, c = jc % rank;
        coef[jc] = gates[b * k + j] * scale * src[(((size_t)b * k + j) * seq + t) * rank + c];
    }
    for (int j = threadIdx.x; j < k; j += blockDim.x) chosen[j] = experts[b * k + j];
    __syncthreads();
    const int o = blockIdx.y * blockDim.x + threadIdx.x;
    if (o >= d) return;
    float acc = 0.0f;
    for (int j = 0; j < k; ++j) {
        const uint32_t e = chosen[j];
        if (e >= (uint32_t)n_experts) {
            acc = NAN;
            break;
        }
        const float* me = m + (size_t)e * d * rank;
        for (int c = 0; c < rank; ++c)
            acc += coef[j * rank + c] * (transposed ? me[(size_t)o * rank + c] : me[(size_t)c * d + o]);
    }
    T* drow = dst + ((size_t)b * seq + t) * d;
    drow[o] = from_f32<T>(to_f32(drow[o]) + acc);
}

// dM[e, i, c] (+)= g * sum_t src[b, t, i] * lowrank[b, j, t, c]   (dA: src = x, lowrank = dh_raw)
// dM[e, c, i] (+)= g * sum_t lowrank[b, j, t, c] * src[b, t, i]   (dB: src = dout, lowrank = shrink,
//                                                                 `transposed`)
template <typename T, bool transposed>
__device__ void expert_weight_grad(const T* src, const float* lowrank, const uint32_t* experts, const float* gates,
                                   const uint8_t* in_scope, int batch, int seq, int d, int rank, int k,
                                   int n_experts, float scale, float* dm) {
    const int bj = blockIdx.x, b = bj / k;
    const int i = blockIdx.y * blockDim.x + threadIdx.x;
    if (b >= batch || i >= d || !seq_in_scope(in_scope, b)) return;
    const uint32_t e = experts[bj];
    if (e >= (uint32_t)n_experts) return;
    const float g = gates[bj] * scale;
    float acc[MAX_RANK];
#pragma unroll
    for (int c = 0; c < MAX_RANK; ++c) acc[c] = 0.0f;
    const float* lr = lowrank + (size_t)bj * seq * rank;
    for (int t = 0; t < seq; ++t) {
        const float sv = to_f32(src[((size_t)b * seq + t) * d + i]);
#pragma unroll
        for (int c = 0; c < MAX_RANK; ++c)
            if (c < rank) acc[c] += sv * lr[(size_t)t * rank + c];
    }
    float* de = dm + (size_t)e * d * rank;
#pragma unroll
    for (int c = 0; c < MAX_RANK; ++c) {
        if (c < rank) atomicAdd(transposed ? &de[(size_t)c * d + i] : &de[(size_t)i * rank + c], g * acc[c]);
    }
}

__device__ void lora_dgates(const float* shrink, const float* dh_raw, const uint8_t* in_scope, int batch, int seq,
                            int rank, int k, float scale, float* dgates) {
    __shared__ float scratch[32];
    const int bj = blockIdx.x, b = bj / k;
    if (b >= batch) return;
    if (!seq_in_scope(in_scope, b)) {
        if (threadIdx.x == 0) dgates[bj] = 0.0f;
        return;
    }
    const size_t n = (size_t)seq * rank, base = (size_t)bj * n;
    float acc = 0.0f;
    for (size_t i = threadIdx.x; i < n; i += blockDim.x) acc += shrink[base + i] * dh_raw[base + i];
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) dgates[bj] = scale * acc;
}

}  // namespace

#define LORA_ENTRY_POINTS(S, T)                                                                                 \
    extern "C" __global__ void lora_shrink_##S(const T* x, const float* a, const uint32_t* experts,             \
                                               const uint8_t* in_scope, int batch, int seq, int d_in, int rank,  \
                                               int k, int n_experts, float* shrink) {                            \
        project_to_rank<T, false>(x, a, experts, in_scope, batch, seq, d_in, rank, k, n_experts, shrink);      \
    }                                                                                                           \
    extern "C" __global__ void lora_expand_##S(const float* shrink, const float* bm, const uint32_t* experts,   \
                                               const float* gates, const uint8_t* in_scope, int batch, int seq, \
                                               int d_out, int rank, int k, int n_experts, float scale, T* out) { \
        expand_from_rank<T, false>(shrink, bm, experts, gates, in_scope, batch, seq, d_out, rank, k, n_experts, \
                                   scale, out);                                                                 \
    }                                                                                                           \
    extern "C" __global__ void lora_bwd_dh_##S(const T* dout, const float* bm, const uint32_t* experts,         \
                                               const uint8_t* in_scope, int batch, int seq, int d_out, int rank, \
                                               int k, int n_experts, float* dh_raw) {                            \
        project_to_rank<T, true>(dout, bm, experts, in_scope, batch, seq, d_out, rank, k, n_experts, dh_raw);  \
    }                                                                                                           \
    extern "C" __global__ void lora_bwd_db_##S(const T* dout, const float* shrink, const uint32_t* experts,     \
                                               const float* gates, const uint8_t* in_scope, int batch, int seq, \
                                               int d_out, int rank, int k, int n_experts, float scale,           \
                                               float* db) {                                                      \
        expert_weight_grad<T, true>(dout, shrink, experts, gates, in_scope, batch, seq, d_out, rank, k,        \
                                    n_experts, scale, db);                                                      \
    }                                                                                                           \
    extern "C" __global__ void lora_bwd_da_##S(const T* x, const float* dh_raw, const uint32_t* experts,        \
                                               const float* gates, const uint8_t* in_scope, int batch, int seq, \
                                               int d_in, int rank, int k, int n_experts, float scale,            \
                                               float* da) {                                                      \
        expert_weight_grad<T, false>(x, dh_raw, experts, gates, in_scope, batch, seq, d_in, rank, k,           \
                                     n_experts, scale, da);                                                     \
    }                                                                                                           \
    extern "C" __global__ void lora_bwd_dx_##S(const float* dh_raw, const float* a, const uint32_t* experts,    \
                                               const float* gates, const uint8_t* in_scope, int batch, int seq, \
                                               int d_in, int rank, int k, int n_experts, float scale, T* dx) {   \
        expand_from_rank<T, true>(dh_raw, a, experts, gates, in_scope, batch, seq, d_in, rank, k, n_experts,   \
                                  scale, dx);                                                                   \
    }

ELDER_FOR_DTYPES(LORA_ENTRY_POINTS)

extern "C" __global__ void lora_dgates_f32(const float* shrink, const float* dh_raw, const uint8_t* in_scope,
                                           int batch, int seq, int rank, int k, float scale, float* dgates) {
    lora_dgates(shrink, dh_raw, in_scope, batch, seq, rank, k, scale, dgates);
}
