// The optimiser step of the edit loop, with dynamic loss scaling (what keeps f16 gradients from
// underflowing): the backward runs on the loss times `scale`, and these kernels undo it.
//
// adam_f32: Adam update on f32 parameters (torch.optim.Adam semantics, no weight decay), in place:
//   g = grad / scale;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;
//   p -= step_size * m / (sqrt(v) / bc2_sqrt + eps)
//   with step_size = lr / (1 - b1^t) and bc2_sqrt = sqrt(1 - b2^t) computed on the host in f32, exactly
//   as the CPU twin does. They come as arguments, or, when `schedule` is not null, from device memory
//   (schedule[0] = step_size, schedule[1] = bc2_sqrt): the edit loop writes them there before each
//   iteration, so one captured CUDA graph replays every iteration. Shapes: param, grad, m, v: [n] f32.
//   `scale` [1] f32 and `state` [3] i32 (see below) may be null (scale 1, never skip); when
//   state[FOUND] is set the step leaves everything as it was (torch's GradScaler skips the step the
//   same way).
//   Launch: grid-stride, 256 threads per block. Bound: memory, 7 * 4 * n bytes (read 4, write 3).
//
// grads_nonfinite_f32: sets state[FOUND] = 1 if any of grad [n] is inf or NaN (never clears it).
//   Launch: grid-stride, 256 threads per block. Bound: memory, 4 * n bytes.
//
// loss_scale_update: after the step, one thread: an overflow multiplies the scale by `backoff` and
//   counts a skipped step; `growth_interval` clean steps in a row multiply it by `growth` (capped at
//   `max_scale`); then FOUND is cleared for the next iteration. CPU twin: LossScalePolicy::next.
//   Launch: <<<1, 1>>>.
#include "common.cuh"

namespace {
constexpr int FOUND = 0;    // this iteration's gradients hold inf / NaN
constexpr int GOOD = 1;     // clean steps since the scale last changed
constexpr int SKIPPED = 2;  // steps skipped so far (the host reads the difference per batch)
}  // namespace

extern "C" __global__ void adam_f32(float* param, const float* grad, float* m, float* v, size_t n, float beta1,
                                    float beta2, float eps, float step_size, float bc2_sqrt, const float* schedule,
                                    const float* scale, const int* state) {
    if (state != nullptr && state[FOUND] != 0) return;
    const float s = scale != nullptr ? *scale : 1.0f;
    if (schedule != nullptr) {
        step_size = schedule[0];
        bc2_sqrt = schedule[1];
    }
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float g = grad[i] / s;
        const float mi = beta1 * m[i] + (1.0f - beta1) * g;
        const float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
        m[i] = mi;
        v[i] = vi;
        param[i] -= step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);
    }
}

extern "C" __global__ void grads_nonfinite_f32(const float* grad, size_t n, int* state) {
    bool bad = false;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        bad |= !isfinite(grad[i]);
    // Every writer stores the same value, so the race is benign.
    if (bad) state[FOUND] = 1;
}

extern "C" __global__ void loss_scale_update(float* scale, int* state, int growth_interval, float growth,
                                             float backoff, float max_scale) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    if (state[FOUND] != 0) {
        *scale = *scale * backoff;
        state[GOOD] = 0;
        state[SKIPPED] += 1;
    } else if (++state[GOOD] >= growth_interval) {
        *scale = fminf(*scale * growth, max_scale);
        state[GOOD] = 0;
    }
    state[FOUND] = 0;
}
