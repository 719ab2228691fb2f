// Fused residual-add + LayerNorm / RMSNorm forward (saving mean / rstd per row) and their input
// gradients (norm weights are frozen).
//
// Shapes: x, residual, sum_out, out, dout, dx: [n, d] in T; w, b: [d] in T; mean, rstd: [n] f32.
//   sum_out = x + residual (the new residual stream, optional), out = norm(sum_out) * w (+ b).
//   Without `residual` the kernel is a plain norm of x.
// Launch: one warp per row, ROWS_PER_BLOCK = 4 warps per block, grid = ceil(n / 4).
//   Statistics are two-pass (mean, then centred variance) exactly like the CPU twin; the row is
//   re-read from L1/L2 on each pass rather than held in registers so any d works. Rows whose width
//   is a multiple of 8 (bf16/f16) or 4 (f32) with 16-byte aligned buffers take the vectorised path
//   (128-bit loads/stores); others the scalar one. Backward kernels are scalar.
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


// 16-byte packs for the vectorised path: 8 bf16/f16 or 4 f32 per load/store instruction.
template <typename T> struct alignas(16) Pack {
    static constexpr int N = 16 / sizeof(T);
    T v[N];
};

__device__ __forceinline__ bool aligned16(const void* p) { return p == nullptr || ((uintptr_t)p & 15) == 0; }

// The vectorised path needs whole packs per row and 16-byte aligned bases (then every row is aligned,
// since d * sizeof(T) is a multiple of 16). The test is uniform over the block.
template <typename T>
__device__ __forceinline__ bool can_vectorise(int d, const void* a, const void* b, const void* c, const void* e,
                                              const void* f, const void* g) {
    return d % Pack<T>::N == 0 && aligned16(a) && aligned16(b) && aligned16(c) && aligned16(e) && aligned16(f) &&
           aligned16(g);
}

// Loads pack `p` of x (+ residual), rounded to T like the scalar path.
template <typename T>
__device__ __forceinline__ void load_sum_pack(const T* x, const T* residual, size_t base, int p,
                                              float (&v)[Pack<T>::N]) {
    const Pack<T> xp = reinterpret_cast<const Pack<T>*>(x + base)[p];
#pragma unroll
    for (int e = 0; e < Pack<T>::N; ++e) v[e] = to_f32(xp.v[e]);
    if (residual) {
        const Pack<T> rp = reinterpret_cast<const Pack<T>*>(residual + base)[p];
#pragma unroll
        for (int e = 0; e < Pack<T>::N; ++e) v[e] = round_to<T>(v[e] + to_f32(rp.v[e]));
    }
}

template <typename T>
__device__ __forceinline__ void store_pack(T* dst, size_t base, int p, const float (&v)[Pack<T>::N]) {
    Pack<T> out;
#pragma unroll
    for (int e = 0; e < Pack<T>::N; ++e) out.v[e] = from_f32<T>(v[e]);
    reinterpret_cast<Pack<T>*>(dst + base)[p] = out;
}

// Same arithmetic as the scalar residual_layernorm below, with 16-byte loads and stores.
template <typename T>
__device__ void residual_layernorm_vec(const T* x, const T* residual, T* sum_out, const T* w, const T* b, T* out,
                                       float* mean, float* rstd, int row, int d, float eps) {
    constexpr int N = Pack<T>::N;
    const int lane = threadIdx.x & 31, packs = d / N;
    const size_t base = (size_t)row * d;
    float v[N];
    float s = 0.0f;
    for (int p = lane; p < packs; p += 32) {
        load_sum_pack(x, residual, base, p, v);
        if (sum_out) store_pack(sum_out, base, p, v);
#pragma unroll
        for (int e = 0; e < N; ++e) s += v[e];
    }
    const float m = warp_sum(s) / d;
    float var = 0.0f;
    for (int p = lane; p < packs; p += 32) {
        load_sum_pack(x, residual, base, p, v);
#pragma unroll
        for (int e = 0; e < N; ++e) var += (v[e] - m) * (v[e] - m);
    }
    const float r = rsqrtf(warp_sum(var) / d + eps);
    for (int p = lane; p < packs; p += 32) {
        load_sum_pack(x, residual, base, p, v);
        const Pack<T> wp = reinterpret_cast<const Pack<T>*>(w)[p];
        Pack<T> bp;
        if (b) bp = reinterpret_cast<const Pack<T>*>(b)[p];
#pragma unroll
        for (int e = 0; e < N; ++e) v[e] = (v[e] - m) * r * to_f32(wp.v[e]) + (b ? to_f32(bp.v[e]) : 0.0f);
        store_pack(out, base, p, v);
    }
    if (lane == 0) {
        if (mean) mean[row] = m;
        if (rstd) rstd[row] = r;
    }
}

template <typename T>
__device__ void residual_rmsnorm_vec(const T* x, const T* residual, T* sum_out, const T* w, T* out, float* rstd,
                                     int row, int d, float eps) {
    constexpr int N = Pack<T>::N;
    const int lane = threadIdx.x & 31, packs = d / N;
    const size_t base = (size_t)row * d;
    float v[N];
    float ss = 0.0f;
    for (int p = lane; p < packs; p += 32) {
        load_sum_pack(x, residual, base, p, v);
        if (sum_out) store_pack(sum_out, base, p, v);
#pragma unroll
        for (int e = 0; e < N; ++e) ss += v[e] * v[e];
    }
    const float r = rsqrtf(warp_sum(ss) / d + eps);
    for (int p = lane; p < packs; p += 32) {
        load_sum_pack(x, residual, base, p, v);
        const Pack<T> wp = reinterpret_cast<const Pack<T>*>(w)[p];
#pragma unroll
        for (int e = 0; e < N; ++e) v[e] = v[e] * r * to_f32(wp.v[e]);
        store_pack(out, base, p, v);
    }
    if (lane == 0 && rstd) rstd[row] = r;
}

template <typename T>
__device__ void residual_layernorm(const T* x, const T* residual, T* sum_out, const T* w, const T* b, T* out,
                                   float* mean, float* rstd, int n, int d, float eps) {
    const int row = warp_row(), lane = threadIdx.x & 31;
    if (row >= n) return;  // whole warp leaves together: shuffles below stay full-warp
    if (can_vectorise<T>(d, x, residual, sum_out, w, b, out)) {
        residual_layernorm_vec(x, residual, sum_out, w, b, out, mean, rstd, row, d, eps);
        return;
    }
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
    if (can_vectorise<T>(d, x, residual, sum_out, w, out, nullptr)) {
        residual_rmsnorm_vec(x, residual, sum_out, w, out, rstd, row, d, eps);
        return;
    }
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
