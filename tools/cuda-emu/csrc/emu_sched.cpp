// Runs one kernel launch on the calling OS thread: blocks one after another, the threads of a block
// as fibers that switch only at barriers (__syncthreads, warp shuffles). The order in which ready
// fibers run is shuffled per block, so a missing barrier shows up as a wrong result instead of
// passing by luck of a fixed order. A barrier that can never complete (a thread exited, or waits
// at a different barrier) is reported as a deadlock.
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "emu_device.h"
#include "emu_registry.h"
#include "emu_sched.h"

#if !defined(__x86_64__)
#error "the CUDA emulator's fiber switch is written for x86-64"
#endif

// emu_switch(save, next): saves the callee-saved registers, MXCSR and the x87 control word on the
// current stack, stores the stack pointer in *save, then resumes the fiber whose stack pointer is
// `next`.
extern "C" void emu_switch(void** save, void* next);
asm(R"(
    .text
    .globl emu_switch
    .hidden emu_switch
    .type emu_switch,@function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch,.-emu_switch
)");

namespace emu {

thread_local ThreadIndices current;

// ------------------------------------------------------------------ registry

namespace {
std::mutex& registry_lock() {
    static std::mutex m;
    return m;
}
std::unordered_map<std::string, KernelEntry>& registry() {
    static std::unordered_map<std::string, KernelEntry> r;
    return r;
}
}  // namespace

void register_kernel(const KernelEntry& entry) {
    std::lock_guard<std::mutex> g(registry_lock());
    registry()[entry.name] = entry;
}

const KernelEntry* find_kernel(const char* name) {
    std::lock_guard<std::mutex> g(registry_lock());
    auto it = registry().find(name);
    return it == registry().end() ? nullptr : &it->second;
}

// ------------------------------------------------------------------ fibers

namespace {

constexpr size_t STACK_BYTES = 256 * 1024;
constexpr int MAX_THREADS = 1024;

enum class State { Ready, AtBlockBarrier, AtWarpBarrier, Done };

struct Fiber {
    void* stack_base = nullptr;  // mapping start (guard page first)
    void* sp = nullptr;
    State state = State::Ready;
    Index3 tid{0, 0, 0};
};

struct BlockRun {
    std::vector<Fiber> fibers;
    void* sched_sp = nullptr;
    int n_threads = 0, running = -1, done = 0, at_block_barrier = 0;
    std::vector<int> warp_waiting, warp_lanes;
    std::vector<uint64_t> shuffle_slots;
    std::vector<int> order;
    std::vector<unsigned char> dyn_smem;
    const KernelEntry* kernel = nullptr;
    void** params = nullptr;
    Index3 block_idx{0, 0, 0}, block_dim{1, 1, 1}, grid_dim{1, 1, 1};
};

thread_local BlockRun* tl_run = nullptr;

BlockRun& run_state() {
    if (!tl_run) tl_run = new BlockRun();  // one per OS thread that launches; kept for reuse
    return *tl_run;
}

void fiber_main() {
    BlockRun& r = *tl_run;
    Fiber& f = r.fibers[r.running];
    r.kernel->invoke(r.kernel->fn, r.params);
    f.state = State::Done;
    ++r.done;
    // Exited threads count as arrived at a block barrier (what the hardware does in practice).
    if (r.at_block_barrier > 0 && r.at_block_barrier + r.done == r.n_threads) {
        for (int i = 0; i < r.n_threads; ++i)
            if (r.fibers[i].state == State::AtBlockBarrier) r.fibers[i].state = State::Ready;
        r.at_block_barrier = 0;
    }
    void* dead;
    emu_switch(&dead, r.sched_sp);
    abort();  // a finished fiber is never resumed
}

void prepare_fiber(Fiber& f) {
    if (!f.stack_base) {
        const long page = sysconf(_SC_PAGESIZE);
        void* m = mmap(nullptr, STACK_BYTES + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                       -1, 0);
        if (m == MAP_FAILED) {
            fprintf(stderr, "cuda-emu: cannot map a fiber stack\n");
            abort();
        }
        mprotect(m, page, PROT_NONE);  // overflow faults instead of corrupting the neighbour
        f.stack_base = m;
    }
    const long page = sysconf(_SC_PAGESIZE);
    uintptr_t top = ((uintptr_t)f.stack_base + page + STACK_BYTES) & ~(uintptr_t)15;
    uintptr_t* ret_slot = (uintptr_t*)(top - 16);  // 16-aligned: entry sees rsp % 16 == 8
    ret_slot[0] = (uintptr_t)&fiber_main;
    ret_slot[1] = 0;
    uintptr_t* sp = ret_slot - 7;  // six callee-saved registers + the MXCSR / x87 word
    for (int i = 1; i < 7; ++i) sp[i] = 0;
    uint32_t* ctl = (uint32_t*)sp;
    ctl[0] = 0x1f80;  // MXCSR default
    ctl[1] = 0x037f;  // x87 control word default
    f.sp = sp;
    f.state = State::Ready;
}

void yield_to_scheduler() {
    BlockRun& r = *tl_run;
    emu_switch(&r.fibers[r.running].sp, r.sched_sp);
}

uint64_t next_random(uint64_t& s) {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    return s;
}

enum class Order { Shuffle, Forward, Reverse };

Order order_from_env() {
    const char* v = getenv("ELDER_CUDA_EMU_ORDER");
    if (!v || !strcmp(v, "shuffle")) return Order::Shuffle;
    if (!strcmp(v, "forward")) return Order::Forward;
    if (!strcmp(v, "reverse")) return Order::Reverse;
    fprintf(stderr, "cuda-emu: ELDER_CUDA_EMU_ORDER=%s is not forward|reverse|shuffle; using shuffle\n", v);
    return Order::Shuffle;
}

std::atomic<uint64_t> launch_counter{0};

// For the fault handler: what was running when a kernel touched memory it must not.
thread_local const char* tl_kernel_name = nullptr;

struct sigaction previous_segv, previous_bus;

void on_fault(int sig, siginfo_t* info, void* uctx) {
    if (tl_kernel_name && tl_run && tl_run->running >= 0) {
        const BlockRun& r = *tl_run;
        const Index3 t = r.fibers[r.running].tid;
        char msg[512];
        const int n = snprintf(msg, sizeof msg,
                               "cuda-emu: kernel %s, block (%u,%u,%u), thread (%u,%u,%u): invalid memory access at %p "
                               "(out of bounds of a device allocation, or a fiber stack overflow)\n",
                               tl_kernel_name, r.block_idx.x, r.block_idx.y, r.block_idx.z, t.x, t.y, t.z,
                               info->si_addr);
        if (n > 0) (void)!write(2, msg, (size_t)n);
        signal(sig, SIG_DFL);
        return;  // the access repeats and the default action ends the process
    }
    const struct sigaction& prev = sig == SIGSEGV ? previous_segv : previous_bus;
    if (prev.sa_flags & SA_SIGINFO) {
        prev.sa_sigaction(sig, info, uctx);
    } else if (prev.sa_handler != SIG_DFL && prev.sa_handler != SIG_IGN) {
        prev.sa_handler(sig);
    } else {
        signal(sig, SIG_DFL);
    }
}

void install_fault_handler() {
    static std::once_flag once;
    std::call_once(once, [] {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = on_fault;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGSEGV, &sa, &previous_segv);
        sigaction(SIGBUS, &sa, &previous_bus);
    });
}

std::string describe_deadlock(const BlockRun& r) {
    int at_block = 0, at_warp = 0;
    for (int i = 0; i < r.n_threads; ++i) {
        at_block += r.fibers[i].state == State::AtBlockBarrier;
        at_warp += r.fibers[i].state == State::AtWarpBarrier;
    }
    char buf[400];
    snprintf(buf, sizeof buf,
             "deadlock in block (%u,%u,%u): %d threads wait at __syncthreads, %d at a warp shuffle, %d exited "
             "(a barrier or a full-mask shuffle that not every thread of the block/warp reaches)",
             r.block_idx.x, r.block_idx.y, r.block_idx.z, at_block, at_warp, r.done);
    return buf;
}

}  // namespace

void sync_threads() {
    BlockRun& r = *tl_run;
    r.fibers[r.running].state = State::AtBlockBarrier;
    if (++r.at_block_barrier + r.done == r.n_threads) {
        for (int i = 0; i < r.n_threads; ++i)
            if (r.fibers[i].state == State::AtBlockBarrier) r.fibers[i].state = State::Ready;
        r.at_block_barrier = 0;
    }
    yield_to_scheduler();
}

int lane_id() { return tl_run->running & 31; }

static void warp_barrier() {
    BlockRun& r = *tl_run;
    const int warp = r.running >> 5;
    r.fibers[r.running].state = State::AtWarpBarrier;
    if (++r.warp_waiting[warp] == r.warp_lanes[warp]) {
        const int first = warp * 32, last = first + r.warp_lanes[warp];
        for (int i = first; i < last; ++i) r.fibers[i].state = State::Ready;
        r.warp_waiting[warp] = 0;
    }
    yield_to_scheduler();
}

uint64_t warp_shuffle(uint64_t bits, int src_lane) {
    BlockRun& r = *tl_run;
    const int me = r.running, warp = me >> 5;
    r.shuffle_slots[me] = bits;
    warp_barrier();  // every lane has published
    const int src = warp * 32 + src_lane;
    // A lane past the end of a partial warp has no value: the hardware result is undefined; we
    // return the caller's own value.
    const uint64_t got = (src_lane >= 0 && src_lane < r.warp_lanes[warp]) ? r.shuffle_slots[src] : bits;
    warp_barrier();  // every lane has read before anyone publishes again
    return got;
}

void* dynamic_shared() { return tl_run->dyn_smem.data(); }

std::string run_kernel(const KernelEntry& k, Index3 grid, Index3 block, size_t smem, void** params) {
    const uint64_t threads = (uint64_t)block.x * block.y * block.z;
    if (threads == 0 || threads > MAX_THREADS)
        return "block of " + std::to_string(threads) + " threads (must be 1..1024)";
    if (grid.x == 0 || grid.y == 0 || grid.z == 0) return "empty grid";
    if (grid.y > 65535 || grid.z > 65535) return "grid y/z over 65535";
    if (smem > 227 * 1024) return "dynamic shared memory over 227 KiB";
    install_fault_handler();

    BlockRun& r = run_state();
    r.kernel = &k;
    r.params = params;
    r.n_threads = (int)threads;
    r.block_dim = block;
    r.grid_dim = grid;
    if ((int)r.fibers.size() < r.n_threads) r.fibers.resize(r.n_threads);
    const int warps = (r.n_threads + 31) / 32;
    r.warp_waiting.assign(warps, 0);
    r.warp_lanes.assign(warps, 32);
    if (r.n_threads % 32) r.warp_lanes[warps - 1] = r.n_threads % 32;
    r.shuffle_slots.assign(r.n_threads, 0);
    r.dyn_smem.assign(smem + 16, 0xff);  // garbage-like: NaN in every float type
    r.order.resize(r.n_threads);
    for (int i = 0; i < r.n_threads; ++i) {
        r.fibers[i].tid = Index3{(unsigned)(i % block.x), (unsigned)((i / block.x) % block.y),
                                 (unsigned)(i / (block.x * block.y))};
    }
    static const Order order = order_from_env();
    uint64_t seed = (launch_counter.fetch_add(1) + 1) * 0x9E3779B97F4A7C15ull;

    tl_kernel_name = k.name;
    std::string error;
    for (unsigned bz = 0; bz < grid.z && error.empty(); ++bz)
        for (unsigned by = 0; by < grid.y && error.empty(); ++by)
            for (unsigned bx = 0; bx < grid.x && error.empty(); ++bx) {
                r.block_idx = Index3{bx, by, bz};
                r.done = 0;
                r.at_block_barrier = 0;
                std::fill(r.warp_waiting.begin(), r.warp_waiting.end(), 0);
                for (int i = 0; i < r.n_threads; ++i) {
                    prepare_fiber(r.fibers[i]);
                    r.order[i] = order == Order::Reverse ? r.n_threads - 1 - i : i;
                }
                if (order == Order::Shuffle)
                    for (int i = r.n_threads - 1; i > 0; --i)
                        std::swap(r.order[i], r.order[next_random(seed) % (uint64_t)(i + 1)]);
                current.block_idx = r.block_idx;
                current.block_dim = block;
                current.grid_dim = grid;
                while (r.done < r.n_threads) {
                    bool progressed = false;
                    for (int j = 0; j < r.n_threads; ++j) {
                        const int i = r.order[j];
                        if (r.fibers[i].state != State::Ready) continue;
                        r.running = i;
                        current.thread_idx = r.fibers[i].tid;
                        emu_switch(&r.sched_sp, r.fibers[i].sp);
                        progressed = true;
                    }
                    if (!progressed) {
                        error = describe_deadlock(r);
                        break;
                    }
                }
                r.running = -1;
            }
    tl_kernel_name = nullptr;
    return error;
}

}  // namespace emu
