// Batched MoLoRA for one site (one wrapped linear layer): every sequence b has its own k experts,
// gates and in-scope flag; only the selected experts are computed.
//
//   shrink[b, j, t, :] = x[b, t, :] A[e]                      e = experts[b, j]; f32 [B, k, T, r]
//   out[b, t, :]      += in_scope[b] * sum_j gates[b, j] * scale * shrink[b, j, t, :] B[e]
// Shapes: x [B, T, d_in] T; A [E, d_in, r] f32; Bm [E, r, d_out] f32; experts [B, k] u32;
//   gates [B, k] f32; in_scope [B] u8 (null = all in scope, as while training); first_row [B] u32
//   (null = 0): the rows of sequence b before first_row[b] are left as if it were out of scope
//   (`expert_rows = "answer"`: the prompt keeps the base model's activations, the experts change
//   the rows from the last prompt token on); out [B, T, d_out] T; shrink is written only when the
//   caller keeps it for the backward (null at inference).
// Backward (scale folded into g = gates * scale):
//   dh_raw[b, j, t, :] = dout[b, t, :] Bm[e]^T                               f32 [B, k, T, r]
//   dgates[b, j]      = scale * <shrink[b, j], dh_raw[b, j]>                (0 when out of scope)
//   dB[e]            += (g shrink[b, j])^T dout[b]                           f32 atomics
//   dA[e]            += x[b]^T (g dh_raw[b, j])                              f32 atomics
//   dx[b]            += sum_j (g dh_raw[b, j]) A[e]^T
// Rows before first_row[b]: the forward saves zeros for their shrink and dh_raw is zero there, so
// dB, dA and dgates get nothing from them without a mask of their own; dx is left untouched.
// Launch shapes:
//   forward (lora_forward): one launch per site. Grid (B*T, chunks), 256 threads: block (token,
//     chunk) reduces its token's k*r shrink values over d_in (threads stride over d_in with r
//     partial sums in registers, then warp and block reductions), then adds its chunk of the
//     d_out columns of the expansion. Every chunk of a token repeats the shrink (A comes from L2):
//     that buys the single launch, and the launcher uses more than one chunk only when tokens are
//     too few to fill the GPU (decode), where the shrink is a small share of the work.
//   dh_raw: grid (B*k, ceil(T / 8)), 256 threads, one warp per token; lanes stride over the
//     reduction dimension and keep r <= MAX_RANK partial sums in registers, then warp-reduce.
//   dx: grid (B*T, ceil(d / 256)), 256 threads, one thread per output column; the k*r coefficients
//     of the token sit in shared memory.
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
constexpr int FORWARD_THREADS = 256;
constexpr int FORWARD_WARPS = FORWARD_THREADS / 32;

__device__ __forceinline__ bool seq_in_scope(const uint8_t* in_scope, int b) { return !in_scope || in_scope[b]; }

// Whether row t of sequence b comes before the first row the experts change.
__device__ __forceinline__ bool before_first_row(const uint32_t* first_row, int b, int t) {
    return first_row && (uint32_t)t < first_row[b];
}

// The whole forward of a site for one token and one chunk of its output columns (see the launch
// shapes above). Must run with FORWARD_THREADS threads.
template <typename T>
__device__ void mix_forward(const T* x, const float* a, const float* bm, const uint32_t* experts,
                            const float* gates, const uint8_t* in_scope, const uint32_t* first_row, int batch,
                            int seq, int d_in, int d_out,
                            int rank, int k, int n_experts, float scale, float* shrink, T* out) {
    __shared__ float partial[FORWARD_WARPS][MAX_RANK];
    __shared__ float coef[MAX_K * MAX_RANK];
    __shared__ uint32_t chosen[MAX_K];
    const int bt = blockIdx.x, b = bt / seq, t = bt % seq;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (b >= batch) return;
    // Only the first chunk of a token writes its shrink (every chunk computes the same values).
    float* shrink_out = (shrink != nullptr && blockIdx.y == 0) ? shrink : nullptr;
    if (!seq_in_scope(in_scope, b) || before_first_row(first_row, b, t)) {
        // Out of scope (or before the first changed row): the output is untouched and the saved
        // shrink is defined zeros.
        if (shrink_out)
            for (int jc = threadIdx.x; jc < k * rank; jc += blockDim.x)
                shrink_out[(((size_t)b * k + jc / rank) * seq + t) * rank + jc % rank] = 0.0f;
        return;
    }
    if (threadIdx.x < k) chosen[threadIdx.x] = experts[b * k + threadIdx.x];
    __syncthreads();

    // Shrink: coef[j, c] = gates[j] * scale * (x[t] A[e_j])[c], expert by expert.
    const T* xrow = x + (size_t)bt * d_in;
    for (int j = 0; j < k; ++j) {
        const uint32_t e = chosen[j];
        const bool valid = e < (uint32_t)n_experts;
        float acc[MAX_RANK];
#pragma unroll
        for (int c = 0; c < MAX_RANK; ++c) acc[c] = 0.0f;
        if (valid) {
            const float* ae = a + (size_t)e * d_in * rank;
            for (int i = threadIdx.x; i < d_in; i += blockDim.x) {
                const float xv = to_f32(xrow[i]);
#pragma unroll
                for (int c = 0; c < MAX_RANK; ++c)
                    if (c < rank) acc[c] += xv * ae[(size_t)i * rank + c];
            }
        }
#pragma unroll
        for (int c = 0; c < MAX_RANK; ++c) {
            if (c < rank) {
                const float v = warp_sum(acc[c]);
                if (lane == 0) partial[warp][c] = v;
            }
        }
        __syncthreads();
        if (threadIdx.x < rank) {
            float sum = 0.0f;
            for (int w = 0; w < FORWARD_WARPS; ++w) sum += partial[w][threadIdx.x];
            // A bad expert index gives NaN, so the error cannot pass silently.
            if (!valid) sum = NAN;
            coef[j * rank + threadIdx.x] = gates[b * k + j] * scale * sum;
            if (shrink_out) shrink_out[(((size_t)b * k + j) * seq + t) * rank + threadIdx.x] = sum;
        }
        __syncthreads();  // `partial` is reused by the next expert; `coef` is read below
    }

    // Expand this block's chunk of the output columns.
    const int per_chunk = (d_out + gridDim.y - 1) / gridDim.y;
    const int begin = blockIdx.y * per_chunk, end = min(d_out, begin + per_chunk);
    T* orow = out + (size_t)bt * d_out;
    for (int o = begin + threadIdx.x; o < end; o += blockDim.x) {
        float acc = 0.0f;
        for (int j = 0; j < k; ++j) {
            const uint32_t e = chosen[j];
            const float* be = bm + (size_t)(e < (uint32_t)n_experts ? e : 0) * rank * d_out;
            for (int c = 0; c < rank; ++c) acc += coef[j * rank + c] * be[(size_t)c * d_out + o];
        }
        orow[o] = from_f32<T>(to_f32(orow[o]) + acc);
    }
}

// dh_raw[b, j, t, c] = sum_o dout[b, t, o] * Bm[e, c, o]   (Bm [E, r, d_out]).
template <typename T>
__device__ void project_to_rank(const T* src, const float* m, const uint32_t* experts, const uint8_t* in_scope,
                                const uint32_t* first_row, int batch, int seq, int d, int rank, int k,
                                int n_experts, float* y) {
    const int bj = blockIdx.x, b = bj / k;
    const int t = blockIdx.y * TOKENS_PER_BLOCK + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (b >= batch || t >= seq) return;
    float* yrow = y + ((size_t)bj * seq + t) * rank;
    const uint32_t e = experts[bj];
    const bool unused = !seq_in_scope(in_scope, b) || before_first_row(first_row, b, t);
    if (unused || e >= (uint32_t)n_experts) {
        // Unused row: defined zeros. Bad expert index: NaN so the error cannot pass silently.
        const float fill = unused ? 0.0f : NAN;
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
            if (c < rank) acc[c] += xv * me[(size_t)c * d + i];
    }
#pragma unroll
    for (int c = 0; c < MAX_RANK; ++c) {
        if (c < rank) {
            const float v = warp_sum(acc[c]);
            if (lane == 0) yrow[c] = v;
        }
    }
}

// dx[b, t, i] += sum_j coef[j, c] * A[e_j, i, c] where coef = gates * scale * dh_raw[b, j, t, c]
// (A [E, d_in, r]).
template <typename T>
__device__ void expand_from_rank(const float* src, const float* m, const uint32_t* experts, const float* gates,
                                 const uint8_t* in_scope, const uint32_t* first_row, int batch, int seq, int d,
                                 int rank, int k, int n_experts, float scale, T* dst) {
    __shared__ float coef[MAX_K * MAX_RANK];
    __shared__ uint32_t chosen[MAX_K];
    const int bt = blockIdx.x, b = bt / seq, t = bt % seq;
    // Out of scope or before the first changed row: dst untouched.
    if (b >= batch || !seq_in_scope(in_scope, b) || before_first_row(first_row, b, t)) return;
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
            acc += coef[j * rank + c] * me[(size_t)o * rank + c];
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
    extern "C" __global__ void __launch_bounds__(FORWARD_THREADS)                                               \
        lora_forward_##S(const T* x, const float* a, const float* bm, const uint32_t* experts, const float* gates, \
                         const uint8_t* in_scope, const uint32_t* first_row, int batch, int seq, int d_in,      \
                         int d_out, int rank, int k, int n_experts, float scale, float* shrink, T* out) {       \
        mix_forward<T>(x, a, bm, experts, gates, in_scope, first_row, batch, seq, d_in, d_out, rank, k, n_experts, \
                       scale, shrink, out);                                                                     \
    }                                                                                                           \
    extern "C" __global__ void lora_bwd_dh_##S(const T* dout, const float* bm, const uint32_t* experts,         \
                                               const uint8_t* in_scope, const uint32_t* first_row, int batch,   \
                                               int seq, int d_out, int rank, int k, int n_experts,              \
                                               float* dh_raw) {                                                  \
        project_to_rank<T>(dout, bm, experts, in_scope, first_row, batch, seq, d_out, rank, k, n_experts,       \
                           dh_raw);                                                                             \
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
                                               const float* gates, const uint8_t* in_scope,                     \
                                               const uint32_t* first_row, int batch, int seq, int d_in,         \
                                               int rank, int k, int n_experts, float scale, T* dx) {            \
        expand_from_rank<T>(dh_raw, a, experts, gates, in_scope, first_row, batch, seq, d_in, rank, k,          \
                            n_experts, scale, dx);                                                              \
    }

ELDER_FOR_DTYPES(LORA_ENTRY_POINTS)

extern "C" __global__ void lora_dgates_f32(const float* shrink, const float* dh_raw, const uint8_t* in_scope,
                                           int batch, int seq, int rank, int k, float scale, float* dgates) {
    lora_dgates(shrink, dh_raw, in_scope, batch, seq, rank, k, scale, dgates);
}
