// Runtime instruction-set dispatch (include/sapo/dispatch.hpp): finds what the CPU runs,
// reads SAPO_ISA, and forwards each dispatched entry point to the table of the chosen
// instruction set. Compiled for baseline x86-64 (no -m flags), like the code that calls it.
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

#include "kernel_table.hpp"

namespace sapo {
namespace dispatch {
namespace {

using table::kernel_table;

const kernel_table* table_of(isa i) {
#if SAPO_DISPATCH_X86
  switch (i) {
    case isa::sse2: return &table::kernels_sse2;
    case isa::avx2: return &table::kernels_avx2;
    case isa::avx512: return &table::kernels_avx512;
    case isa::native: return nullptr;
  }
  return nullptr;
#else
  return i == isa::native ? &table::kernels_native : nullptr;
#endif
}

bool cpu_runs(isa i) {
#if SAPO_DISPATCH_X86
  // __builtin_cpu_supports also checks that the OS saves the wide registers (XCR0).
  __builtin_cpu_init();
  switch (i) {
    case isa::sse2: return true;
    case isa::avx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case isa::avx512:
      return cpu_runs(isa::avx2) && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512cd");
    case isa::native: return false;
  }
  return false;
#else
  return i == isa::native;
#endif
}

std::string supported_list() {
  std::string s;
  for (isa i : {isa::sse2, isa::avx2, isa::avx512, isa::native})
    if (isa_supported(i)) s += std::string(s.empty() ? "" : ", ") + isa_name(i);
  return s;
}

std::atomic<const kernel_table*>& current() {
  static std::atomic<const kernel_table*> t{nullptr};
  return t;
}

const kernel_table& active_table() {
  const kernel_table* t = current().load(std::memory_order_acquire);
  if (t) return *t;
  const char* env = std::getenv("SAPO_ISA");
  const isa chosen = env && *env ? parse_isa(env, "SAPO_ISA") : best_isa();
  SAPO_CHECK(isa_supported(chosen), "SAPO_ISA", "an instruction set this CPU supports (" << supported_list() << ")",
             env);
  t = table_of(chosen);
  current().store(t, std::memory_order_release);
  return *t;
}

}  // namespace

const char* isa_name(isa i) {
  switch (i) {
    case isa::sse2: return "sse2";
    case isa::avx2: return "avx2";
    case isa::avx512: return "avx512";
    case isa::native: return "native";
  }
  return "unknown";
}

bool isa_supported(isa i) { return table_of(i) != nullptr && cpu_runs(i); }

isa best_isa() {
  for (isa i : {isa::avx512, isa::avx2, isa::sse2, isa::native})
    if (isa_supported(i)) return i;
  return isa::native;
}

isa parse_isa(const char* text, const char* what) {
  const std::string s = text ? text : "";
  for (isa i : {isa::sse2, isa::avx2, isa::avx512, isa::native})
    if (s == isa_name(i) && table_of(i)) return i;
  SAPO_CHECK(false, what, "one of " << supported_list() << " (the instruction sets of this build this CPU runs)",
             "\"" << s << "\"");
  return isa::native;
}

isa active_isa() { return active_table().id; }

void set_isa(isa i) {
  SAPO_CHECK(isa_supported(i), "isa", "an instruction set this CPU supports (" << supported_list() << ")",
             isa_name(i));
  current().store(table_of(i), std::memory_order_release);
}

// ---- the dispatched entry points: one instantiation per entry of each type list ----

template <class T, class M, class G>
loss_result policy_loss_kernel(const policy_inputs<T, M>& in, const loss_options& options, mat_view<G> grad,
                               int64_t K) {
  return std::get<table::loss_fn<T, M, G>>(active_table().loss)(in, options, grad, K);
}

template <class A, class O>
void broadcast_own_step_ids(mat_view<A> adv, mat_view<const int32_t> step, mat_view<O> token_adv, int num_threads) {
  std::get<table::broadcast_fn<A, O>>(active_table().broadcast)(adv, step, token_adv, num_threads);
}

template <class Id, class M>
detail::row_segmentation segment_interleaved_row_contiguous(const detail::sid_rules& rules, int32_t tail_id,
                                                            int64_t T, const Id* ids, const M* mask, int32_t* step,
                                                            vec_view<int64_t> code) {
  return std::get<table::segment_fn<Id, M>>(active_table().segment_row)(rules, tail_id, T, ids, mask, step, code);
}

namespace {
template <class X>
struct instances;
template <class... X>
struct instances<type_list<X...>> {
  template <template <class...> class F, template <class> class Of>
  static constexpr auto make() {
    return typename table::fn_tuple<F, type_list<X...>>::type{Of<X>::value...};
  }
};
template <class X>
struct loss_instance;
template <class T, class M, class G>
struct loss_instance<types<T, M, G>> {
  static constexpr table::loss_fn<T, M, G> value = &policy_loss_kernel<T, M, G>;
};
template <class X>
struct broadcast_instance;
template <class A, class O>
struct broadcast_instance<types<A, O>> {
  static constexpr table::broadcast_fn<A, O> value = &broadcast_own_step_ids<A, O>;
};
template <class X>
struct segment_instance;
template <class Id, class M>
struct segment_instance<types<Id, M>> {
  static constexpr table::segment_fn<Id, M> value = &segment_interleaved_row_contiguous<Id, M>;
};
}  // namespace

// Taking their addresses in a table with external linkage instantiates the entry points for
// every listed type (and keeps the optimizer from dropping them).
extern const table::kernel_table entry_points;
const table::kernel_table entry_points{isa::native, instances<loss_types>::make<table::loss_fn, loss_instance>(),
                                       instances<broadcast_types>::make<table::broadcast_fn, broadcast_instance>(),
                                       instances<segment_types>::make<table::segment_fn, segment_instance>()};

}  // namespace dispatch
}  // namespace sapo
