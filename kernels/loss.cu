// Losses and their gradients.
//
// cross_entropy_{dtype}: softmax cross-entropy over the vocabulary, forward + backward in one pass.
//   logits [n, V] T; targets [n] i32 (-1 = ignored row); dlogits [n, V] T = (softmax - onehot) * weight
//   * loss_scale (zero for ignored rows; loss_scale [1] f32 is read on the device, null = 1, see
//   adam.cu); row_loss [n] f32 = logsumexp - logit[target], unscaled (0 for ignored rows; NaN for a
//   target outside the vocabulary). The caller sums row_loss (the CPU twin returns the sum).
//   Launch: one block of 512 threads per row; three passes over the row (max, sum of exp, write).
//   Bound: memory, 2 * n * V * sizeof(T) (a 50257-wide bf16 row is 100 kB and stays in L2 between passes).

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

}  // namespace

#define LOSS_ENTRY_POINTS(S, T)                                                                           \
    extern "C" __global__ void cross_entropy_##S(const T* logits, const int32_t* targets, float weight,        \
                                                 const float* loss_scale, int n, int vocab, T* dlogits,    \
                                                 float* row_loss) {                                        \
        cross_entropy<T>(logits, targets, weight, loss_scale, n, vocab, dlogits, row_loss);                \
    }

ELDER_FOR_DTYPES(LOSS_ENTRY_POINTS)
