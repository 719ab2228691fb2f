// Fused routing for ALL MoLoRA layers of a batch in one launch, with no host round trip:
//   x[b] = q[b], or with a mean (query centring) (q[b] - mean) / rms(q[b] - mean)   q [B, d_in] T
//   logits[l, b, :] = x[b] W_r[l]^T + b_r[l]        W_r [L, E, d_in] f32, b_r [L, E] f32
//   probs = softmax(logits)                          [L, B, E] f32
//   experts, gates = top-k of probs                  [L, B, k] u32 / f32 (gates renormalised on request)
//   code[b] = k-hot bits of every layer's choice     [B, words] u64, bit (l * E + e) lives in
//                                                    word (bit / 64), position (bit % 64)
//   min_dist[b] = min_n popcount(code[b] ^ codebook[n])   codebook [N, words] u64; INT_MAX when N == 0
//   in_scope[b] = N > 0 && min_dist[b] < threshold   [B] u8
// Launch: one block of 256 threads per sequence (grid = B); dynamic shared memory holds the code
//   words, the L*E logits and the f32 router input: words * 8 + (L * E + d_in) * 4 bytes. The block
//   stages its router input, warps take (layer, expert) dot products round-robin, then one warp per layer does softmax + top-k (E <= 64: two entries per lane), then
//   every thread scans a strided share of the codebook and the block reduces the minimum.
// Bound: launch latency at ELDER sizes. Bytes: L*E*d_in*4 router weights (L1/L2 shared across the
//   B blocks) + N * words * 8 codebook bytes per sequence (10^5 codes x 1 word = 0.8 MB).
//
// router_backward_f32 (the routers' backward, with the guided loss): the router's logit gradient from dgates plus the guided loss, for R rows
//   (rows = layers * batch, layer-major, so one launch serves every layer).
//   probs [R, E], experts / gates / dgates [R, k], preset [R, P] u32 (null = no guidance);
//   dlogits [R, E] = p * (dp - <p, dp>) where dp gathers dgates (optionally through the renormalisation)
//   and -guide_weight * loss_scale / (batch * p) for each preset expert (dgates already carry the
//   scale; loss_scale null = 1); guide_loss [R] = -(1/batch) sum log p[preset], unscaled.
//   Launch: one warp per row (E <= 64, two experts per lane), 4 rows per 128-thread block.
//
// router_param_grad_f32: the routers' parameter gradients from their logit gradients, every layer in
//   one launch: dw[l, e, :] += sum_b dlogits[l, b, e] * q[b, :], db[l, e] += sum_b dlogits[l, b, e].
//   dlogits [L, B, E] (router_backward's output), q [B, d_in] f32 (what the routers read),
//   dw [L, E, d_in], db [L, E] f32, accumulated (+=) like the CPU twin.
//   Launch: grid-stride, one thread per output of the L * E rows of d_in + 1 columns (the last is the
//   bias), summing over b in order: no atomics. Bound: L*E*d_in*4*2 + B*d_in*4 bytes (q stays in L2).

#include <float.h>
#include <limits.h>

#include "common.cuh"

using namespace elder;

namespace {

constexpr int ROUTER_THREADS = 256;

// Warp-wide arg-max; ties go to the lower index (torch.topk / the CPU twin).
__device__ __forceinline__ void warp_argmax(float& v, int& idx) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, v, o);
        const int oi = __shfl_xor_sync(0xffffffffu, idx, o);
        if (ov > v || (ov == v && oi < idx)) {
            v = ov;
            idx = oi;
        }
    }
}

// The routers' input row of one sequence, as f32 in `dst`: the query itself, or (mean != nullptr)
// the query minus the mean, scaled to unit RMS (CPU twin: molora::center_queries). Every thread of
// the block calls it; `scratch` is 32 floats of shared memory. Callers sync before reading `dst`
// across threads.
template <typename T>
__device__ void stage_router_input(const T* qb, const float* mean, int d_in, float* dst, float* scratch) {
    float sum_sq = 0.0f;
    for (int i = threadIdx.x; i < d_in; i += blockDim.x) {
        const float v = to_f32(qb[i]) - (mean != nullptr ? mean[i] : 0.0f);
        dst[i] = v;
        sum_sq += v * v;
    }
    if (mean == nullptr) return;  // uniform across the block
    const float rms = fmaxf(sqrtf(block_sum(sum_sq, scratch) / (float)d_in), 1e-6f);
    // Each thread rescales the elements it wrote itself: no barrier needed before this loop.
    for (int i = threadIdx.x; i < d_in; i += blockDim.x) dst[i] = dst[i] / rms;
}

template <typename T>
__device__ void router_fused(const T* q, const float* mean, const float* w_r, const float* b_r, int batch, int layers, int experts,
                             int d_in, int k, int renormalize, const uint64_t* codebook, int n_codes, int words,
                             int threshold, float* probs, uint32_t* sel, float* gates, uint64_t* codes,
                             int* min_dist, uint8_t* in_scope) {
    ELDER_DYNAMIC_SHARED(unsigned long long, shared_words);
    unsigned long long* code = shared_words;          // [words]
    float* logits = (float*)(shared_words + words);   // [layers * experts]
    float* x = logits + layers * experts;              // [d_in] the router input
    __shared__ int warp_min[ROUTER_THREADS / 32];
    __shared__ float scratch[32];

    const int b = blockIdx.x;
    if (b >= batch) return;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    for (int w = threadIdx.x; w < words; w += blockDim.x) code[w] = 0ull;
    stage_router_input(q + (size_t)b * d_in, mean, d_in, x, scratch);
    __syncthreads();

    // 1. Router logits: one warp per (layer, expert) row of W_r.
    for (int le = warp; le < layers * experts; le += nwarps) {
        const float* wrow = w_r + (size_t)le * d_in;
        float acc = 0.0f;
        for (int i = lane; i < d_in; i += 32) acc += x[i] * wrow[i];
        acc = warp_sum(acc);
        if (lane == 0) logits[le] = acc + b_r[le];
    }
    __syncthreads();

    // 2. Softmax + top-k + code bits: one warp per layer.
    for (int l = warp; l < layers; l += nwarps) {
        const float* lg = logits + l * experts;
        const int e0 = lane, e1 = lane + 32;
        const float x0 = e0 < experts ? lg[e0] : -INFINITY;
        const float x1 = e1 < experts ? lg[e1] : -INFINITY;
        const float mx = warp_max(fmaxf(x0, x1));
        const float p0 = e0 < experts ? expf(x0 - mx) : 0.0f;
        const float p1 = e1 < experts ? expf(x1 - mx) : 0.0f;
        const float inv = 1.0f / warp_sum(p0 + p1);
        const float q0 = p0 * inv, q1 = p1 * inv;
        float* pout = probs + ((size_t)l * batch + b) * experts;
        if (e0 < experts) pout[e0] = q0;
        if (e1 < experts) pout[e1] = q1;

        bool taken0 = false, taken1 = false;
        float chosen_sum = 0.0f;
        const size_t out_base = ((size_t)l * batch + b) * k;
        for (int j = 0; j < k; ++j) {
            // Candidate of this lane: the better of its two untaken entries.
            float v = -INFINITY;
            int idx = INT_MAX;
            if (e0 < experts && !taken0) { v = q0; idx = e0; }
            if (e1 < experts && !taken1 && (q1 > v || idx == INT_MAX)) { v = q1; idx = e1; }
            warp_argmax(v, idx);
            if (idx == e0) taken0 = true;
            if (idx == e1) taken1 = true;
            chosen_sum += v;  // summed in selection order, as the CPU twin does
            if (lane == 0) {
                sel[out_base + j] = (uint32_t)idx;
                gates[out_base + j] = v;
                const int bit = l * experts + idx;
                atomicOr(&code[bit >> 6], 1ull << (bit & 63));
            }
        }
        if (renormalize && lane == 0)
            for (int j = 0; j < k; ++j) gates[out_base + j] = gates[out_base + j] / chosen_sum;
    }
    __syncthreads();

    for (int w = threadIdx.x; w < words; w += blockDim.x) codes[(size_t)b * words + w] = code[w];

    // 3. Minimum Hamming distance to the codebook.
    int best = INT_MAX;
    for (int n = threadIdx.x; n < n_codes; n += blockDim.x) {
        const uint64_t* entry = codebook + (size_t)n * words;
        int dist = 0;
        for (int w = 0; w < words; ++w) dist += __popcll(code[w] ^ entry[w]);
        best = min(best, dist);
    }
    best = warp_min_int(best);
    if (lane == 0) warp_min[warp] = best;
    __syncthreads();
    if (warp == 0) {
        int m = lane < nwarps ? warp_min[lane] : INT_MAX;
        m = warp_min_int(m);
        if (lane == 0) {
            min_dist[b] = m;
            in_scope[b] = (n_codes > 0 && m < threshold) ? 1 : 0;
        }
    }
}

}  // namespace

#define ROUTER_ENTRY_POINTS(S, T)                                                                             \
    extern "C" __global__ void __launch_bounds__(ROUTER_THREADS) router_fused_##S(                             \
        const T* q, const float* mean, const float* w_r, const float* b_r, int batch, int layers, int experts, \
        int d_in, int k, int renormalize, const uint64_t* codebook, int n_codes, int words, int threshold,      \
        float* probs, uint32_t* sel, float* gates, uint64_t* codes, int* min_dist, uint8_t* in_scope) {        \
        router_fused<T>(q, mean, w_r, b_r, batch, layers, experts, d_in, k, renormalize, codebook, n_codes,   \
                        words, threshold, probs, sel, gates, codes, min_dist, in_scope);                       \
    }                                                                                                          \
    /* The router input alone, [B, d_in] f32 (the trainer keeps it for the router backward).          */ \
    /* Launch: one block of 256 threads per sequence.                                                  */ \
    extern "C" __global__ void __launch_bounds__(ROUTER_THREADS) router_input_##S(                             \
        const T* q, const float* mean, int batch, int d_in, float* out) {                                      \
        __shared__ float scratch[32];                                                                          \
        if ((int)blockIdx.x >= batch) return;                                                                  \
        stage_router_input(q + (size_t)blockIdx.x * d_in, mean, d_in, out + (size_t)blockIdx.x * d_in,         \
                           scratch);                                                                           \
    }

ELDER_FOR_DTYPES(ROUTER_ENTRY_POINTS)

// ------------------------------------------------------------------ the routers' backward

namespace {

__device__ void router_backward(const float* probs, const uint32_t* experts, const float* gates,
                                const float* dgates, int rows, int n_experts, int k, int renormalize,
                                const uint32_t* preset, int per_seq, int batch, float guide_weight,
                                const float* loss_scale, float* dlogits, float* guide_loss) {
    if (loss_scale != nullptr) guide_weight *= *loss_scale;
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= rows) return;
    const float* p = probs + (size_t)row * n_experts;
    const int e0 = lane, e1 = lane + 32;
    const float p0 = e0 < n_experts ? p[e0] : 0.0f, p1 = e1 < n_experts ? p[e1] : 0.0f;
    float dp0 = 0.0f, dp1 = 0.0f;
    const uint32_t* sel = experts + (size_t)row * k;
    const float* dg = dgates + (size_t)row * k;
    float total = 1.0f, mix = 0.0f;
    if (renormalize) {
        // gate_j = p_j / S  =>  dp_i = (dg_i - sum_j dg_j gate_j) / S, summed in the CPU twin's order.
        total = 0.0f;
        for (int j = 0; j < k; ++j) {
            const uint32_t e = sel[j];
            total += e < (uint32_t)n_experts ? p[e] : NAN;
            mix += dg[j] * gates[(size_t)row * k + j];
        }
    }
    for (int j = 0; j < k; ++j) {
        const float v = renormalize ? (dg[j] - mix) / total : dg[j];
        if (sel[j] == (uint32_t)e0) dp0 += v;
        if (sel[j] == (uint32_t)e1) dp1 += v;
    }
    float loss = 0.0f;
    if (preset) {
        const uint32_t* pr = preset + (size_t)row * per_seq;
        for (int j = 0; j < per_seq; ++j) {
            const uint32_t e = pr[j];
            if (e == (uint32_t)e0) dp0 -= guide_weight / (float)batch / p0;
            if (e == (uint32_t)e1) dp1 -= guide_weight / (float)batch / p1;
            if (lane == 0) loss -= e < (uint32_t)n_experts ? logf(fmaxf(p[e], FLT_MIN)) : NAN;
        }
    }
    const float dot = warp_sum(p0 * dp0 + p1 * dp1);
    float* out = dlogits + (size_t)row * n_experts;
    if (e0 < n_experts) out[e0] = p0 * (dp0 - dot);
    if (e1 < n_experts) out[e1] = p1 * (dp1 - dot);
    if (lane == 0 && guide_loss) guide_loss[row] = loss / (float)batch;
}

__device__ void router_param_grad(const float* dlogits, const float* q, int layers, int batch, int n_experts,
                                  int d_in, float* dw, float* db) {
    const size_t cols = (size_t)d_in + 1, total = (size_t)layers * n_experts * cols;
    for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (size_t)gridDim.x * blockDim.x) {
        const size_t le = idx / cols;  // row l * E + e of dw
        const int i = (int)(idx % cols);
        const int l = (int)(le / n_experts), e = (int)(le % n_experts);
        float acc = 0.0f;
        for (int b = 0; b < batch; ++b) {
            const float dl = dlogits[((size_t)l * batch + b) * n_experts + e];
            acc += i < d_in ? dl * q[(size_t)b * d_in + i] : dl;
        }
        if (i < d_in)
            dw[le * d_in + i] += acc;
        else
            db[le] += acc;
    }
}

}  // namespace

extern "C" __global__ void router_backward_f32(const float* probs, const uint32_t* experts, const float* gates,
                                               const float* dgates, int rows, int n_experts, int k,
                                               int renormalize, const uint32_t* preset, int per_seq, int batch,
                                               float guide_weight, const float* loss_scale, float* dlogits,
                                               float* guide_loss) {
    router_backward(probs, experts, gates, dgates, rows, n_experts, k, renormalize, preset, per_seq, batch,
                    guide_weight, loss_scale, dlogits, guide_loss);
}

extern "C" __global__ void router_param_grad_f32(const float* dlogits, const float* q, int layers, int batch,
                                                 int n_experts, int d_in, float* dw, float* db) {
    router_param_grad(dlogits, q, layers, batch, n_experts, d_in, dw, db);
}
