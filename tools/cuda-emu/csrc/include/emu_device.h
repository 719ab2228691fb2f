// The CUDA device language on the host: force-included (g++ -include) before every kernels/*.cu
// when the emulator is built. Each CUDA thread of a block is a fiber; __syncthreads and the warp
// shuffles are barriers between fibers (emu_runtime.cpp), so the kernels run unmodified and in
// their real thread structure — only slower, and with no GPU-specific timing or memory-model
// behaviour.
#pragma once
#define ELDER_CUDA_EMULATOR 1

#include <limits.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "emu_half.h"

namespace emu {
struct Index3 {
    unsigned x, y, z;
};
// The indices of the fiber now running on this OS thread (set by the scheduler at every switch).
struct ThreadIndices {
    Index3 thread_idx, block_idx, block_dim, grid_dim;
};
extern thread_local ThreadIndices current;
// Block-wide barrier (__syncthreads).
void sync_threads();
// All lanes of the calling warp publish `bits`; returns what lane `src_lane` (0..31) published.
uint64_t warp_shuffle(uint64_t bits, int src_lane);
// The calling thread's lane (0..31) in its warp.
int lane_id();
// The launch's dynamic shared memory (zero-length launches get a valid, empty buffer).
void* dynamic_shared();
}  // namespace emu

#define threadIdx (::emu::current.thread_idx)
#define blockIdx (::emu::current.block_idx)
#define blockDim (::emu::current.block_dim)
#define gridDim (::emu::current.grid_dim)
#define warpSize 32

#ifdef ELDER_EMU_SCAN
#define __global__ ELDER_EMU_KERNEL  // build.rs finds the entry points by this marker
#else
#define __global__
#endif
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __restrict__ __restrict
// One block runs at a time on a given OS thread, so a thread-local static is exactly one block's
// shared array. (Unlike real shared memory it starts zeroed, not with garbage.)
#define __shared__ static thread_local

inline void __syncthreads() { emu::sync_threads(); }
inline void __syncwarp(unsigned = 0xffffffffu) { (void)emu::warp_shuffle(0, 0); }

template <typename T>
inline uint64_t emu_to_bits(T v) {
    static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
    uint64_t bits = 0;
    memcpy(&bits, &v, sizeof(T));
    return bits;
}
template <typename T>
inline T emu_from_bits(uint64_t bits) {
    T v;
    memcpy(&v, &bits, sizeof(T));
    return v;
}
template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int lane_mask, int width = 32) {
    const int lane = emu::lane_id();
    int src = lane ^ lane_mask;
    if (src / width != lane / width) src = lane;  // outside the segment: own value
    return emu_from_bits<T>(emu::warp_shuffle(emu_to_bits(v), src));
}
template <typename T>
inline T __shfl_sync(unsigned, T v, int src_lane, int width = 32) {
    const int lane = emu::lane_id();
    const int src = (lane / width) * width + (src_lane % width);
    return emu_from_bits<T>(emu::warp_shuffle(emu_to_bits(v), src));
}
template <typename T>
inline T __shfl_down_sync(unsigned, T v, unsigned delta, int width = 32) {
    const int lane = emu::lane_id();
    int src = lane + (int)delta;
    if (src / width != lane / width) src = lane;
    return emu_from_bits<T>(emu::warp_shuffle(emu_to_bits(v), src));
}

// ---- math intrinsics
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline unsigned min(int a, unsigned b) { return min((unsigned)a, b); }
inline unsigned min(unsigned a, int b) { return min(a, (unsigned)b); }
inline unsigned max(int a, unsigned b) { return max((unsigned)a, b); }
inline unsigned max(unsigned a, int b) { return max(a, (unsigned)b); }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long min(unsigned long a, unsigned long b) { return a < b ? a : b; }
inline unsigned long max(unsigned long a, unsigned long b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }

// ---- atomics (blocks of one launch run one after another, but several host threads may launch
// at once, so these are real atomics)
inline float atomicAdd(float* addr, float v) {
    uint32_t* p = reinterpret_cast<uint32_t*>(addr);
    uint32_t old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (!__atomic_compare_exchange_n(p, &old, emu_f32_bits(emu_bits_f32(old) + v), true, __ATOMIC_RELAXED,
                                        __ATOMIC_RELAXED)) {
    }
    return emu_bits_f32(old);
}
inline double atomicAdd(double* addr, double v) {
    uint64_t* p = reinterpret_cast<uint64_t*>(addr);
    uint64_t old = __atomic_load_n(p, __ATOMIC_RELAXED);
    for (;;) {
        double cur;
        memcpy(&cur, &old, 8);
        const double next = cur + v;
        uint64_t bits;
        memcpy(&bits, &next, 8);
        if (__atomic_compare_exchange_n(p, &old, bits, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) return cur;
    }
}
inline int atomicAdd(int* a, int v) { return __atomic_fetch_add(a, v, __ATOMIC_RELAXED); }
inline unsigned atomicAdd(unsigned* a, unsigned v) { return __atomic_fetch_add(a, v, __ATOMIC_RELAXED); }
inline unsigned long long atomicAdd(unsigned long long* a, unsigned long long v) {
    return __atomic_fetch_add(a, v, __ATOMIC_RELAXED);
}
inline unsigned atomicOr(unsigned* a, unsigned v) { return __atomic_fetch_or(a, v, __ATOMIC_RELAXED); }
inline unsigned long long atomicOr(unsigned long long* a, unsigned long long v) {
    return __atomic_fetch_or(a, v, __ATOMIC_RELAXED);
}
inline int atomicMax(int* a, int v) {
    int old = __atomic_load_n(a, __ATOMIC_RELAXED);
    while (old < v && !__atomic_compare_exchange_n(a, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
    return old;
}
inline unsigned long long atomicMax(unsigned long long* a, unsigned long long v) {
    unsigned long long old = __atomic_load_n(a, __ATOMIC_RELAXED);
    while (old < v && !__atomic_compare_exchange_n(a, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
    return old;
}
inline int atomicMin(int* a, int v) {
    int old = __atomic_load_n(a, __ATOMIC_RELAXED);
    while (old > v && !__atomic_compare_exchange_n(a, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
    return old;
}
inline uint32_t __float_as_uint(float x) {
    uint32_t b;
    memcpy(&b, &x, 4);
    return b;
}
template <typename T>
inline T __ldg(const T* p) {
    return *p;
}
