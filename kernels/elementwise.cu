// Elementwise kernels: embedding gather (+ its gradient), bias + GELU (gelu_new) forward/backward,
// SiLU-gated product forward/backward, residual add, bias add, rotary embedding (HF rotate_half),
// the KV-cache append of a padded batch, and the f32 -> T conversion of gradients the attention
// backward accumulates in f32 before they enter T-typed GEMMs.
//
// Shapes: rows of width d, row-major. ids [n] u32; table [vocab, d]; x, out [n, d];
//         rope rows [n, n_heads * head_dim] with positions [n];
//         kv_append src [B, T, w] -> cache [B, cap, w] at rows start[b] + i, i < valid[b] (i32 [B]).
// Launch: 1-D grid-stride loops, 256 threads per block, any grid (the launcher picks ~4 waves).
// Bound: memory. Each op reads and writes every element once (e.g. bias_gelu: 2 x n*d*sizeof(T)
//        plus the bias, which stays in L1/L2); FLOPs are negligible. The embedding gradient is
//        bound by f32 atomics when ids repeat.
#include "common.cuh"

using namespace elder;

namespace {

constexpr float SQRT_2_OVER_PI = 0.7978845608f;
constexpr float GELU_C = 0.044715f;

__device__ __forceinline__ float gelu_new(float x) {
    const float u = SQRT_2_OVER_PI * (x + GELU_C * x * x * x);
    return 0.5f * x * (1.0f + tanhf(u));
}

__device__ __forceinline__ float gelu_new_grad(float x) {
    const float u = SQRT_2_OVER_PI * (x + GELU_C * x * x * x);
    const float t = tanhf(u);
    const float du = SQRT_2_OVER_PI * (1.0f + 3.0f * GELU_C * x * x);
    return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * du;
}

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

__device__ __forceinline__ size_t grid_start() { return (size_t)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ size_t grid_stride() { return (size_t)gridDim.x * blockDim.x; }

// out[i, :] = table[ids[i], :]. An id outside the table yields NaN rows so the mistake is visible
// instead of reading out of bounds.
template <typename T>
__device__ void embedding(const uint32_t* ids, const T* table, T* out, int n, int d, int vocab) {
    const size_t total = (size_t)n * d;
    for (size_t idx = grid_start(); idx < total; idx += grid_stride()) {
        const size_t row = idx / d, col = idx % d;
        const uint32_t id = ids[row];
        out[idx] = id < (uint32_t)vocab ? table[(size_t)id * d + col] : from_f32<T>(NAN);
    }
}

// dtable[ids[i], :] += dout[i, :]; dtable is f32 because repeated ids need atomic accumulation.
template <typename T>
__device__ void embedding_grad(const uint32_t* ids, const T* dout, float* dtable, int n, int d, int vocab) {
    const size_t total = (size_t)n * d;
    for (size_t idx = grid_start(); idx < total; idx += grid_stride()) {
        const size_t row = idx / d, col = idx % d;
        const uint32_t id = ids[row];
        if (id < (uint32_t)vocab) atomicAdd(&dtable[(size_t)id * d + col], to_f32(dout[idx]));
    }
}

// pre = x + bias (optional, saved for the backward), out = gelu_new(pre). out may alias x.
template <typename T>
__device__ void bias_gelu(const T* x, const T* bias, T* pre, T* out, int n, int d) {
    const size_t total = (size_t)n * d;
    for (size_t idx = grid_start(); idx < total; idx += grid_stride()) {
        float v = to_f32(x[idx]) + (bias ? to_f32(bias[idx % d]) : 0.0f);
        v = round_to<T>(v);  // the pre-activation as a T buffer would hold it
        if (pre) pre[idx] = from_f32<T>(v);
        out[idx] = from_f32<T>(gelu_new(v));
    }
}

template <typename T>
__device__ void gelu_backward(const T* pre, const T* dout, T* dx, size_t count) {
    for (size_t i = grid_start(); i < count; i += grid_stride())
        dx[i] = from_f32<T>(to_f32(dout[i]) * gelu_new_grad(to_f32(pre[i])));
}

template <typename T>
__device__ void silu_mul(const T* gate, const T* up, T* out, size_t count) {
    for (size_t i = grid_start(); i < count; i += grid_stride()) {
        const float g = to_f32(gate[i]);
        out[i] = from_f32<T>(g * sigmoid(g) * to_f32(up[i]));
    }
}

template <typename T>
__device__ void silu_mul_backward(const T* gate, const T* up, const T* dout, T* dgate, T* dup, size_t count) {
    for (size_t i = grid_start(); i < count; i += grid_stride()) {
        const float g = to_f32(gate[i]), u = to_f32(up[i]), dy = to_f32(dout[i]);
        const float s = sigmoid(g);
        dup[i] = from_f32<T>(dy * g * s);
        dgate[i] = from_f32<T>(dy * u * s * (1.0f + g * (1.0f - s)));
    }
}

template <typename T>
__device__ void residual_add(T* acc, const T* x, size_t count) {
    for (size_t i = grid_start(); i < count; i += grid_stride())
        acc[i] = from_f32<T>(to_f32(acc[i]) + to_f32(x[i]));
}

// x[i, :] += bias: the bias of a linear layer whose product came from cuBLAS.
template <typename T>
__device__ void bias_add(T* x, const T* bias, int n, int d) {
    const size_t total = (size_t)n * d;
    for (size_t idx = grid_start(); idx < total; idx += grid_stride())
        x[idx] = from_f32<T>(to_f32(x[idx]) + to_f32(bias[idx % d]));
}

// Appends this call's keys (or values) to the cache: row i of sequence b goes to cache row
// start[b] + i. Padding rows (i >= valid[b]) are not stored, and a row that would land past the
// capacity is dropped (the host refuses such shapes; this only keeps a bad call in bounds).
template <typename T>
__device__ void kv_append(const T* src, T* cache, const int* start, const int* valid, int batch, int seq, int cap,
                          int width) {
    const size_t total = (size_t)batch * seq * width;
    for (size_t idx = grid_start(); idx < total; idx += grid_stride()) {
        const size_t row = idx / width, col = idx % width;
        const int b = (int)(row / seq), i = (int)(row % seq);
        const int dst = start[b] + i;
        if (i >= valid[b] || dst >= cap) continue;
        cache[((size_t)b * cap + dst) * width + col] = src[idx];
    }
}

// In place on rows [n, n_heads * head_dim]; one thread per (row, head, i < head_dim/2) pair, which
// owns elements i and i + head_dim/2 of that head, so no two threads touch the same element.
// inv_freq is computed as transformers does: 1 / theta^(2i/head_dim) in f32 (see below).
template <typename T>
__device__ void rope(T* x, const uint32_t* positions, int n, int n_heads, int head_dim, float theta, int inverse) {
    const int half = head_dim / 2;
    const size_t total = (size_t)n * n_heads * half;
    for (size_t idx = grid_start(); idx < total; idx += grid_stride()) {
        const int i = (int)(idx % half);
        const size_t row_head = idx / half;
        const int h = (int)(row_head % n_heads);
        const size_t row = row_head / n_heads;
        // theta^e in double, rounded once to f32: the correctly rounded powf the CPU's libm gives.
        // CUDA's powf may be a few ulp off, which at position ~2k moves the angle by ~1e-4 rad.
        const float exponent = (float)(2 * i) / (float)head_dim;
        const float inv_freq = 1.0f / (float)pow((double)theta, (double)exponent);
        const float angle = (float)positions[row] * inv_freq;
        float s, c;
        sincosf(angle, &s, &c);
        if (inverse) s = -s;
        T* base = x + row * (size_t)n_heads * head_dim + (size_t)h * head_dim;
        const float a = to_f32(base[i]), b = to_f32(base[i + half]);
        base[i] = from_f32<T>(a * c - b * s);
        base[i + half] = from_f32<T>(b * c + a * s);
    }
}

// dst = src rounded to T (round to nearest even, as the host's T::from_f32).
template <typename T>
__device__ void cast_f32(const float* src, T* dst, size_t count) {
    for (size_t i = grid_start(); i < count; i += grid_stride()) dst[i] = from_f32<T>(src[i]);
}

}  // namespace

#define ELEMENTWISE_ENTRY_POINTS(S, T)                                                                     \
    extern "C" __global__ void embedding_##S(const uint32_t* ids, const T* table, T* out, int n, int d,    \
                                             int vocab) {                                                  \
        embedding<T>(ids, table, out, n, d, vocab);                                                        \
    }                                                                                                      \
    extern "C" __global__ void embedding_grad_##S(const uint32_t* ids, const T* dout, float* dtable, int n, \
                                                  int d, int vocab) {                                      \
        embedding_grad<T>(ids, dout, dtable, n, d, vocab);                                                 \
    }                                                                                                      \
    extern "C" __global__ void bias_gelu_##S(const T* x, const T* bias, T* pre, T* out, int n, int d) {     \
        bias_gelu<T>(x, bias, pre, out, n, d);                                                             \
    }                                                                                                      \
    extern "C" __global__ void gelu_backward_##S(const T* pre, const T* dout, T* dx, size_t count) {        \
        gelu_backward<T>(pre, dout, dx, count);                                                            \
    }                                                                                                      \
    extern "C" __global__ void silu_mul_##S(const T* gate, const T* up, T* out, size_t count) {             \
        silu_mul<T>(gate, up, out, count);                                                                 \
    }                                                                                                      \
    extern "C" __global__ void silu_mul_backward_##S(const T* gate, const T* up, const T* dout, T* dgate,   \
                                                     T* dup, size_t count) {                               \
        silu_mul_backward<T>(gate, up, dout, dgate, dup, count);                                           \
    }                                                                                                      \
    extern "C" __global__ void residual_add_##S(T* acc, const T* x, size_t count) {                        \
        residual_add<T>(acc, x, count);                                                                    \
    }                                                                                                      \
    extern "C" __global__ void bias_add_##S(T* x, const T* bias, int n, int d) { bias_add<T>(x, bias, n, d); } \
    extern "C" __global__ void kv_append_##S(const T* src, T* cache, const int* start, const int* valid,     \
                                             int batch, int seq, int cap, int width) {                     \
        kv_append<T>(src, cache, start, valid, batch, seq, cap, width);                                    \
    }                                                                                                      \
    extern "C" __global__ void rope_##S(T* x, const uint32_t* positions, int n, int n_heads, int head_dim, \
                                        float theta, int inverse) {                                        \
        rope<T>(x, positions, n, n_heads, head_dim, theta, inverse);                                       \
    }                                                                                                      \
    extern "C" __global__ void cast_f32_##S(const float* src, T* dst, size_t count) {                      \
        cast_f32<T>(src, dst, count);                                                                      \
    }

ELDER_FOR_DTYPES(ELEMENTWISE_ENTRY_POINTS)
