// Adam update on f32 parameters (torch.optim.Adam semantics, no weight decay), in place:
//   m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;  p -= step_size * m / (sqrt(v) / bc2_sqrt + eps)
// with step_size = lr / (1 - b1^t) and bc2_sqrt = sqrt(1 - b2^t) computed on the host in f32, exactly as
// the CPU twin does. Shapes: param, grad, m, v: [n] f32.
// Launch: grid-stride, 256 threads per block. Bound: memory, 7 * 4 * n bytes (read 4, write 3).
#include "common.cuh"

extern "C" __global__ void adam_f32(float* param, const float* grad, float* m, float* v, size_t n, float beta1,
                                    float beta2, float eps, float step_size, float bc2_sqrt) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float g = grad[i];
        const float mi = beta1 * m[i] + (1.0f - beta1) * g;
        const float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
        m[i] = mi;
        v[i] = vi;
        param[i] -= step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);
    }
}
