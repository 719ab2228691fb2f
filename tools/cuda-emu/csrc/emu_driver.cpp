// The subset of the CUDA driver API that cudarc and elder call, implemented on the host: device
// memory is host memory (each allocation ends at a PROT_NONE guard page, so a kernel reading or
// writing past its end faults with a message naming the kernel), work on a stream runs
// synchronously at the call, stream capture records operations into a graph that cuGraphLaunch
// replays, and kernels come from the registry built from kernels/*.cu — the fatbin handed to
// cuModuleLoadData is ignored.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "emu_sched.h"

#define EMU_API extern "C" __attribute__((visibility("default")))

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;

enum : int {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_INVALID_DEVICE = 101,
    CUDA_ERROR_INVALID_HANDLE = 400,
    CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_LAUNCH_FAILED = 719,
    CUDA_ERROR_NOT_SUPPORTED = 801,
    CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED = 900,
};

namespace {

constexpr size_t TOTAL_MEMORY = 64ull << 30;  // what the "device" reports; allocations are host mmaps

// ------------------------------------------------------------------ trace
// What the host asks of the "device", in order, for tests that check the shape of a step: which
// kernels it launches and how often, and that it neither synchronises, allocates nor copies where
// it must not. Recorded at the call (a captured operation is marked `capture`; a graph replay is
// one `graph_launch`). Per OS thread, so tests running in parallel do not see each other's work.

thread_local bool tracing = false;
thread_local std::vector<std::string> trace_events;

void trace(bool captured, const char* kind, const std::string& detail) {
    if (!tracing) return;
    std::string e = captured ? "capture " : "";
    e += kind;
    if (!detail.empty()) e += " " + detail;
    trace_events.push_back(std::move(e));
}

// ------------------------------------------------------------------ memory

struct Allocation {
    void* map_base;
    size_t map_bytes;
    size_t bytes;
};

std::mutex alloc_lock;
std::map<uintptr_t, Allocation> allocations;  // keyed by the pointer handed out

size_t page_size() {
    static const size_t p = (size_t)sysconf(_SC_PAGESIZE);
    return p;
}

CUresult device_alloc(CUdeviceptr* out, size_t bytes) {
    if (!out) return CUDA_ERROR_INVALID_VALUE;
    trace(false, "alloc", std::to_string(bytes));
    const size_t payload = ((bytes ? bytes : 1) + 15) & ~(size_t)15;  // 16-byte aligned start
    const size_t data_pages = (payload + page_size() - 1) / page_size() * page_size();
    const size_t map_bytes = data_pages + page_size();
    void* base = mmap(nullptr, map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
    char* guard = (char*)base + data_pages;
    mprotect(guard, page_size(), PROT_NONE);
    char* ptr = guard - payload;
    // cuMemAlloc returns garbage; 0xff bytes read as NaN in f32/f16/bf16 and -1 in integers, so a
    // kernel that reads what nobody wrote produces visibly wrong results.
    memset(ptr, 0xff, payload);
    std::lock_guard<std::mutex> g(alloc_lock);
    allocations[(uintptr_t)ptr] = Allocation{base, map_bytes, bytes};
    *out = (CUdeviceptr)(uintptr_t)ptr;
    return CUDA_SUCCESS;
}

CUresult device_free(CUdeviceptr p) {
    if (p == 0) return CUDA_SUCCESS;
    trace(false, "free", "");
    Allocation a;
    {
        std::lock_guard<std::mutex> g(alloc_lock);
        auto it = allocations.find((uintptr_t)p);
        if (it == allocations.end()) {
            fprintf(stderr, "cuda-emu: cuMemFree of %#llx, which is not the start of an allocation\n", p);
            return CUDA_ERROR_INVALID_VALUE;
        }
        a = it->second;
        allocations.erase(it);
    }
    munmap(a.map_base, a.map_bytes);
    return CUDA_SUCCESS;
}

// True when [p, p + bytes) lies inside one live device allocation.
bool device_range_ok(CUdeviceptr p, size_t bytes, const char* what) {
    std::lock_guard<std::mutex> g(alloc_lock);
    auto it = allocations.upper_bound((uintptr_t)p);
    if (it != allocations.begin()) {
        --it;
        const uintptr_t start = it->first, end = start + it->second.bytes;
        if ((uintptr_t)p >= start && (uintptr_t)p + bytes <= end) return true;
    }
    fprintf(stderr, "cuda-emu: %s touches [%#llx, +%zu bytes), which is not inside one device allocation\n", what, p,
            bytes);
    return false;
}

// ------------------------------------------------------------------ streams, events, graphs

struct Op {
    enum Kind { Launch, Copy, Set8, Set32, HostFn } kind;
    // Launch
    const emu::KernelEntry* kernel = nullptr;
    emu::Index3 grid{1, 1, 1}, block{1, 1, 1};
    size_t smem = 0;
    std::vector<std::vector<unsigned char>> args;
    // Copy / memset
    void* dst = nullptr;
    const void* src = nullptr;
    size_t bytes = 0;
    unsigned value = 0;
    // Host function
    void (*fn)(void*) = nullptr;
    void* data = nullptr;
    const char* trace_name = nullptr;  // what the trace calls it (cuBLAS names its GEMMs)
};

struct Graph {
    std::vector<Op> ops;
};

struct Stream {
    Graph* capturing = nullptr;
};

struct Event {
    double seconds = 0.0;
};

Stream default_stream_object;

Stream* stream_of(void* s) { return s ? (Stream*)s : &default_stream_object; }

double now_seconds() {
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

CUresult run_op(const Op& op) {
    switch (op.kind) {
        case Op::Launch: {
            std::vector<void*> ptrs;
            for (auto& a : op.args) ptrs.push_back((void*)a.data());
            const std::string err = emu::run_kernel(*op.kernel, op.grid, op.block, op.smem, ptrs.data());
            if (!err.empty()) {
                fprintf(stderr, "cuda-emu: kernel %s grid (%u,%u,%u) block (%u,%u,%u): %s\n", op.kernel->name,
                        op.grid.x, op.grid.y, op.grid.z, op.block.x, op.block.y, op.block.z, err.c_str());
                return CUDA_ERROR_LAUNCH_FAILED;
            }
            return CUDA_SUCCESS;
        }
        case Op::Copy:
            memmove(op.dst, op.src, op.bytes);
            return CUDA_SUCCESS;
        case Op::Set8:
            memset(op.dst, (int)(op.value & 0xff), op.bytes);
            return CUDA_SUCCESS;
        case Op::Set32:
            for (size_t i = 0; i < op.bytes / 4; ++i) memcpy((char*)op.dst + 4 * i, &op.value, 4);
            return CUDA_SUCCESS;
        case Op::HostFn:
            op.fn(op.data);
            return CUDA_SUCCESS;
    }
    return CUDA_ERROR_INVALID_VALUE;
}

// Runs `op` now, or appends it to the graph the stream is capturing.
CUresult submit(void* stream, Op op) {
    Stream* s = stream_of(stream);
    if (tracing) {
        switch (op.kind) {
            case Op::Launch: trace(s->capturing, "launch", op.kernel->name); break;
            case Op::Copy: break;  // traced by the copy calls, which know the direction
            case Op::Set8:
            case Op::Set32: trace(s->capturing, "memset", std::to_string(op.bytes)); break;
            case Op::HostFn: trace(s->capturing, op.trace_name ? op.trace_name : "host_fn", ""); break;
        }
    }
    if (s->capturing) {
        s->capturing->ops.push_back(std::move(op));
        return CUDA_SUCCESS;
    }
    return run_op(op);
}

Op copy_op(void* dst, const void* src, size_t bytes) {
    Op op{Op::Copy};
    op.dst = dst;
    op.src = src;
    op.bytes = bytes;
    return op;
}

int context_token;  // the one context's handle points here

// Streams this thread is capturing. Like the driver in CU_STREAM_CAPTURE_MODE_THREAD_LOCAL, a
// synchronous call (allocation, blocking copy, synchronisation) from a capturing thread is an
// error: it would have escaped the graph.
thread_local int captures_on_this_thread = 0;

bool refuse_during_capture(const char* api) {
    if (captures_on_this_thread == 0) return false;
    fprintf(stderr, "cuda-emu: %s while this thread captures a stream into a CUDA graph (not allowed)\n", api);
    return true;
}
thread_local void* current_context = nullptr;

}  // namespace

// ------------------------------------------------------------------ init, device, context

EMU_API CUresult cuInit(unsigned) { return CUDA_SUCCESS; }
EMU_API CUresult cuDriverGetVersion(int* v) {
    *v = 13000;
    return CUDA_SUCCESS;
}
EMU_API CUresult cuDeviceGetCount(int* n) {
    *n = 1;
    return CUDA_SUCCESS;
}
EMU_API CUresult cuDeviceGet(CUdevice* d, int ordinal) {
    if (ordinal != 0) return CUDA_ERROR_INVALID_DEVICE;
    *d = 0;
    return CUDA_SUCCESS;
}
EMU_API CUresult cuDeviceGetName(char* name, int len, CUdevice) {
    snprintf(name, (size_t)len, "elder CUDA emulator (CPU)");
    return CUDA_SUCCESS;
}
EMU_API CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice) {
    *bytes = TOTAL_MEMORY;
    return CUDA_SUCCESS;
}
EMU_API CUresult cuDeviceGetUuid(unsigned char* uuid, CUdevice) {
    memset(uuid, 0xe1, 16);
    return CUDA_SUCCESS;
}
EMU_API CUresult cuDeviceGetUuid_v2(unsigned char* uuid, CUdevice d) { return cuDeviceGetUuid(uuid, d); }
EMU_API CUresult cuDeviceGetAttribute(int* v, int attribute, CUdevice) {
    switch (attribute) {
        case 1: *v = 1024; break;              // max threads per block
        case 2: *v = 1024; break;              // max block dim x
        case 3: *v = 1024; break;              // max block dim y
        case 4: *v = 64; break;                // max block dim z
        case 5: *v = 2147483647; break;        // max grid dim x
        case 6: case 7: *v = 65535; break;     // max grid dim y, z
        case 8: *v = 48 * 1024; break;         // shared memory per block
        case 10: *v = 32; break;               // warp size
        case 13: *v = 1000000; break;          // clock rate (kHz)
        case 16: *v = 4; break;                // SM count: small, so grid-stride kernels loop
        case 36: *v = 1000000; break;          // memory clock (kHz)
        case 37: *v = 256; break;              // bus width (bits)
        case 38: *v = 4 << 20; break;          // L2 bytes
        case 41: *v = 1; break;                // unified addressing
        case 75: *v = 9; break;                // compute capability 9.0
        case 76: *v = 0; break;
        case 97: *v = 227 * 1024; break;       // shared memory per block, opt-in
        case 115: *v = 1; break;               // memory pools (async allocation)
        default: *v = 0; break;
    }
    return CUDA_SUCCESS;
}
EMU_API CUresult cuDevicePrimaryCtxRetain(void** ctx, CUdevice) {
    *ctx = &context_token;
    return CUDA_SUCCESS;
}
EMU_API CUresult cuDevicePrimaryCtxRelease_v2(CUdevice) { return CUDA_SUCCESS; }
EMU_API CUresult cuCtxSetCurrent(void* ctx) {
    current_context = ctx;
    return CUDA_SUCCESS;
}
EMU_API CUresult cuCtxGetCurrent(void** ctx) {
    *ctx = current_context;
    return CUDA_SUCCESS;
}
EMU_API CUresult cuCtxPushCurrent_v2(void* ctx) { return cuCtxSetCurrent(ctx); }
EMU_API CUresult cuCtxPopCurrent_v2(void** ctx) {
    if (ctx) *ctx = current_context;
    return CUDA_SUCCESS;
}
EMU_API CUresult cuCtxGetDevice(CUdevice* d) {
    *d = 0;
    return CUDA_SUCCESS;
}
EMU_API CUresult cuCtxSynchronize() {
    trace(false, "sync", "context");
    return refuse_during_capture("cuCtxSynchronize") ? CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED : CUDA_SUCCESS;
}
EMU_API CUresult cuCtxSetFlags(unsigned) { return CUDA_SUCCESS; }
EMU_API CUresult cuCtxGetStreamPriorityRange(int* least, int* greatest) {
    if (least) *least = 0;
    if (greatest) *greatest = -5;
    return CUDA_SUCCESS;
}
EMU_API CUresult cuGetErrorName(CUresult e, const char** s) {
    switch (e) {
        case CUDA_SUCCESS: *s = "CUDA_SUCCESS"; break;
        case CUDA_ERROR_INVALID_VALUE: *s = "CUDA_ERROR_INVALID_VALUE"; break;
        case CUDA_ERROR_OUT_OF_MEMORY: *s = "CUDA_ERROR_OUT_OF_MEMORY"; break;
        case CUDA_ERROR_INVALID_DEVICE: *s = "CUDA_ERROR_INVALID_DEVICE"; break;
        case CUDA_ERROR_INVALID_HANDLE: *s = "CUDA_ERROR_INVALID_HANDLE"; break;
        case CUDA_ERROR_NOT_FOUND: *s = "CUDA_ERROR_NOT_FOUND"; break;
        case CUDA_ERROR_LAUNCH_FAILED: *s = "CUDA_ERROR_LAUNCH_FAILED"; break;
        case CUDA_ERROR_NOT_SUPPORTED: *s = "CUDA_ERROR_NOT_SUPPORTED"; break;
        default: *s = "CUDA_ERROR_UNKNOWN"; break;
    }
    return CUDA_SUCCESS;
}
EMU_API CUresult cuGetErrorString(CUresult e, const char** s) { return cuGetErrorName(e, s); }

// ------------------------------------------------------------------ memory

EMU_API CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) {
    if (refuse_during_capture("cuMemAlloc")) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    return device_alloc(p, bytes);
}
// Stricter than CUDA (which would add an allocation node): elder's captured steps allocate nothing.
EMU_API CUresult cuMemAllocAsync(CUdeviceptr* p, size_t bytes, void*) {
    if (refuse_during_capture("cuMemAllocAsync")) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    return device_alloc(p, bytes);
}
EMU_API CUresult cuMemFree_v2(CUdeviceptr p) {
    if (refuse_during_capture("cuMemFree")) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    return device_free(p);
}
EMU_API CUresult cuMemFreeAsync(CUdeviceptr p, void*) {
    if (refuse_during_capture("cuMemFreeAsync")) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    return device_free(p);
}
EMU_API CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
    size_t used = 0;
    {
        std::lock_guard<std::mutex> g(alloc_lock);
        for (auto& kv : allocations) used += kv.second.bytes;
    }
    *total = TOTAL_MEMORY;
    *free_bytes = used < TOTAL_MEMORY ? TOTAL_MEMORY - used : 0;
    return CUDA_SUCCESS;
}
EMU_API CUresult cuMemHostAlloc(void** p, size_t bytes, unsigned) {
    *p = malloc(bytes ? bytes : 1);
    return *p ? CUDA_SUCCESS : CUDA_ERROR_OUT_OF_MEMORY;
}
EMU_API CUresult cuMemAllocHost_v2(void** p, size_t bytes) { return cuMemHostAlloc(p, bytes, 0); }
EMU_API CUresult cuMemFreeHost(void* p) {
    free(p);
    return CUDA_SUCCESS;
}
EMU_API CUresult cuMemHostRegister_v2(void*, size_t, unsigned) { return CUDA_SUCCESS; }
EMU_API CUresult cuMemHostUnregister(void*) { return CUDA_SUCCESS; }

EMU_API CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t bytes, void* stream) {
    if (!device_range_ok(dst, bytes, "cuMemcpyHtoD destination")) return CUDA_ERROR_INVALID_VALUE;
    trace(stream_of(stream)->capturing, "htod", std::to_string(bytes));
    return submit(stream, copy_op((void*)(uintptr_t)dst, src, bytes));
}
EMU_API CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t bytes, void* stream) {
    if (!device_range_ok(src, bytes, "cuMemcpyDtoH source")) return CUDA_ERROR_INVALID_VALUE;
    trace(stream_of(stream)->capturing, "dtoh", std::to_string(bytes));
    return submit(stream, copy_op(dst, (const void*)(uintptr_t)src, bytes));
}
EMU_API CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t bytes, void* stream) {
    if (!device_range_ok(dst, bytes, "cuMemcpyDtoD destination") ||
        !device_range_ok(src, bytes, "cuMemcpyDtoD source"))
        return CUDA_ERROR_INVALID_VALUE;
    trace(stream_of(stream)->capturing, "dtod", std::to_string(bytes));
    return submit(stream, copy_op((void*)(uintptr_t)dst, (const void*)(uintptr_t)src, bytes));
}
EMU_API CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t bytes) {
    if (refuse_during_capture("cuMemcpyHtoD_v2")) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    return cuMemcpyHtoDAsync_v2(dst, src, bytes, nullptr);
}
EMU_API CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t bytes) {
    if (refuse_during_capture("cuMemcpyDtoH_v2")) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    return cuMemcpyDtoHAsync_v2(dst, src, bytes, nullptr);
}
EMU_API CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t bytes) {
    if (refuse_during_capture("cuMemcpyDtoD_v2")) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    return cuMemcpyDtoDAsync_v2(dst, src, bytes, nullptr);
}
EMU_API CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char v, size_t n, void* stream) {
    if (!device_range_ok(dst, n, "cuMemsetD8")) return CUDA_ERROR_INVALID_VALUE;
    Op op{Op::Set8};
    op.dst = (void*)(uintptr_t)dst;
    op.bytes = n;
    op.value = v;
    return submit(stream, std::move(op));
}
EMU_API CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char v, size_t n) { return cuMemsetD8Async(dst, v, n, nullptr); }
EMU_API CUresult cuMemsetD32Async(CUdeviceptr dst, unsigned v, size_t n, void* stream) {
    if (!device_range_ok(dst, n * 4, "cuMemsetD32")) return CUDA_ERROR_INVALID_VALUE;
    Op op{Op::Set32};
    op.dst = (void*)(uintptr_t)dst;
    op.bytes = n * 4;
    op.value = v;
    return submit(stream, std::move(op));
}
EMU_API CUresult cuMemsetD32_v2(CUdeviceptr dst, unsigned v, size_t n) { return cuMemsetD32Async(dst, v, n, nullptr); }

// ------------------------------------------------------------------ modules and launches

EMU_API CUresult cuModuleLoadData(void** module, const void*) {
    static int module_token;
    *module = &module_token;  // every kernel lives in the one registry
    return CUDA_SUCCESS;
}
EMU_API CUresult cuModuleUnload(void*) { return CUDA_SUCCESS; }
EMU_API CUresult cuModuleGetFunction(void** f, void*, const char* name) {
    const emu::KernelEntry* k = emu::find_kernel(name);
    if (!k) return CUDA_ERROR_NOT_FOUND;
    *f = (void*)k;
    return CUDA_SUCCESS;
}
EMU_API CUresult cuFuncGetAttribute(int* v, int attribute, void*) {
    switch (attribute) {
        case 0: *v = 1024; break;  // max threads per block
        default: *v = 0; break;
    }
    return CUDA_SUCCESS;
}
EMU_API CUresult cuFuncSetAttribute(void*, int, int) { return CUDA_SUCCESS; }
EMU_API CUresult cuFuncSetCacheConfig(void*, int) { return CUDA_SUCCESS; }

EMU_API CUresult cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                                unsigned bz, unsigned smem, void* stream, void** params, void** extra) {
    if (!f) return CUDA_ERROR_INVALID_HANDLE;
    if (extra) {
        fprintf(stderr, "cuda-emu: cuLaunchKernel with `extra` is not supported\n");
        return CUDA_ERROR_NOT_SUPPORTED;
    }
    const emu::KernelEntry* k = (const emu::KernelEntry*)f;
    Op op{Op::Launch};
    op.kernel = k;
    op.grid = emu::Index3{gx, gy, gz};
    op.block = emu::Index3{bx, by, bz};
    op.smem = smem;
    // The arguments are copied at launch, as the driver does: the caller may reuse its storage.
    for (int i = 0; i < k->n_params; ++i) {
        const unsigned char* a = (const unsigned char*)params[i];
        op.args.emplace_back(a, a + k->param_sizes[i]);
    }
    return submit(stream, std::move(op));
}
EMU_API CUresult cuLaunchHostFunc(void* stream, void (*fn)(void*), void* data) {
    Op op{Op::HostFn};
    op.fn = fn;
    op.data = data;
    return submit(stream, std::move(op));
}
// cuLaunchHostFunc under a name for the trace (the emulated cuBLAS submits its GEMMs with it).
EMU_API CUresult cudaEmuLaunchHostFuncNamed(void* stream, void (*fn)(void*), void* data, const char* name) {
    Op op{Op::HostFn};
    op.fn = fn;
    op.data = data;
    op.trace_name = name;
    return submit(stream, std::move(op));
}

// ------------------------------------------------------------------ trace access (elder_cuda_emu::trace)

// Starts recording this thread's calls, dropping what an earlier trace left.
EMU_API void cudaEmuTraceStart() {
    trace_events.clear();
    tracing = true;
}
// Stops recording; returns the number of events recorded.
EMU_API size_t cudaEmuTraceStop() {
    tracing = false;
    return trace_events.size();
}
// Event `i` of the last trace ("launch rope_f32", "capture launch ...", "dtoh 64", "sync stream",
// "graph_launch 37", "alloc 4096", "gemm", ...), or null past the end.
EMU_API const char* cudaEmuTraceEvent(size_t i) {
    return i < trace_events.size() ? trace_events[i].c_str() : nullptr;
}

// ------------------------------------------------------------------ streams and events

EMU_API CUresult cuStreamCreate(void** s, unsigned) {
    *s = new Stream();
    return CUDA_SUCCESS;
}
EMU_API CUresult cuStreamCreateWithPriority(void** s, unsigned flags, int) { return cuStreamCreate(s, flags); }
EMU_API CUresult cuStreamDestroy_v2(void* s) {
    if (s) delete (Stream*)s;
    return CUDA_SUCCESS;
}
EMU_API CUresult cuStreamSynchronize(void*) {
    trace(false, "sync", "stream");
    return refuse_during_capture("cuStreamSynchronize") ? CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED : CUDA_SUCCESS;
}
EMU_API CUresult cuStreamQuery(void*) { return CUDA_SUCCESS; }
EMU_API CUresult cuStreamWaitEvent(void*, void*, unsigned) { return CUDA_SUCCESS; }

EMU_API CUresult cuEventCreate(void** e, unsigned) {
    *e = new Event();
    return CUDA_SUCCESS;
}
EMU_API CUresult cuEventRecord(void* e, void* stream) {
    if (stream_of(stream)->capturing) return CUDA_SUCCESS;
    ((Event*)e)->seconds = now_seconds();
    return CUDA_SUCCESS;
}
EMU_API CUresult cuEventSynchronize(void*) {
    trace(false, "sync", "event");
    return CUDA_SUCCESS;
}
EMU_API CUresult cuEventQuery(void*) { return CUDA_SUCCESS; }
EMU_API CUresult cuEventDestroy_v2(void* e) {
    delete (Event*)e;
    return CUDA_SUCCESS;
}
EMU_API CUresult cuEventElapsedTime(float* ms, void* start, void* end) {
    *ms = (float)((((Event*)end)->seconds - ((Event*)start)->seconds) * 1e3);
    return CUDA_SUCCESS;
}
EMU_API CUresult cuEventElapsedTime_v2(float* ms, void* start, void* end) { return cuEventElapsedTime(ms, start, end); }

// ------------------------------------------------------------------ stream capture and graphs

EMU_API CUresult cuStreamBeginCapture_v2(void* stream, int) {
    if (!stream) {
        fprintf(stderr, "cuda-emu: stream capture on the legacy default stream (not allowed)\n");
        return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    }
    Stream* s = stream_of(stream);
    if (s->capturing) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    s->capturing = new Graph();
    ++captures_on_this_thread;
    return CUDA_SUCCESS;
}
EMU_API CUresult cuStreamEndCapture(void* stream, void** graph) {
    Stream* s = stream_of(stream);
    if (!s->capturing) return CUDA_ERROR_INVALID_VALUE;
    *graph = s->capturing;
    s->capturing = nullptr;
    --captures_on_this_thread;
    return CUDA_SUCCESS;
}
EMU_API CUresult cuStreamIsCapturing(void* stream, int* status) {
    *status = stream_of(stream)->capturing ? 1 : 0;
    return CUDA_SUCCESS;
}
EMU_API CUresult cuGraphInstantiateWithFlags(void** exec, void* graph, unsigned long long) {
    *exec = new Graph(*(Graph*)graph);
    return CUDA_SUCCESS;
}
EMU_API CUresult cuGraphUpload(void*, void*) { return CUDA_SUCCESS; }
EMU_API CUresult cuGraphLaunch(void* exec, void* stream) {
    if (stream_of(stream)->capturing) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    trace(false, "graph_launch", std::to_string(((Graph*)exec)->ops.size()));
    for (const Op& op : ((Graph*)exec)->ops) {
        const CUresult r = run_op(op);
        if (r != CUDA_SUCCESS) return r;
    }
    return CUDA_SUCCESS;
}
EMU_API CUresult cuGraphDestroy(void* g) {
    delete (Graph*)g;
    return CUDA_SUCCESS;
}
EMU_API CUresult cuGraphExecDestroy(void* g) {
    delete (Graph*)g;
    return CUDA_SUCCESS;
}
