/// \file sapo.hpp
/// \brief Umbrella header: everything sapo computes (SPEC.md §1-7).
#pragma once

#include "config.hpp"
#include "error.hpp"
#include "view.hpp"
#include "checks.hpp"
#include "segment.hpp"
#include "rewards.hpp"
#include "advantages.hpp"
#include "pipeline.hpp"
#include "loss_math.hpp"
#include "policy_loss.hpp"
