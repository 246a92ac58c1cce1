/// \file cuda.cuh
/// \brief The CUDA adapter: every stage of sapo on the GPU, on a caller-given stream, with
/// the scalar formulas shared with the CPU kernels (SAPO_HOST_DEVICE functions of
/// include/sapo). Include it from a .cu file compiled by nvcc (C++17); link sapo::cuda.
///
/// | function                               | CPU twin                           |
/// |----------------------------------------|------------------------------------|
/// | sapo::cuda::segment_steps              | sapo::segment_steps                |
/// | sapo::cuda::step_rewards               | sapo::step_rewards                 |
/// | sapo::cuda::group_advantages           | sapo::group_advantages             |
/// | sapo::cuda::outcome_advantages         | sapo::outcome_advantages           |
/// | sapo::cuda::broadcast_step_advantages  | sapo::broadcast_step_advantages    |
/// | sapo::cuda::broadcast_outcome_advantages | sapo::broadcast_outcome_advantages |
/// | sapo::cuda::policy_loss                | sapo::policy_loss                  |
///
/// Each takes the CPU function's arguments (views of **device** memory, host option structs)
/// plus a `cudaStream_t` and an optional `sapo::cuda::workspace`; see common.cuh and
/// docs/cuda.md for the conventions (device pointers, errors, determinism, workspace).
#pragma once

#include "cuda/common.cuh"
#include "cuda/segment.cuh"
#include "cuda/rewards.cuh"
#include "cuda/advantages.cuh"
#include "cuda/policy_loss.cuh"
