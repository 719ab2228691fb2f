// Fused residual-add + LayerNorm / RMSNorm forward (saving mean / rstd per row) and their input
// gradients (norm weights are frozen).
//
// Shapes: x, residual, sum_out, out, dout, dx: [n, d] in T; w, b: [d] in T; mean, rstd: [n] f32.
//   sum_out = x + residual (the new residual stream, optional), out = norm(sum_out) * w (+ b).
//   Without `residual` the kernel is a plain norm of x.
// Launch: one warp per row, ROWS_PER_BLOCK = 4 warps per block, grid = ceil(n / 4).
//   Statistics are two-pass (mean, then centred variance) exactly like the CPU twin; the row is
//   re-read from L1/L2 on each pass rather than held in registers so any d works.
// Bound: memory. Forward reads x, residual, w, b once from DRAM and writes sum_out and out:
//   about 4 * n * d * sizeof(T) bytes (8192 x 1600 bf16: 105 MB). Backward reads x, dout, writes dx.
#include "common.cuh"

using namespace elder;

namespace {

constexpr int ROWS_PER_BLOCK = 4;

__device__ __forceinline__ int warp_row() { return blockIdx.x * ROWS_PER_BLOCK + (threadIdx.x >> 5); }

template <typename T>
__device__ __forceinline__ float load_sum(const T* x, const T* residual, size_t i) {
    const float v = to_f32(x[i]) + (residual ? to_f32(residual[i]) : 0.0f);
    // Normalise the value the residual stream actually stores.
    return round_to<T>(v);
}

template <typename T>
__device__ void residual_layernorm(const T* x, const T* residual, T* sum_out, const T* w, const T* b, T* out,
                                   float* mean, float* rstd, int n, int d, float eps) {
    const int row = warp_row(), lane = threadIdx.x & 31;
    if (row >= n) return;  // whole warp leaves together: shuffles below stay full-warp
    const size_t base = (size_t)row * d;
    float s = 0.0f;
    for (int i = lane; i < d; i += 32) {
        const float v = load_sum(x, residual, base + i);
        if (sum_out) sum_out[base + i] = from_f32<T>(v);
        s += v;
    }
    const float m = warp_sum(s) / d;
    float var = 0.0f;
    for (int i = lane; i < d; i += 32) {
        const float c = load_sum(x, residual, base + i) - m;
        var += c * c;
    }
    const float r = rsqrtf(warp_sum(var) / d + eps);
    for (int i = lane; i < d; i += 32) {
        const float v = (load_sum(x, residual, base + i) - m) * r * to_f32(w[i]) + (b ? to_f32(b[i]) : 0.0f);
        out[base + i] = from_f32<T>(v);
    }
    if (lane == 0) {
        if (mean) mean[row] = m;
        if (rstd) rstd[row] = r;
    }
}

// dx (+)= rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dout * w.
template <typename T>
__device__ void layernorm_backward(const T* x, const T* w, const float* mean, const float* rstd, const T* dout,
                                   T* dx, int accumulate, int n, int d) {
    const int row = warp_row(), lane = threadIdx.x & 31;
    if (row >= n) return;
    const size_t base = (size_t)row * d;
    const float m = mean[row], r = rstd[row];
    float sum_g = 0.0f, sum_gx = 0.0f;
    for (int i = lane; i < d; i += 32) {
        const float g = to_f32(dout[base + i]) * to_f32(w[i]);
        sum_g += g;
        sum_gx += g * (to_f32(x[base + i]) - m) * r;
    }
    const float mg = warp_sum(sum_g) / d, mgx = warp_sum(sum_gx) / d;
    for (int i = lane; i < d; i += 32) {
        const float xhat = (to_f32(x[base + i]) - m) * r;
        float v = r * (to_f32(dout[base + i]) * to_f32(w[i]) - mg - xhat * mgx);
        if (accumulate) v += to_f32(dx[base + i]);
        dx[base + i] = from_f32<T>(v);
    }
}

template <typename T>
__device__ void residual_rmsnorm(const T* x, const T* residual, T* sum_out, const T* w, T* out, float* rstd,
                                 int n, int d, float eps) {
    const int row = warp_row(), lane = threadIdx.x & 31;
    if (row >= n) return;
    const size_t base = (size_t)row * d;
    float ss = 0.0f;
    for (int i = lane; i < d; i += 32) {
        const float v = load_sum(x, residual, base + i);
        if (sum_out) sum_out[base + i] = from_f32<T>(v);
        ss += v * v;
    }
    const float r = rsqrtf(warp_sum(ss) / d + eps);
    for (int i = lane; i < d; i += 32)
        out[base + i] = from_f32<T>(load_sum(x, residual, base + i) * r * to_f32(w[i]));
    if (lane == 0 && rstd) rstd[row] = r;
}

// dx (+)= rstd * (g - x * rstd^2 * mean(g * x)), g = dout * w.
template <typename T>
__device__ void rmsnorm_backward(const T* x, const T* w, const float* rstd, const T* dout, T* dx, int accumulate,
                                 int n, int d) {
    const int row = warp_row(), lane = threadIdx.x & 31;
    if (row >= n) return;
    const size_t base = (size_t)row * d;
    const float r = rstd[row];
    float dot = 0.0f;
    for (int i = lane; i < d; i += 32) dot += to_f32(dout[base + i]) * to_f32(w[i]) * to_f32(x[base + i]);
    dot = warp_sum(dot) / d;
    for (int i = lane; i < d; i += 32) {
        const float xv = to_f32(x[base + i]);
        float v = r * (to_f32(dout[base + i]) * to_f32(w[i]) - xv * r * r * dot);
        if (accumulate) v += to_f32(dx[base + i]);
        dx[base + i] = from_f32<T>(v);
    }
}

}  // namespace

#define NORM_ENTRY_POINTS(S, T)                                                                              \
    extern "C" __global__ void residual_layernorm_##S(const T* x, const T* residual, T* sum_out, const T* w, \
                                                      const T* b, T* out, float* mean, float* rstd, int n,   \
                                                      int d, float eps) {                                    \
        residual_layernorm<T>(x, residual, sum_out, w, b, out, mean, rstd, n, d, eps);                       \
    }                                                                                                        \
    extern "C" __global__ void layernorm_backward_##S(const T* x, const T* w, const float* mean,             \
                                                      const float* rstd, const T* dout, T* dx,               \
                                                      int accumulate, int n, int d) {                        \
        layernorm_backward<T>(x, w, mean, rstd, dout, dx, accumulate, n, d);                                 \
    }                                                                                                        \
    extern "C" __global__ void residual_rmsnorm_##S(const T* x, const T* residual, T* sum_out, const T* w,   \
                                                    T* out, float* rstd, int n, int d, float eps) {          \
        residual_rmsnorm<T>(x, residual, sum_out, w, out, rstd, n, d, eps);                                  \
    }                                                                                                        \
    extern "C" __global__ void rmsnorm_backward_##S(const T* x, const T* w, const float* rstd, const T* dout, \
                                                    T* dx, int accumulate, int n, int d) {                   \
        rmsnorm_backward<T>(x, w, rstd, dout, dx, accumulate, n, d);                                         \
    }

ELDER_FOR_DTYPES(NORM_ENTRY_POINTS)
