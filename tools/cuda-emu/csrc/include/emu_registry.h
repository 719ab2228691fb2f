// Kernel registry: every `extern "C"` kernel of kernels/*.cu registers its name, its address and a
// type-aware invoker that unpacks cuLaunchKernel's `void** params` into a real call.
#pragma once
#include <stddef.h>

#include <type_traits>
#include <utility>

namespace emu {

using Invoker = void (*)(void* fn, void** params);

struct KernelEntry {
    const char* name;
    void* fn;
    Invoker invoke;
    int n_params;
    const size_t* param_sizes;  // for copying a launch's arguments (stream capture)
};

void register_kernel(const KernelEntry& entry);
const KernelEntry* find_kernel(const char* name);

template <typename... A, size_t... I>
void invoke_unpacked(void* fn, void** params, std::index_sequence<I...>) {
    reinterpret_cast<void (*)(A...)>(fn)(*static_cast<std::remove_cv_t<A>*>(params[I])...);
}

template <typename... A>
void invoke(void* fn, void** params) {
    invoke_unpacked<A...>(fn, params, std::index_sequence_for<A...>{});
}

template <typename... A>
int reg(const char* name, void (*fn)(A...)) {
    static const size_t sizes[sizeof...(A) + 1] = {sizeof(A)..., 0};
    register_kernel(KernelEntry{name, reinterpret_cast<void*>(fn), &invoke<A...>, (int)sizeof...(A), sizes});
    return 0;
}

}  // namespace emu
