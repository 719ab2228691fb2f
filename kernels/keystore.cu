// The key store's match (`deferral = "key_store"`): which edit a prompt is about. CPU twins in
// src/elder/keystore.rs (`KeySpace::embed_rows`, `KeyStore::scores_at` and the best entry of
// `KeyStore::best_match` before its relation tie-break).
//
// key_embed_{T}: a prompt's rows at the key site as unit keys (a key space without a projection):
//   rows [B * S, width] T (row b * S + s is position s of prompt b), means [M, width] f32: the
//   background means of position 0, of positions 1 .. M - 2 each, and of every later position, so
//   row s is centred on means[min(s, M - 1)]; M = 0: not centred.
//   keys [B * S, width] f32 = (row - mean) / |row - mean| (a row of norm <= 1e-12 is left as is).
//   Launch: one block of 128 threads per row (grid B * S).
//
// key_match_f32: every stored key against every position of every prompt, and each prompt's best
//   entry, in one launch with no host round trip:
//   queries [B, S, dim] f32 unit keys (key_embed's), lens [B] i32 (prompt b's positions are
//   0 .. lens[b]; the rest of its S rows are padding and never read);
//   keys [K * span, dim] f32 with K = entries * variants (entry e's keys are e * variants ..), each
//   of span rows, its subject's last token first; key_rows [K] u8: the rows of each key that are
//   read (1 ..= span); ceilings [K] f32 or null, with margin.
//   A key of n rows lines up with a prompt's rows p - n + 1 ..= p and scores the mean of the n dot
//   products; it counts when that reaches min(ceiling + margin, 0.99) (always, without ceilings).
//   best [B, entries] u64: the entry's best counting score over its variants and the positions,
//   packed as (ordered score bits << 32) | (2^32 - 1 - position), so a larger value is a higher
//   score and, among equal scores, an earlier position (the CPU's first strict maximum in
//   position order); 0: nothing counted.
//   top [B] u64: (ordered score bits << 32) | entry of the best entry, the newest among equals (the
//   CPU's `>=`); 0: none. Must be zero before the launch (the launcher clears it on the stream).
//   Launch: one warp per entry, for every prompt in turn (each key is read from memory once per
//   launch, the prompts' rows stay in L1/L2), 8 warps per block: grid ceil(entries / 8).
// Bound: the stored keys, K * span * dim * 4 bytes per launch (10^5 edits x 3 variants x 3 rows
//   x 576 = 2.1 GB, about 0.6 ms of an H100's bandwidth), and B * S * K * span * dim FMAs.

#include <float.h>
#include <limits.h>

#include "common.cuh"

using namespace elder;

namespace {

constexpr int EMBED_THREADS = 128;
constexpr int MATCH_WARPS = 8;
// A key always matches the text it was read from (KeyCeilings::counts' OWN_TEXT).
constexpr float OWN_TEXT = 0.99f;

// Float bits as an unsigned int that orders as the floats do (NaN aside).
__device__ __forceinline__ uint32_t ordered_bits(float x) {
    const uint32_t b = __float_as_uint(x);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

template <typename T>
__device__ void key_embed(const T* rows, const float* means, int n_means, int seq, int width, float* keys) {
    __shared__ float scratch[32];
    const int row = blockIdx.x;
    const int pos = row % seq;
    const T* x = rows + (size_t)row * width;
    const float* m = n_means > 0 ? means + (size_t)min(pos, n_means - 1) * width : nullptr;
    float* out = keys + (size_t)row * width;
    float sum_sq = 0.0f;
    for (int i = threadIdx.x; i < width; i += blockDim.x) {
        const float v = to_f32(x[i]) - (m != nullptr ? m[i] : 0.0f);
        out[i] = v;
        sum_sq += v * v;
    }
    const float norm = sqrtf(block_sum(sum_sq, scratch));
    // Each thread rescales what it wrote itself: no barrier needed.
    if (norm > 1e-12f)
        for (int i = threadIdx.x; i < width; i += blockDim.x) out[i] = out[i] / norm;
}

}  // namespace

#define KEYSTORE_DTYPE(S, T)                                                                                  \
    extern "C" __global__ void __launch_bounds__(EMBED_THREADS)                                               \
        key_embed_##S(const T* rows, const float* means, int n_means, int seq, int width, float* keys) {      \
        key_embed<T>(rows, means, n_means, seq, width, keys);                                                 \
    }
ELDER_FOR_DTYPES(KEYSTORE_DTYPE)

extern "C" __global__ void __launch_bounds__(MATCH_WARPS * 32)
    key_match_f32(const float* queries, const int* lens, int batch, int seq, int dim, const float* keys,
                  const uint8_t* key_rows, const float* ceilings, float margin, int entries, int variants, int span,
                  unsigned long long* best, unsigned long long* top) {
    const int lane = threadIdx.x & 31;
    const int e = blockIdx.x * MATCH_WARPS + (threadIdx.x >> 5);
    if (e >= entries) return;  // a whole warp leaves together
    for (int b = 0; b < batch; ++b) {
        const int len = min(lens[b], seq);
        const float* qb = queries + (size_t)b * seq * dim;
        float best_s = 0.0f;
        int best_p = INT_MAX;
        bool found = false;
        for (int v = 0; v < variants; ++v) {
            const int k = e * variants + v;
            const int n = max(1, min((int)key_rows[k], span));
            const float* kr = keys + (size_t)k * span * dim;
            const float bar = ceilings != nullptr ? fminf(ceilings[k] + margin, OWN_TEXT) : -INFINITY;
            for (int p = n - 1; p < len; ++p) {
                float sum = 0.0f;
                for (int j = 0; j < n; ++j) {
                    const float* q = qb + (size_t)(p - j) * dim;
                    const float* kj = kr + (size_t)j * dim;
                    float d = 0.0f;
                    for (int i = lane; i < dim; i += 32) d += q[i] * kj[i];
                    sum += warp_sum(d);
                }
                const float s = sum / (float)n;
                // NaN never counts; a tie keeps the earlier position.
                if (s >= bar && (!found || s > best_s || (s == best_s && p < best_p))) {
                    best_s = s;
                    best_p = p;
                    found = true;
                }
            }
        }
        if (lane == 0) {
            const unsigned long long hi = (unsigned long long)ordered_bits(best_s) << 32;
            best[(size_t)b * entries + e] = found ? hi | (0xffffffffull - (unsigned long long)best_p) : 0ull;
            if (found) atomicMax(&top[b], hi | (unsigned long long)e);
        }
    }
}
