#pragma once
#include <string>

#include "emu_device.h"
#include "emu_registry.h"

namespace emu {
// Runs a whole launch synchronously; returns an empty string or what went wrong.
std::string run_kernel(const KernelEntry& k, Index3 grid, Index3 block, size_t smem, void** params);
}  // namespace emu
