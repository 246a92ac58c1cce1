/// \file config.hpp
/// \brief Version and the one macro that lets the scalar math run on host and device.
#pragma once

#define SAPO_VERSION_MAJOR 0
#define SAPO_VERSION_MINOR 1
#define SAPO_VERSION_PATCH 0

// The per-token and per-group formulas live once, in inline functions marked
// SAPO_HOST_DEVICE, so the CPU loops and the CUDA kernels share them.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define SAPO_HOST_DEVICE __host__ __device__ inline
#else
#define SAPO_HOST_DEVICE inline
#endif

namespace sapo {
/// Most steps a response may have (SPEC: K <= 64). Fixed so per-row scratch
/// lives on the stack (or in registers on a GPU) instead of the heap.
constexpr int max_steps = 64;
}  // namespace sapo
