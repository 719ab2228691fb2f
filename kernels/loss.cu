// Losses and their gradients.
//
// cross_entropy_{dtype}: softmax cross-entropy over the vocabulary, forward + backward in one pass.
//   logits [n, V] T; targets [n] i32 (-1 = ignored row); dlogits [n, V] T = (softmax - onehot) * weight
//   * row_weight[row] * loss_scale (zero for ignored rows; row_weight [n] f32, null = 1 per row;
//   loss_scale [1] f32 is read on the device, null = 1, see adam.cu); row_loss [n] f32 = logsumexp -
//   logit[target], unscaled (0 for ignored rows; NaN for a target outside the vocabulary); argmax [n]
//   u32 (null = not written): the row's largest logit, the first of equals, 0xffffffff for ignored
//   rows (the trainer's early stop asks whether every target is already the argmax). The caller sums
//   row_loss (the CPU twin `ops::cross_entropy` returns the sum; `ops::argmax` is the argmax's).
//   Launch: one block of 512 threads per row; three passes over the row (max, sum of exp, write).
//   Bound: memory, 2 * n * V * sizeof(T) (a 50257-wide bf16 row is 100 kB and stays in L2 between passes).

#include "common.cuh"

using namespace elder;

namespace {

template <typename T>
__device__ void cross_entropy(const T* logits, const int32_t* targets, float weight, const float* row_weight,
                              const float* loss_scale, int n, int vocab, T* dlogits, float* row_loss,
                              uint32_t* argmax) {
    __shared__ float scratch[32];
    if (loss_scale != nullptr) weight *= *loss_scale;
    const int row = blockIdx.x;
    if (row >= n) return;
    if (row_weight != nullptr) weight *= row_weight[row];
    const T* x = logits + (size_t)row * vocab;
    T* dx = dlogits + (size_t)row * vocab;
    const int target = targets[row];
    if (target < 0) {
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) dx[i] = from_f32<T>(0.0f);
        if (threadIdx.x == 0) {
            row_loss[row] = 0.0f;
            if (argmax != nullptr) argmax[row] = 0xffffffffu;
        }
        return;
    }
    // Each thread's largest logit and its first index (indices rise along the thread's stride).
    float mx = -INFINITY;
    int first = vocab;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float v = to_f32(x[i]);
        if (first == vocab || v > mx) {
            mx = v;
            first = i;
        }
    }
    const float thread_max = mx;
    mx = block_max(mx, scratch);
    if (argmax != nullptr) {
        // The smallest index holding the row's maximum; indices are exact as floats (< 2^24).
        const float candidate = thread_max == mx ? -(float)first : -INFINITY;
        const float best = block_max(candidate, scratch);
        if (threadIdx.x == 0) argmax[row] = (uint32_t)(-best);
    }
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

}  // namespace

#define LOSS_ENTRY_POINTS(S, T)                                                                           \
    extern "C" __global__ void cross_entropy_##S(const T* logits, const int32_t* targets, float weight,        \
                                                 const float* row_weight, const float* loss_scale, int n,  \
                                                 int vocab, T* dlogits, float* row_loss, uint32_t* argmax) { \
        cross_entropy<T>(logits, targets, weight, row_weight, loss_scale, n, vocab, dlogits, row_loss,     \
                         argmax);                                                                          \
    }

ELDER_FOR_DTYPES(LOSS_ENTRY_POINTS)
