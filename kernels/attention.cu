// Causal softmax attention over a padded batch with a key/value cache and grouped-query heads
// (the semantics of the CPU twin's AttnShape).
//
// Shapes: q, out, dout [B, Tq, H * D] T; k, v [B, Cap, Hkv * D] T; q_start, q_valid [B] i32;
//   lse [B, H, Tq] f32 (log-sum-exp of the scaled scores, saved for the backward);
//   dq [B, Tq, H * D], dk, dv [B, Cap, Hkv * D] f32, accumulated (+=) like the CPU twin.
//   Query i of sequence b sits at absolute position q_start[b] + i and sees keys 0 ..= that position;
//   rows i >= q_valid[b] are padding and get zero output (lse 0, no gradient).
//   Head h reads key/value head h / (H / Hkv).
// Three kernels:
// - attention_fwd (the row kernel, used for decode and very short queries): one warp per (b, i, h)
//   query row, 4 warps per 128-thread block. Each lane holds D / 32 elements of q and of the output
//   accumulator (D <= 256); keys stream in chunks of 32 with an online softmax (running max /
//   running sum). Decode (Tq = 1) is this kernel: one warp per (b, h) streaming its KV cache.
// - attention_tiled_fwd (prefill, FlashAttention style): one 128-thread block per (b, h, tile of BR
//   query rows). The block walks the visible keys in tiles of BC: K and V tiles are staged in
//   shared memory as f32 (rows padded to D + 1 floats so lanes reading different keys at the same
//   d hit different banks) and reused by all BR rows; each warp owns BR / 4 rows, lane j scores key
//   j of the tile, and the online softmax rescales the register accumulators. No score matrix is
//   ever materialised. BR x BC = 16 x 32 for D <= 128, 8 x 16 for D <= 256.
// - attention_tiled_bwd (FlashAttention-2 style): one block per (b, h, tile of BC keys). K and V
//   are staged once; the block walks the query tiles that see its keys, recomputes
//   p = exp(s * scale - lse) from the saved log-sum-exp, computes delta = <dout, out> per row,
//   keeps dK and dV of its keys in registers for the whole walk, and adds dQ with f32 atomics.
//   dK / dV are added to global memory once per block, with atomics because the query heads of a
//   GQA group share key rows. BR x BC = 8 x 32 for D <= 128, 4 x 16 for D <= 256.
// Bound: prefill and the backward are compute-light at ELDER sizes (tens of tokens); the tiles cut
//   K/V traffic by BR. Decode is memory-bound on the KV cache, 2 * B * Hkv * L * D * sizeof(T)
//   bytes per step (K/V rows are re-read per GQA head through L2).
#include "common.cuh"

using namespace elder;

namespace {

constexpr int MAX_SLOTS = 8;  // D <= 256

struct AttnDims {
    int batch, q_len, kv_cap, n_heads, n_kv_heads, head_dim;
    float scale;
};

// Decodes the warp's (b, i, h) and the number of keys it sees; false for padding/out-of-range warps.
__device__ __forceinline__ bool attn_row(const AttnDims& s, const int* q_start, const int* q_valid, int& b, int& i,
                                         int& h, int& n_keys) {
    const long long w = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    h = (int)(w % s.n_heads);
    const long long bi = w / s.n_heads;
    i = (int)(bi % s.q_len);
    b = (int)(bi / s.q_len);
    if (b >= s.batch) return false;
    n_keys = min(q_start[b] + i + 1, s.kv_cap);
    return i < q_valid[b];
}

template <typename T>
__device__ void attention_forward(const T* q, const T* k, const T* v, const int* q_start, const int* q_valid,
                                  AttnDims s, T* out, float* lse) {
    const int lane = threadIdx.x & 31;
    int b, i, h, n_keys;
    const bool valid = attn_row(s, q_start, q_valid, b, i, h, n_keys);
    if (b >= s.batch) return;
    const int D = s.head_dim, qw = s.n_heads * D, kvw = s.n_kv_heads * D;
    const int kvh = h / (s.n_heads / s.n_kv_heads);
    T* orow = out + ((size_t)b * s.q_len + i) * qw + (size_t)h * D;
    float* lse_slot = lse ? lse + ((size_t)b * s.n_heads + h) * s.q_len + i : nullptr;
    if (!valid) {
        for (int d = lane; d < D; d += 32) orow[d] = from_f32<T>(0.0f);
        if (lse_slot && lane == 0) *lse_slot = 0.0f;
        return;
    }
    const T* qrow = q + ((size_t)b * s.q_len + i) * qw + (size_t)h * D;
    const T* kbase = k + (size_t)b * s.kv_cap * kvw + (size_t)kvh * D;
    const T* vbase = v + (size_t)b * s.kv_cap * kvw + (size_t)kvh * D;

    float qv[MAX_SLOTS], acc[MAX_SLOTS];
#pragma unroll
    for (int c = 0; c < MAX_SLOTS; ++c) {
        const int d = lane + 32 * c;
        qv[c] = d < D ? to_f32(qrow[d]) : 0.0f;
        acc[c] = 0.0f;
    }
    float run_max = -INFINITY, run_sum = 0.0f;
    for (int j0 = 0; j0 < n_keys; j0 += 32) {
        const int chunk = min(32, n_keys - j0);
        // Scores of the chunk: lane jj ends up holding the score of key j0 + jj.
        float score = -INFINITY;
        for (int jj = 0; jj < chunk; ++jj) {
            const T* krow = kbase + (size_t)(j0 + jj) * kvw;
            float part = 0.0f;
#pragma unroll
            for (int c = 0; c < MAX_SLOTS; ++c) {
                const int d = lane + 32 * c;
                if (d < D) part += qv[c] * to_f32(krow[d]);
            }
            part = warp_sum(part) * s.scale;
            if (lane == jj) score = part;
        }
        const float new_max = fmaxf(run_max, warp_max(score));  // finite: chunk >= 1
        const float correction = expf(run_max - new_max);       // 0 on the first chunk
        const float p = lane < chunk ? expf(score - new_max) : 0.0f;
        run_sum = run_sum * correction + warp_sum(p);
#pragma unroll
        for (int c = 0; c < MAX_SLOTS; ++c) acc[c] *= correction;
        for (int jj = 0; jj < chunk; ++jj) {
            const float pj = __shfl_sync(0xffffffffu, p, jj);
            const T* vrow = vbase + (size_t)(j0 + jj) * kvw;
#pragma unroll
            for (int c = 0; c < MAX_SLOTS; ++c) {
                const int d = lane + 32 * c;
                if (d < D) acc[c] += pj * to_f32(vrow[d]);
            }
        }
        run_max = new_max;
    }
    const float inv = 1.0f / run_sum;
#pragma unroll
    for (int c = 0; c < MAX_SLOTS; ++c) {
        const int d = lane + 32 * c;
        if (d < D) orow[d] = from_f32<T>(acc[c] * inv);
    }
    if (lse_slot && lane == 0) *lse_slot = run_max + logf(run_sum);
}

// ---------------------------------------------------------------- tiled kernels

// Tile sizes per lane-slot count (SLOTS = D / 32 rounded up to 4 or 8). The host mirrors them in
// src/backend/cuda/attention.rs (TileShape) to size the grid.
template <int SLOTS> struct Tiles {
    static constexpr int D_MAX = 32 * SLOTS;
    static constexpr int BC = 128 / SLOTS;     // keys per tile: 32 or 16
    static constexpr int FWD_BR = 64 / SLOTS;  // query rows per forward block: 16 or 8
    static constexpr int BWD_BR = 32 / SLOTS;  // query rows per backward step: 8 or 4
    // Static shared memory (floats); both stay under the 48 KiB static limit.
    static constexpr int FWD_FLOATS = FWD_BR * D_MAX + 2 * BC * (D_MAX + 1) + FWD_BR * BC;
    static constexpr int BWD_FLOATS = 2 * BWD_BR * D_MAX + 2 * BC * (D_MAX + 1) + 2 * BWD_BR * BC + 2 * BWD_BR;
};
static_assert(Tiles<4>::FWD_FLOATS * 4 <= 48 * 1024 && Tiles<8>::FWD_FLOATS * 4 <= 48 * 1024, "fwd smem");
static_assert(Tiles<4>::BWD_FLOATS * 4 <= 48 * 1024 && Tiles<8>::BWD_FLOATS * 4 <= 48 * 1024, "bwd smem");

constexpr int TILE_THREADS = 128;

// Stages rows [j0, j0 + BC) of one head's K and V as f32 with padded stride D + 1 (zeros past `limit`).
template <typename T, int BC>
__device__ __forceinline__ void stage_kv(const T* kbase, const T* vbase, int kvw, int j0, int limit, int D,
                                         float* ks, float* vs) {
    const int ks_stride = D + 1;
    for (int idx = threadIdx.x; idx < BC * D; idx += blockDim.x) {
        const int jj = idx / D, d = idx - jj * D, j = j0 + jj;
        const bool in = j < limit;
        ks[jj * ks_stride + d] = in ? to_f32(kbase[(size_t)j * kvw + d]) : 0.0f;
        vs[jj * ks_stride + d] = in ? to_f32(vbase[(size_t)j * kvw + d]) : 0.0f;
    }
}

template <typename T, int SLOTS>
__device__ void attention_tiled_forward(const T* q, const T* k, const T* v, const int* q_start, const int* q_valid,
                                        AttnDims s, T* out, float* lse) {
    using Tl = Tiles<SLOTS>;
    constexpr int BR = Tl::FWD_BR, BC = Tl::BC, RW = BR / 4;
    __shared__ float smem[Tl::FWD_FLOATS];
    const int D = s.head_dim, KS = D + 1, qw = s.n_heads * D, kvw = s.n_kv_heads * D;
    float* qs = smem;           // [BR][D], pre-scaled
    float* ks = qs + BR * D;    // [BC][KS]
    float* vs = ks + BC * KS;   // [BC][KS]
    float* ps = vs + BC * KS;   // [BR][BC], this tile's probabilities

    const int q_tiles = (s.q_len + BR - 1) / BR;
    const int tile = blockIdx.x % q_tiles, bh = blockIdx.x / q_tiles;
    const int h = bh % s.n_heads, b = bh / s.n_heads;
    if (b >= s.batch) return;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int kvh = h / (s.n_heads / s.n_kv_heads);
    const int i0 = tile * BR, start = q_start[b];
    const int n_rows = max(0, min(q_valid[b] - i0, BR));  // valid query rows of this tile
    // Keys visible to the tile's last valid row (rows see keys 0 ..= start + i).
    const int block_keys = n_rows > 0 ? min(start + i0 + n_rows, s.kv_cap) : 0;
    const T* kbase = k + (size_t)b * s.kv_cap * kvw + (size_t)kvh * D;
    const T* vbase = v + (size_t)b * s.kv_cap * kvw + (size_t)kvh * D;

    for (int idx = threadIdx.x; idx < BR * D; idx += blockDim.x) {
        const int r = idx / D, d = idx - r * D;
        qs[idx] = r < n_rows ? to_f32(q[((size_t)b * s.q_len + i0 + r) * qw + (size_t)h * D + d]) * s.scale : 0.0f;
    }

    float acc[RW][SLOTS], run_max[RW], run_sum[RW];
    int row_keys[RW];
#pragma unroll
    for (int m = 0; m < RW; ++m) {
        const int r = warp * RW + m;
        row_keys[m] = r < n_rows ? min(start + i0 + r + 1, s.kv_cap) : 0;
        run_max[m] = -INFINITY;
        run_sum[m] = 0.0f;
#pragma unroll
        for (int c = 0; c < SLOTS; ++c) acc[m][c] = 0.0f;
    }

    for (int j0 = 0; j0 < block_keys; j0 += BC) {
        __syncthreads();  // the previous tile is consumed (and, the first time, the Q tile is staged)
        stage_kv<T, BC>(kbase, vbase, kvw, j0, block_keys, D, ks, vs);
        __syncthreads();
#pragma unroll
        for (int m = 0; m < RW; ++m) {
            const int r = warp * RW + m;
            const int visible = row_keys[m] - j0;  // keys of this tile row r sees (warp-uniform)
            if (visible <= 0) continue;
            float score = -INFINITY;
            if (lane < BC && lane < visible) {
                const float* qr = qs + r * D;
                const float* kr = ks + lane * KS;
                float dot = 0.0f;
                for (int d = 0; d < D; ++d) dot += qr[d] * kr[d];
                score = dot;
            }
            const float new_max = fmaxf(run_max[m], warp_max(score));  // finite: key j0 is visible
            const float correction = expf(run_max[m] - new_max);        // 0 on the row's first tile
            const float p = (lane < BC && lane < visible) ? expf(score - new_max) : 0.0f;
            run_sum[m] = run_sum[m] * correction + warp_sum(p);
            run_max[m] = new_max;
            if (lane < BC) ps[r * BC + lane] = p;
            __syncwarp();
            const int n = min(visible, BC);
#pragma unroll
            for (int c = 0; c < SLOTS; ++c) acc[m][c] *= correction;
            for (int jj = 0; jj < n; ++jj) {
                const float pj = ps[r * BC + jj];
                const float* vr = vs + jj * KS;
#pragma unroll
                for (int c = 0; c < SLOTS; ++c) {
                    const int d = lane + 32 * c;
                    if (d < D) acc[m][c] += pj * vr[d];
                }
            }
            __syncwarp();  // ps row r is rewritten only after every lane has read it
        }
    }

#pragma unroll
    for (int m = 0; m < RW; ++m) {
        const int r = warp * RW + m, i = i0 + r;
        if (i >= s.q_len) continue;
        T* orow = out + ((size_t)b * s.q_len + i) * qw + (size_t)h * D;
        const bool valid = r < n_rows;
        const float inv = valid ? 1.0f / run_sum[m] : 0.0f;
#pragma unroll
        for (int c = 0; c < SLOTS; ++c) {
            const int d = lane + 32 * c;
            if (d < D) orow[d] = from_f32<T>(valid ? acc[m][c] * inv : 0.0f);
        }
        if (lse && lane == 0) lse[((size_t)b * s.n_heads + h) * s.q_len + i] = valid ? run_max[m] + logf(run_sum[m]) : 0.0f;
    }
}

template <typename T, int SLOTS>
__device__ void attention_tiled_backward(const T* q, const T* k, const T* v, const T* out, const T* dout,
                                         const float* lse, const int* q_start, const int* q_valid, AttnDims s,
                                         float* dq, float* dk, float* dv) {
    using Tl = Tiles<SLOTS>;
    constexpr int BR = Tl::BWD_BR, BC = Tl::BC, KW = BC / 4, RW = BR / 4 > 0 ? BR / 4 : 1;
    __shared__ float smem[Tl::BWD_FLOATS];
    const int D = s.head_dim, KS = D + 1, qw = s.n_heads * D, kvw = s.n_kv_heads * D;
    float* qs = smem;            // [BR][D]
    float* dos = qs + BR * D;    // [BR][D]
    float* ks = dos + BR * D;    // [BC][KS]
    float* vs = ks + BC * KS;    // [BC][KS]
    float* ps = vs + BC * KS;    // [BR][BC] probabilities
    float* dss = ps + BR * BC;   // [BR][BC] score gradients (already times scale)
    float* row_lse = dss + BR * BC;
    float* row_delta = row_lse + BR;

    const int k_tiles = (s.kv_cap + BC - 1) / BC;
    const int tile = blockIdx.x % k_tiles, bh = blockIdx.x / k_tiles;
    const int h = bh % s.n_heads, b = bh / s.n_heads;
    if (b >= s.batch) return;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int kvh = h / (s.n_heads / s.n_kv_heads);
    const int j0 = tile * BC, start = q_start[b], n_valid = q_valid[b];
    const int key_end = min(j0 + BC, s.kv_cap);
    // Query row i sees key j when j <= start + i: the first row that sees key j0.
    const int i_first = max(0, j0 - start);
    if (i_first >= n_valid) return;  // no valid query sees these keys (block-uniform, before any barrier)
    const size_t kv_off = (size_t)b * s.kv_cap * kvw + (size_t)kvh * D;
    stage_kv<T, BC>(k + kv_off, v + kv_off, kvw, j0, key_end, D, ks, vs);

    float dk_acc[KW][SLOTS], dv_acc[KW][SLOTS];
#pragma unroll
    for (int m = 0; m < KW; ++m)
#pragma unroll
        for (int c = 0; c < SLOTS; ++c) dk_acc[m][c] = dv_acc[m][c] = 0.0f;

    for (int i0 = (i_first / BR) * BR; i0 < n_valid; i0 += BR) {
        __syncthreads();  // the previous query tile is consumed (and, the first time, K/V are staged)
        for (int idx = threadIdx.x; idx < BR * D; idx += blockDim.x) {
            const int r = idx / D, d = idx - r * D, i = i0 + r;
            const size_t off = ((size_t)b * s.q_len + i) * qw + (size_t)h * D + d;
            qs[idx] = i < n_valid ? to_f32(q[off]) : 0.0f;
            dos[idx] = i < n_valid ? to_f32(dout[off]) : 0.0f;
        }
        // delta = <dout, out> per row (one warp per row), and the saved log-sum-exp.
        for (int r = warp; r < BR; r += TILE_THREADS / 32) {
            const int i = i0 + r;
            float part = 0.0f;
            if (i < n_valid) {
                const size_t off = ((size_t)b * s.q_len + i) * qw + (size_t)h * D;
                for (int d = lane; d < D; d += 32) part += to_f32(dout[off + d]) * to_f32(out[off + d]);
            }
            part = warp_sum(part);
            if (lane == 0) {
                row_delta[r] = part;
                row_lse[r] = i < n_valid ? lse[((size_t)b * s.n_heads + h) * s.q_len + i] : 0.0f;
            }
        }
        __syncthreads();
        // p and dS for every (row, key) pair of the tile.
        for (int pair = threadIdx.x; pair < BR * BC; pair += blockDim.x) {
            const int r = pair / BC, jj = pair - r * BC, i = i0 + r, j = j0 + jj;
            float p = 0.0f, ds = 0.0f;
            if (i < n_valid && j < key_end && j <= start + i) {
                const float* qr = qs + r * D;
                const float* dor = dos + r * D;
                const float* kr = ks + jj * KS;
                const float* vr = vs + jj * KS;
                float sc = 0.0f, dp = 0.0f;
                for (int d = 0; d < D; ++d) {
                    sc += qr[d] * kr[d];
                    dp += dor[d] * vr[d];
                }
                p = expf(sc * s.scale - row_lse[r]);
                ds = p * (dp - row_delta[r]) * s.scale;
            }
            ps[pair] = p;
            dss[pair] = ds;
        }
        __syncthreads();
        // dV += P^T dO and dK += dS^T Q for the warp's keys.
#pragma unroll
        for (int m = 0; m < KW; ++m) {
            const int jj = warp * KW + m;
            for (int r = 0; r < BR; ++r) {
                const float p = ps[r * BC + jj], ds = dss[r * BC + jj];
#pragma unroll
                for (int c = 0; c < SLOTS; ++c) {
                    const int d = lane + 32 * c;
                    if (d < D) {
                        dv_acc[m][c] += p * dos[r * D + d];
                        dk_acc[m][c] += ds * qs[r * D + d];
                    }
                }
            }
        }
        // dQ += dS K for the warp's rows (other key tiles add to the same rows: atomics).
#pragma unroll
        for (int m = 0; m < RW; ++m) {
            const int r = warp * RW + m, i = i0 + r;
            if (r >= BR || i >= n_valid) continue;
            float* dqrow = dq + ((size_t)b * s.q_len + i) * qw + (size_t)h * D;
#pragma unroll
            for (int c = 0; c < SLOTS; ++c) {
                const int d = lane + 32 * c;
                if (d >= D) continue;
                float acc = 0.0f;
                for (int jj = 0; jj < BC; ++jj) acc += dss[r * BC + jj] * ks[jj * KS + d];
                atomicAdd(&dqrow[d], acc);
            }
        }
    }
#pragma unroll
    for (int m = 0; m < KW; ++m) {
        const int j = j0 + warp * KW + m;
        if (j >= key_end) continue;
        float* dkrow = dk + kv_off + (size_t)j * kvw;
        float* dvrow = dv + kv_off + (size_t)j * kvw;
#pragma unroll
        for (int c = 0; c < SLOTS; ++c) {
            const int d = lane + 32 * c;
            if (d < D) {
                atomicAdd(&dkrow[d], dk_acc[m][c]);
                atomicAdd(&dvrow[d], dv_acc[m][c]);
            }
        }
    }
}

}  // namespace

#define ATTENTION_ENTRY_POINTS(S, T)                                                                             \
    extern "C" __global__ void attention_fwd_##S(const T* q, const T* k, const T* v, const int* q_start,         \
                                                 const int* q_valid, int batch, int q_len, int kv_cap,            \
                                                 int n_heads, int n_kv_heads, int head_dim, float scale, T* out,  \
                                                 float* lse) {                                                    \
        attention_forward<T>(q, k, v, q_start, q_valid,                                                          \
                             AttnDims{batch, q_len, kv_cap, n_heads, n_kv_heads, head_dim, scale}, out, lse);    \
    }                                                                                                            \
    ATTENTION_TILED_ENTRY_POINTS(S, T, 4)                                                                        \
    ATTENTION_TILED_ENTRY_POINTS(S, T, 8)

#define ATTENTION_TILED_ENTRY_POINTS(S, T, SLOTS)                                                                 \
    extern "C" __global__ void __launch_bounds__(TILE_THREADS) attention_tiled_fwd_##S##_s##SLOTS(                \
        const T* q, const T* k, const T* v, const int* q_start, const int* q_valid, int batch, int q_len,         \
        int kv_cap, int n_heads, int n_kv_heads, int head_dim, float scale, T* out, float* lse) {                 \
        attention_tiled_forward<T, SLOTS>(q, k, v, q_start, q_valid,                                              \
                                          AttnDims{batch, q_len, kv_cap, n_heads, n_kv_heads, head_dim, scale},   \
                                          out, lse);                                                              \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(TILE_THREADS) attention_tiled_bwd_##S##_s##SLOTS(                \
        const T* q, const T* k, const T* v, const T* out, const T* dout, const float* lse, const int* q_start,    \
        const int* q_valid, int batch, int q_len, int kv_cap, int n_heads, int n_kv_heads, int head_dim,          \
        float scale, float* dq, float* dk, float* dv) {                                                           \
        attention_tiled_backward<T, SLOTS>(q, k, v, out, dout, lse, q_start, q_valid,                             \
                                           AttnDims{batch, q_len, kv_cap, n_heads, n_kv_heads, head_dim, scale},  \
                                           dq, dk, dv);                                                           \
    }

ELDER_FOR_DTYPES(ATTENTION_ENTRY_POINTS)
