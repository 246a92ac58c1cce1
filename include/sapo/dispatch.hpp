/// \file dispatch.hpp
/// \brief Runtime instruction-set dispatch of the CPU kernels.
///
/// The headers compile every kernel for the instruction set of the translation unit that
/// includes them (its -march / -m flags): a header-only user who builds with -march=native
/// gets that instruction set directly. Compiled artefacts -- libsapo_torch.so, the Python
/// module sapo_torch._C, the benchmarks -- instead link the static library sapo::dispatch
/// (src/), which holds each kernel compiled three times, for baseline x86-64 (SSE2), for
/// AVX2 + FMA and for AVX-512 (F, BW, DQ, VL, CD), and picks at run time, once, the best the
/// CPU supports. Linking sapo::dispatch defines SAPO_USE_DISPATCH, which makes the entry
/// points (policy_loss, step_advantage_pipeline, segment_steps) call the dispatched kernels
/// for the types listed beside each of them (other types take the direct path).
///
/// The environment variable SAPO_ISA=sse2|avx2|avx512, read at the first kernel call,
/// forces an instruction set (a lower one, for tests or to chase a difference); naming one
/// the CPU lacks, or no known one, is a sapo::error at that call. set_isa() does the same
/// from code.
#pragma once

#include <cstdint>
#include <type_traits>

#include "simd.hpp"

// The namespace of the entry points that pick between the direct and the dispatched path:
// a translation unit that uses dispatch and one that does not may live in one program (a
// -march=native benchmark linking libsapo_torch.so), so their entry points differ in name.
#define SAPO_CAT_IMPL(a, b) a##b
#define SAPO_CAT(a, b) SAPO_CAT_IMPL(a, b)
#ifdef SAPO_USE_DISPATCH
#define SAPO_ENTRY_NAMESPACE SAPO_CAT(SAPO_ISA_NAMESPACE, _dispatched)
#else
#define SAPO_ENTRY_NAMESPACE SAPO_ISA_NAMESPACE
#endif

namespace sapo {
namespace dispatch {

/// The instruction sets the dispatched kernels are compiled for (x86-64); elsewhere the
/// one variant is `native`, the compiler's default for the target.
enum class isa : int {
  sse2 = 0,    ///< baseline x86-64: 4 float lanes
  avx2 = 1,    ///< AVX2 + FMA: 8 float lanes
  avx512 = 2,  ///< AVX-512 F/BW/DQ/VL/CD: 16 float lanes
  native = 3,  ///< non-x86 builds: the target's default
};

/// "sse2", "avx2", "avx512", "native".
const char* isa_name(isa i);
/// Whether this CPU (and the OS, for the wide registers) runs `i`, and the build holds it.
bool isa_supported(isa i);
/// The best instruction set the CPU supports among those compiled in.
isa best_isa();
/// The instruction set the kernels run with: SAPO_ISA if set (checked), else best_isa().
/// Resolved at the first call; throws sapo::error on a bad SAPO_ISA.
isa active_isa();
/// Forces `i` from now on; throws sapo::error naming `isa` if the CPU does not support it.
void set_isa(isa i);
/// Parses "sse2" / "avx2" / "avx512" (as SAPO_ISA is); throws sapo::error naming `what`.
isa parse_isa(const char* text, const char* what);

// ---- type lists: each dispatched kernel lists the argument types it is compiled for ----
template <class... T>
struct types {};
template <class... X>
struct type_list {};
template <class X, class List>
struct contains;
template <class X, class... L>
struct contains<X, type_list<L...>> : std::integral_constant<bool, (std::is_same<X, L>::value || ...)> {};

}  // namespace dispatch
}  // namespace sapo
