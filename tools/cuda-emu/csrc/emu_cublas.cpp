// The cuBLAS GEMMs cudarc calls (column-major, as cuBLAS defines them), on the host with f32
// accumulation and the result rounded once to the output type — the numerics cuBLAS has with
// CUBLAS_COMPUTE_32F. Each GEMM is submitted to the handle's stream as a host function of the
// emulated driver (named `gemm` in its trace), so a GEMM issued while the stream is being captured
// becomes part of the graph and runs at every replay, as a real cuBLAS call would.
//
// The library links against the emulated libcuda.so (DT_NEEDED, found next to it through
// $ORIGIN), so it reaches the one driver instance the process loaded however it was loaded:
// cudarc opens both libraries RTLD_LOCAL when they are found on the library path, where a
// dlsym(RTLD_DEFAULT) lookup would find nothing.
#include <stdio.h>
#include <stdlib.h>

#include <vector>

#include "emu_half.h"

#define EMU_API extern "C" __attribute__((visibility("default")))

// From the emulated driver (emu_driver.cpp; CUresult is an int-sized enum, 0 = success).
extern "C" int cudaEmuLaunchHostFuncNamed(void* stream, void (*fn)(void*), void* data, const char* name);
extern "C" int cuStreamIsCapturing(void* stream, int* status);

typedef int cublasStatus_t;
enum : int {
    CUBLAS_STATUS_SUCCESS = 0,
    CUBLAS_STATUS_INVALID_VALUE = 7,
    CUBLAS_STATUS_NOT_SUPPORTED = 15,
};
enum : int { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1, CUBLAS_OP_C = 2 };
enum : int { CUDA_R_32F = 0, CUDA_R_16F = 2, CUDA_R_16BF = 14 };
enum : int { CUBLAS_COMPUTE_16F = 64, CUBLAS_COMPUTE_32F = 68 };

namespace {

struct Handle {
    void* stream = nullptr;
};

float load(const void* base, int type, size_t i) {
    switch (type) {
        case CUDA_R_32F: return ((const float*)base)[i];
        case CUDA_R_16F: return __half2float(((const __half*)base)[i]);
        default: return __bfloat162float(((const __nv_bfloat16*)base)[i]);
    }
}

void store(void* base, int type, size_t i, float v) {
    switch (type) {
        case CUDA_R_32F: ((float*)base)[i] = v; break;
        case CUDA_R_16F: ((__half*)base)[i] = __float2half_rn(v); break;
        default: ((__nv_bfloat16*)base)[i] = __float2bfloat16_rn(v); break;
    }
}

bool type_ok(int t) { return t == CUDA_R_32F || t == CUDA_R_16F || t == CUDA_R_16BF; }

// What cuBLAS would refuse for these dimensions and leading dimensions.
cublasStatus_t validate(int transa, int transb, int m, int n, int k, int a_type, int lda, int b_type, int ldb,
                        int c_type, int ldc) {
    if (m < 0 || n < 0 || k < 0 || !type_ok(a_type) || !type_ok(b_type) || !type_ok(c_type))
        return CUBLAS_STATUS_INVALID_VALUE;
    if ((transa != CUBLAS_OP_N && transa != CUBLAS_OP_T) || (transb != CUBLAS_OP_N && transb != CUBLAS_OP_T))
        return CUBLAS_STATUS_NOT_SUPPORTED;
    const int a_rows = transa == CUBLAS_OP_N ? m : k, b_rows = transb == CUBLAS_OP_N ? k : n;
    if (lda < (a_rows > 1 ? a_rows : 1) || ldb < (b_rows > 1 ? b_rows : 1) || ldc < (m > 1 ? m : 1)) {
        fprintf(stderr, "cuda-emu cuBLAS: leading dimension too small (lda %d, ldb %d, ldc %d for m %d n %d k %d)\n",
                lda, ldb, ldc, m, n, k);
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    return CUBLAS_STATUS_SUCCESS;
}

// C[m, n] = alpha op(A)[m, k] op(B)[k, n] + beta C, all column-major with leading dimensions
// (already validated).
void gemm(int transa, int transb, int m, int n, int k, float alpha, const void* a, int a_type, int lda,
          const void* b, int b_type, int ldb, float beta, void* c, int c_type, int ldc) {
    // op(A)[i, p] and op(B)[p, j], gathered once into f32 so the inner loop is contiguous.
    std::vector<float> at((size_t)m * k), bt((size_t)k * n);
    for (int i = 0; i < m; ++i)
        for (int p = 0; p < k; ++p)
            at[(size_t)i * k + p] =
                load(a, a_type, transa == CUBLAS_OP_N ? (size_t)p * lda + i : (size_t)i * lda + p);
    for (int j = 0; j < n; ++j)
        for (int p = 0; p < k; ++p)
            bt[(size_t)j * k + p] =
                load(b, b_type, transb == CUBLAS_OP_N ? (size_t)j * ldb + p : (size_t)p * ldb + j);
    for (int j = 0; j < n; ++j)
        for (int i = 0; i < m; ++i) {
            float acc = 0.0f;
            const float* ar = &at[(size_t)i * k];
            const float* bc = &bt[(size_t)j * k];
            for (int p = 0; p < k; ++p) acc += ar[p] * bc[p];
            const size_t ci = (size_t)j * ldc + i;
            // beta == 0 must not read C (it may hold NaN garbage), as in cuBLAS.
            const float prev = beta == 0.0f ? 0.0f : beta * load(c, c_type, ci);
            store(c, c_type, ci, alpha * acc + prev);
        }
}

size_t type_bytes(int t) { return t == CUDA_R_32F ? 4 : 2; }

struct GemmCall {
    int transa, transb, m, n, k;
    float alpha;
    const void* a;
    int a_type, lda;
    const void* b;
    int b_type, ldb;
    float beta;
    void* c;
    int c_type, ldc;
    bool keep;  // recorded into a graph: replayed later, never freed
};

void run_call(void* p) {
    GemmCall* g = (GemmCall*)p;
    gemm(g->transa, g->transb, g->m, g->n, g->k, g->alpha, g->a, g->a_type, g->lda, g->b, g->b_type, g->ldb, g->beta,
         g->c, g->c_type, g->ldc);
    if (!g->keep) delete g;
}


// Validates now (so a bad call fails at the call, as in cuBLAS) and runs on the stream.
cublasStatus_t submit(const Handle* h, const GemmCall& call) {
    const cublasStatus_t valid = validate(call.transa, call.transb, call.m, call.n, call.k, call.a_type, call.lda,
                                          call.b_type, call.ldb, call.c_type, call.ldc);
    if (valid != CUBLAS_STATUS_SUCCESS) return valid;
    GemmCall* g = new GemmCall(call);
    int status = 0;
    if (cuStreamIsCapturing(h->stream, &status) != 0) return CUBLAS_STATUS_INVALID_VALUE;
    g->keep = status != 0;
    return cudaEmuLaunchHostFuncNamed(h->stream, run_call, g, "gemm") == 0 ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_INVALID_VALUE;
}

}  // namespace

EMU_API cublasStatus_t cublasCreate_v2(void** handle) {
    *handle = new Handle();
    return CUBLAS_STATUS_SUCCESS;
}
EMU_API cublasStatus_t cublasDestroy_v2(void* handle) {
    delete (Handle*)handle;
    return CUBLAS_STATUS_SUCCESS;
}
EMU_API cublasStatus_t cublasSetStream_v2(void* handle, void* stream) {
    ((Handle*)handle)->stream = stream;
    return CUBLAS_STATUS_SUCCESS;
}
EMU_API cublasStatus_t cublasGetStream_v2(void* handle, void** stream) {
    *stream = ((Handle*)handle)->stream;
    return CUBLAS_STATUS_SUCCESS;
}
EMU_API cublasStatus_t cublasSetMathMode(void*, int) { return CUBLAS_STATUS_SUCCESS; }
EMU_API cublasStatus_t cublasSetWorkspace_v2(void*, void*, size_t) { return CUBLAS_STATUS_SUCCESS; }

EMU_API cublasStatus_t cublasSgemm_v2(void* h, int transa, int transb, int m, int n, int k, const float* alpha,
                                      const float* a, int lda, const float* b, int ldb, const float* beta, float* c,
                                      int ldc) {
    return submit((Handle*)h, GemmCall{transa, transb, m, n, k, *alpha, a, CUDA_R_32F, lda, b, CUDA_R_32F, ldb, *beta,
                                       c, CUDA_R_32F, ldc, false});
}

EMU_API cublasStatus_t cublasGemmEx(void* h, int transa, int transb, int m, int n, int k, const void* alpha,
                                    const void* a, int a_type, int lda, const void* b, int b_type, int ldb,
                                    const void* beta, void* c, int c_type, int ldc, int compute, int) {
    if (compute == CUBLAS_COMPUTE_16F) return CUBLAS_STATUS_NOT_SUPPORTED;  // elder never asks for it
    return submit((Handle*)h, GemmCall{transa, transb, m, n, k, *(const float*)alpha, a, a_type, lda, b, b_type, ldb,
                                       *(const float*)beta, c, c_type, ldc, false});
}

EMU_API cublasStatus_t cublasGemmEx(void*, int, int, int, int, int, const void*, const void*, int, int, const void*,
                                    int, int, const void*, void*, int, int, int, int);
EMU_API cublasStatus_t cublasGemmStridedBatchedEx(void* h, int transa, int transb, int m, int n, int k,
                                                  const void* alpha, const void* a, int a_type, int lda,
                                                  long long stride_a, const void* b, int b_type, int ldb,
                                                  long long stride_b, const void* beta, void* c, int c_type, int ldc,
                                                  long long stride_c, int batch, int compute, int) {
    if (compute == CUBLAS_COMPUTE_16F) return CUBLAS_STATUS_NOT_SUPPORTED;
    for (int i = 0; i < batch; ++i) {
        const cublasStatus_t s = cublasGemmEx(h, transa, transb, m, n, k, alpha,
                                              (const char*)a + i * stride_a * type_bytes(a_type), a_type, lda,
                                              (const char*)b + i * stride_b * type_bytes(b_type), b_type, ldb, beta,
                                              (char*)c + i * stride_c * type_bytes(c_type), c_type, ldc, compute, 0);
        if (s != CUBLAS_STATUS_SUCCESS) return s;
    }
    return CUBLAS_STATUS_SUCCESS;
}

EMU_API cublasStatus_t cublasSgemmStridedBatched(void* h, int transa, int transb, int m, int n, int k,
                                                 const float* alpha, const float* a, int lda, long long stride_a,
                                                 const float* b, int ldb, long long stride_b, const float* beta,
                                                 float* c, int ldc, long long stride_c, int batch) {
    for (int i = 0; i < batch; ++i) {
        const cublasStatus_t s = cublasSgemm_v2(h, transa, transb, m, n, k, alpha, a + i * stride_a, lda,
                                                b + i * stride_b, ldb, beta, c + i * stride_c, ldc);
        if (s != CUBLAS_STATUS_SUCCESS) return s;
    }
    return CUBLAS_STATUS_SUCCESS;
}
