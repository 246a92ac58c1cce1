// The dispatched kernels compiled for one instruction set. CMake (and setup.py) compile this
// file once per variant, with SAPO_DISPATCH_VARIANT naming it and the variant's -m flags:
//   sse2    baseline x86-64
//   avx2    -mavx2 -mfma
//   avx512  -mavx512f -mavx512bw -mavx512dq -mavx512vl -mavx512cd (+ the AVX2 flags)
// Every kernel of the headers lands in the namespace of the instruction set the flags give
// (simd.hpp, SAPO_ISA_NAMESPACE), so the three copies never share a symbol name.
#ifdef SAPO_USE_DISPATCH
#error "the dispatched kernels themselves are compiled without SAPO_USE_DISPATCH"
#endif
#ifndef SAPO_DISPATCH_VARIANT
#error "compile with -DSAPO_DISPATCH_VARIANT=sse2|avx2|avx512 (or native)"
#endif

#include <string_view>

#include "kernel_table.hpp"

#define SAPO_STR_IMPL(x) #x
#define SAPO_STR(x) SAPO_STR_IMPL(x)

namespace sapo {
namespace dispatch {
namespace table {

// The flags must give the variant its instruction set: a mismatch (say, -march=native in
// CMAKE_CXX_FLAGS turning the sse2 object into AVX-512) would run AVX-512 code on CPUs
// that only pass the sse2 check.
static_assert(std::string_view(SAPO_STR(SAPO_DISPATCH_VARIANT)) == "native" ||
                  std::string_view(SAPO_STR(SAPO_DISPATCH_VARIANT)) == SAPO_ISA_NAME,
              "the compile flags of this object give another instruction set than its variant");

inline namespace SAPO_ISA_NAMESPACE {

template <class T, class M, class G>
loss_result loss_entry(const policy_inputs<T, M>& in, const loss_options& options, mat_view<G> grad, int64_t K) {
  return detail::policy_loss_kernel<T, M, G>(in, options, grad, K).run();
}
template <class A, class O>
void broadcast_entry(mat_view<A> adv, mat_view<const int32_t> step, mat_view<O> out, int num_threads) {
  detail::broadcast_own_step_ids(adv, step, out, num_threads);
}
template <class Id, class M>
detail::row_segmentation segment_entry(const detail::sid_rules& rules, int32_t tail_id, int64_t T, const Id* ids,
                                       const M* mask, int32_t* step, vec_view<int64_t> code) {
  return detail::segment_interleaved_row_contiguous(rules, tail_id, T, ids, mask, step, code);
}

// The entry for one types<...> of each list.
template <class X>
struct loss_of;
template <class T, class M, class G>
struct loss_of<types<T, M, G>> {
  static constexpr loss_fn<T, M, G> value = &loss_entry<T, M, G>;
};
template <class X>
struct broadcast_of;
template <class A, class O>
struct broadcast_of<types<A, O>> {
  static constexpr broadcast_fn<A, O> value = &broadcast_entry<A, O>;
};
template <class X>
struct segment_of;
template <class Id, class M>
struct segment_of<types<Id, M>> {
  static constexpr segment_fn<Id, M> value = &segment_entry<Id, M>;
};

template <template <class...> class F, template <class> class Of, class... X>
constexpr auto entries(type_list<X...>) {
  return typename fn_tuple<F, type_list<X...>>::type{Of<X>::value...};
}

}  // namespace SAPO_ISA_NAMESPACE

// Constant-initialized: usable before any dynamic initializer runs.
const kernel_table SAPO_CAT(kernels_, SAPO_DISPATCH_VARIANT){
    isa::SAPO_DISPATCH_VARIANT, entries<loss_fn, loss_of>(loss_types{}),
    entries<broadcast_fn, broadcast_of>(broadcast_types{}), entries<segment_fn, segment_of>(segment_types{})};

}  // namespace table
}  // namespace dispatch
}  // namespace sapo
