// The dispatched kernels of one instruction set as a table of function pointers. Each
// src/isa_kernels.cpp object fills one table with the kernels compiled for its instruction
// set; src/dispatch.cpp picks the table at run time. The argument types come from the type
// lists declared beside each entry point (loss_types, broadcast_types, segment_types).
#pragma once

#include <tuple>

#include <sapo/sapo.hpp>

namespace sapo {
namespace dispatch {
namespace table {

template <class T, class M, class G>
using loss_fn = loss_result (*)(const policy_inputs<T, M>&, const loss_options&, mat_view<G>, int64_t);
template <class A, class O>
using broadcast_fn = void (*)(mat_view<A>, mat_view<const int32_t>, mat_view<O>, int);
template <class Id, class M>
using segment_fn = detail::row_segmentation (*)(const detail::sid_rules&, int32_t, int64_t, const Id*, const M*,
                                                int32_t*, vec_view<int64_t>);

/// F<A...> for types<A...>.
template <template <class...> class F, class X>
struct apply;
template <template <class...> class F, class... A>
struct apply<F, types<A...>> {
  using type = F<A...>;
};
/// std::tuple of F<...> for every entry of a type_list.
template <template <class...> class F, class List>
struct fn_tuple;
template <template <class...> class F, class... X>
struct fn_tuple<F, type_list<X...>> {
  using type = std::tuple<typename apply<F, X>::type...>;
};

struct kernel_table {
  isa id;
  typename fn_tuple<loss_fn, loss_types>::type loss;
  typename fn_tuple<broadcast_fn, broadcast_types>::type broadcast;
  typename fn_tuple<segment_fn, segment_types>::type segment_row;
};

// One table per compiled instruction set (src/isa_kernels.cpp, compiled once for each):
// sse2, avx2 and avx512 on x86 with xsimd, else one `native` variant (CMake defines
// SAPO_DISPATCH_NATIVE_ONLY for builds without xsimd).
#if (defined(__x86_64__) || defined(__i386__)) && !defined(SAPO_DISPATCH_NATIVE_ONLY)
#define SAPO_DISPATCH_X86 1
extern const kernel_table kernels_sse2, kernels_avx2, kernels_avx512;
#else
#define SAPO_DISPATCH_X86 0
extern const kernel_table kernels_native;
#endif

}  // namespace table
}  // namespace dispatch
}  // namespace sapo
