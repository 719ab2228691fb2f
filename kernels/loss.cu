// Losses and their gradients.
//
// cross_entropy_{dtype}: softmax cross-entropy over the vocabulary, forward + backward in one pass.
//   logits [n, V] T; targets [n] i32 (-1 = ignored row); dlogits [n, V] T = (softmax - onehot) * weight
//   * loss_scale (zero for ignored rows; loss_scale [1] f32 is read on the device, null = 1, see
//   adam.cu); row_loss [n] f32 = logsumexp - logit[target], unscaled (0 for ignored rows; NaN for a
//   target outside the vocabulary). The caller sums row_loss (the CPU twin returns the sum).
//   Launch: one block of 512 threads per row; three passes over the row (max, sum of exp, write).
//   Bound: memory, 2 * n * V * sizeof(T) (a 50257-wide bf16 row is 100 kB and stays in L2 between passes).
//
// router_backward_f32: the router's logit gradient from dgates plus the guided loss, for R rows
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

#include "common.cuh"

using namespace elder;

namespace {

template <typename T>
__device__ void cross_entropy(const T* logits, const int32_t* targets, float weight, const float* loss_scale, int n,
                              int vocab, T* dlogits, float* row_loss) {
    __shared__ float scratch[32];
    if (loss_scale != nullptr) weight *= *loss_scale;
    const int row = blockIdx.x;
    if (row >= n) return;
    const T* x = logits + (size_t)row * vocab;
    T* dx = dlogits + (size_t)row * vocab;
    const int target = targets[row];
    if (target < 0) {
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) dx[i] = from_f32<T>(0.0f);
        if (threadIdx.x == 0) row_loss[row] = 0.0f;
        return;
    }
    float mx = -INFINITY;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) mx = fmaxf(mx, to_f32(x[i]));
    mx = block_max(mx, scratch);
    float sum = 0.0f;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) sum += expf(to_f32(x[i]) - mx);
    sum = block_sum(sum, scratch);
    const float lse = mx + logf(sum);
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        float g = expf(to_f32(x[i]) - lse) * weight;
        if (i == target) g -= weight;
        dx[i] = from_f32<T>(g);
    }
    if (threadIdx.x == 0) row_loss[row] = target < vocab ? lse - to_f32(x[target]) : NAN;
}

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

#define LOSS_ENTRY_POINTS(S, T)                                                                           \
    extern "C" __global__ void cross_entropy_##S(const T* logits, const int32_t* targets, float weight,        \
                                                 const float* loss_scale, int n, int vocab, T* dlogits,    \
                                                 float* row_loss) {                                        \
        cross_entropy<T>(logits, targets, weight, loss_scale, n, vocab, dlogits, row_loss);                \
    }

ELDER_FOR_DTYPES(LOSS_ENTRY_POINTS)

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
