/// \file torch.hpp
/// \brief LibTorch adapter: every sapo stage on `at::Tensor` (new tensors out), the fused
/// policy loss as an autograd function, and the CPU kernels behind the `torch.ops.sapo.*`
/// operators registered by adapters/torch/register_ops.cpp (library target `sapo::torch`).
///
/// \code
///   #include <sapo/torch.hpp>
///   sapo::segment_options seg;  seg.num_steps = 3;  seg.sid_ranges = {{1000, 1768}};
///   auto s   = sapo::libtorch::segment_steps(tokens, mask, seg);            // step (B, T) int32, ...
///   auto r   = sapo::libtorch::step_rewards(s.codes, s.malformed, targets);  // (B, K) float32
///   auto adv = sapo::libtorch::group_advantages(r, /*group_size=*/8);       // adv (B, K), stats (6, K)
///   auto out = sapo::libtorch::policy_loss(logp, old_logp, s.step, adv.adv, mask);
///   out.loss.backward();                                                    // logp.grad() = d loss / d logp
///   double clipped = out.result().clip_frac_high;                            // diagnostics
/// \endcode
///
/// Namespace: sapo::libtorch, not sapo::torch: the latter would make `torch::` ambiguous in
/// any scope with `using namespace sapo;`.
///
/// Calls go through the PyTorch dispatcher (the ops `sapo::*` defined once in
/// libsapo_torch.so), so C++ and Python (`torch.ops.sapo.*`) run the same kernels, and CUDA
/// tensors reach a CUDA kernel when one is registered (see register_ops.cpp). Link
/// `sapo::torch`.
///
/// Dtypes:
///  * floating inputs: float32, float64, bfloat16, float16. The compute type is float64 when
///    the leading input (logp, rewards, adv) is float64, float32 otherwise. An input already
///    in the compute type is viewed in place with its strides (no copy, any strides); any
///    other floating input is converted (one copy). bfloat16 / float16 results and gradients
///    come back in the input dtype; sums run in double in the kernels (the float loss adds blocks of <= 128 tokens in float first).
///  * masks: bool, uint8 (viewed as bytes, no copy), int32, int64, float32, float64; others
///    are converted. Values must be exactly 0 or 1.
///  * step ids: int32 (no copy); other integer types are converted to int32.
///  * token ids, codes, targets, group ids: int64 (int32 token ids too); others converted.
///  * outputs: step int32, n_steps int32, codes int64, malformed bool, statistics float64.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/string_view.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <array>
#include <iterator>
#include <cstdint>
#include <limits>
#include <sstream>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include <sapo/sapo.hpp>

#if defined(__GNUC__)
#define SAPO_TORCH_API __attribute__((visibility("default")))
#else
#define SAPO_TORCH_API
#endif

namespace sapo {
namespace libtorch {

// ---------------------------------------------------------------------------------------
// Operator signatures. The dispatcher ops `sapo::<name>` have these C++ signatures; the
// CPU kernels below implement them, and a CUDA backend registers functions of the same
// types (TORCH_LIBRARY_IMPL(sapo, CUDA, m)). Schemas with defaults: register_ops.cpp.
// ---------------------------------------------------------------------------------------
namespace kernels {
using opt_tensor = c10::optional<at::Tensor>;

/// (step (B, T) int32, n_steps (B) int32, codes (B, K) int64, malformed (B) bool)
using segment_steps_fn = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor& tokens, const at::Tensor& mask, int64_t num_steps, at::IntArrayRef sid_ranges,
    c10::string_view layout, at::IntArrayRef codes_per_level, int64_t think_end_id, bool sid_token_in_step,
    c10::string_view tail, int64_t num_threads);
/// rewards (B, K) in `dtype` (default float32)
using step_rewards_fn = at::Tensor(const at::Tensor& codes, const at::Tensor& malformed, const at::Tensor& targets,
                                   c10::string_view kind, c10::ArrayRef<double> level_weights,
                                   double malformed_reward, c10::optional<at::ScalarType> dtype);
/// (adv (B, K) | (B), stats (6, K) | (6, 1) float64)
using advantages_fn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor& rewards, int64_t group_size,
                                                         const opt_tensor& group_ids, int64_t n_groups,
                                                         c10::string_view norm, bool unbiased_std, double eps,
                                                         c10::string_view singleton);
using mix_advantages_fn = at::Tensor(const at::Tensor& outcome_adv, const at::Tensor& step_adv,
                                     double outcome_weight, double step_weight);
using broadcast_step_advantages_fn = at::Tensor(const at::Tensor& adv, const at::Tensor& step,
                                                const at::Tensor& mask);
using broadcast_outcome_advantages_fn = at::Tensor(const at::Tensor& adv, const at::Tensor& mask);

// The distributed phases (docs/distributed.md). Each returns arrays ready to all-reduce:
// (n_groups + 1, K) per (group, step) plus the whole batch in the last row.
/// (count int64, sum, min, max float64), each (n_groups + 1, K)
using group_partials_fn = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor& rewards, int64_t group_size, const opt_tensor& group_ids, int64_t n_groups, int64_t first_row);
/// sq_dev (n_groups + 1, K) float64 from the reduced count and sum
using group_deviations_fn = at::Tensor(const at::Tensor& rewards, int64_t group_size, const opt_tensor& group_ids,
                                       int64_t n_groups, const at::Tensor& count, const at::Tensor& sum,
                                       int64_t first_row);
/// (adv (B, K) in the rewards' dtype, stats (6, K) float64 with a local advantage_std,
///  advantage_sums (2, K) float64: sum A, sum A^2 over the present local rows)
using finalize_group_advantages_fn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor& rewards, int64_t group_size, const opt_tensor& group_ids, int64_t n_groups,
    const at::Tensor& count, const at::Tensor& sum, const at::Tensor& min, const at::Tensor& max,
    const at::Tensor& sq_dev, int64_t first_row, c10::string_view norm, bool unbiased_std, double eps,
    c10::string_view singleton);
/// stats (6, K) with advantage_std from the reduced advantage_sums (2, K)
using finish_advantage_std_fn = at::Tensor(const at::Tensor& stats, const at::Tensor& advantage_sums);
/// (4) int64: tokens, sequences, steps, rows (sapo::loss_counts)
using loss_counts_fn = at::Tensor(const at::Tensor& mask, const opt_tensor& step);

#define SAPO_TORCH_LOSS_ARGS                                                                                     \
  const at::Tensor &logp, const at::Tensor &old_logp, const at::Tensor &mask, const opt_tensor &token_advantages, \
      const opt_tensor &step_advantages, const opt_tensor &step, const opt_tensor &ref_logp,                       \
      c10::string_view ratio, double clip_low, double clip_high, bool dual_clip, double dual_clip_c,              \
      double kl_coef, c10::string_view kl, c10::string_view agg, double max_response_length,                      \
      double global_tokens, double global_sequences, double global_steps, c10::string_view nonfinite,             \
      int64_t num_threads
/// Backend kernel, no autograd: (loss () in logp's dtype, grad = d loss / d logp (B, T) in
/// logp's dtype, diagnostics (13) float64).
using policy_loss_fwd_fn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(SAPO_TORCH_LOSS_ARGS);
/// Autograd-aware op (CompositeImplicitAutograd): (loss, diagnostics); loss is
/// differentiable with respect to logp.
using policy_loss_fn = std::tuple<at::Tensor, at::Tensor>(SAPO_TORCH_LOSS_ARGS);
}  // namespace kernels

/// Order of the entries of the float64 diagnostics tensor returned with the loss.
inline constexpr std::array<const char*, 13> loss_diagnostic_names = {
    "loss",          "clip_frac_low",    "clip_frac_high", "clip_frac_dual", "ratio_mean",
    "ratio_max",     "approx_kl_old",    "approx_kl_old_k3", "kl_ref",       "n_tokens",
    "n_sequences",   "n_steps",          "n_nonfinite_masked"};
/// Order of the rows of the (6, K) float64 statistics tensor of the advantage stage.
inline constexpr std::array<const char*, 6> advantage_stat_names = {
    "mean_reward", "zero_variance_fraction", "advantage_std", "n_present", "n_zero_variance", "n_pairs"};

// ---------------------------------------------------------------------------------------
// Option names (the string arguments of the ops). Index = enumerator value.
// ---------------------------------------------------------------------------------------
/// The CPU kernels (below); the CUDA backend lives in adapters/torch/cuda_ops.cu.
struct cpu_backend;

namespace detail {
inline constexpr const char* ratio_names[] = {"token", "step", "sequence"};
inline constexpr const char* kl_names[] = {"k1", "k2", "k3"};
inline constexpr const char* agg_names[] = {"token_mean", "seq_mean_token_mean", "seq_mean_token_sum",
                                            "seq_mean_token_sum_norm", "step_mean"};
inline constexpr const char* nonfinite_names[] = {"error", "mask"};
inline constexpr const char* layout_names[] = {"interleaved", "think_then_sid"};
inline constexpr const char* tail_names[] = {"no_step", "last_step"};
inline constexpr const char* reward_names[] = {"per_level", "prefix", "weighted_prefix", "exact"};
inline constexpr const char* norm_names[] = {"std", "std_floor", "none", "loo", "batch_std"};
inline constexpr const char* singleton_names[] = {"zero", "raw"};

template <class E, size_t N>
E parse_enum(c10::string_view s, const char* arg, const char* const (&names)[N]) {
  for (size_t i = 0; i < N; ++i)
    if (s == c10::string_view(names[i])) return static_cast<E>(i);
  std::string allowed;
  for (size_t i = 0; i < N; ++i) allowed += (i ? ", '" : "'") + std::string(names[i]) + "'";
  TORCH_CHECK(false, arg, " must be one of ", allowed, ", got '", std::string(s.data(), s.size()), "'");
  return static_cast<E>(0);  // unreachable
}

template <class E, size_t N>
const char* enum_name(E e, const char* const (&names)[N]) {
  const auto i = static_cast<size_t>(e);
  return i < N ? names[i] : "<invalid enumerator>";
}

// ---------------------------------------------------------------------------------------
// Checks with messages that name the tensor, the expected and the actual shape / dtype.
// ---------------------------------------------------------------------------------------
inline std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kBFloat16: return "bfloat16";
    case at::kHalf: return "float16";
    case at::kBool: return "bool";
    case at::kByte: return "uint8";
    case at::kChar: return "int8";
    case at::kShort: return "int16";
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    default: return c10::toString(t);
  }
}

inline std::string shape_str(at::IntArrayRef s) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << ")";
  return os.str();
}

/// Defined, dense, and on the backend's device (Backend: cpu_backend, or the CUDA backend of
/// adapters/torch/cuda_ops.cu).
template <class Backend = cpu_backend>
void check_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), name, " must be a tensor, got an undefined tensor");
  TORCH_CHECK(t.layout() == at::kStrided, name, " must be a dense (strided) tensor, got layout ", t.layout());
  Backend::check_device(t, name);
}

/// t is 2-D with exactly (rows, cols); `dims` names them, e.g. "(B, T)".
template <class Backend = cpu_backend>
void check_shape(const at::Tensor& t, const char* name, const char* dims, int64_t rows, int64_t cols) {
  check_tensor<Backend>(t, name);
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, name, " must have shape ", dims, " = (", rows,
              ", ", cols, "), got ", shape_str(t.sizes()));
}
template <class Backend = cpu_backend>
void check_shape(const at::Tensor& t, const char* name, const char* dims, int64_t n) {
  check_tensor<Backend>(t, name);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, name, " must have shape ", dims, " = (", n, "), got ",
              shape_str(t.sizes()));
}
/// t is 2-D (the leading tensor of a call, which defines B and T or K).
template <class Backend = cpu_backend>
void check_matrix(const at::Tensor& t, const char* name, const char* dims) {
  check_tensor<Backend>(t, name);
  TORCH_CHECK(t.dim() == 2, name, " must be a 2-D tensor ", dims, ", got shape ", shape_str(t.sizes()));
}
template <class Backend = cpu_backend>
void check_vector(const at::Tensor& t, const char* name, const char* dims) {
  check_tensor<Backend>(t, name);
  TORCH_CHECK(t.dim() == 1, name, " must be a 1-D tensor ", dims, ", got shape ", shape_str(t.sizes()));
}

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}
inline bool is_int_dtype(at::ScalarType t) {
  return t == at::kByte || t == at::kChar || t == at::kShort || t == at::kInt || t == at::kLong;
}
inline void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(is_float_dtype(t.scalar_type()), name,
              " must have a floating dtype (float32, float64, bfloat16 or float16), got ", dtype_name(t.scalar_type()));
}
inline void check_int(const at::Tensor& t, const char* name) {
  TORCH_CHECK(is_int_dtype(t.scalar_type()), name, " must have an integer dtype (int64 or int32), got ",
              dtype_name(t.scalar_type()));
}
inline void check_mask_dtype(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kBool || is_int_dtype(t.scalar_type()) || is_float_dtype(t.scalar_type()), name,
              " must be a bool, integer or floating tensor of 0/1 values, got ", dtype_name(t.scalar_type()));
}

/// The compute type for a leading floating input: float64 stays float64, the rest run in float32.
inline at::ScalarType compute_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

/// t in dtype c: t itself when it already is (a view, no copy), else a converted copy.
inline at::Tensor as_dtype(const at::Tensor& t, at::ScalarType c) { return t.scalar_type() == c ? t : t.to(c); }

/// A mask in one of the kernel's mask types: bool / uint8 (bytes), int32, int64, float32, float64.
inline at::Tensor mask_for_kernel(const at::Tensor& m) {
  switch (m.scalar_type()) {
    case at::kBool:
    case at::kByte:
    case at::kInt:
    case at::kLong:
    case at::kFloat:
    case at::kDouble: return m;
    default: return m.to(at::kFloat);  // int8, int16, bfloat16, float16: exact for 0 and 1
  }
}

/// Step ids as int32. int64 ids are clamped to [-2, INT32_MAX] first, which keeps every
/// invalid id invalid (the kernels accept -1 .. K-1 only).
inline at::Tensor step_for_kernel(const at::Tensor& s) {
  if (s.scalar_type() == at::kInt) return s;
  return s.clamp(-2, std::numeric_limits<int32_t>::max()).to(at::kInt);
}

// ---------------------------------------------------------------------------------------
// sapo views over tensor storage: data_ptr + sizes + strides (in elements), no copy.
// ---------------------------------------------------------------------------------------
// A tensor with no elements may have a null data pointer, which sapo reads as "argument
// absent" (policy_inputs): such views point at a dummy element instead (never accessed).
template <class T>
T* data_of(const at::Tensor& t) {
  static std::remove_const_t<T> dummy{};
  void* p = t.data_ptr();
  return p != nullptr ? static_cast<T*>(p) : &dummy;
}
template <class T>
mat_view<T> mat(const at::Tensor& t) {
  return {data_of<T>(t), t.size(0), t.size(1), t.stride(0), t.stride(1)};
}
template <class T>
vec_view<T> vec(const at::Tensor& t) {
  return {data_of<T>(t), t.size(0), t.stride(0)};
}

/// f(view) with a mat_view<const M> of a mask already in a kernel mask type.
template <class F>
decltype(auto) visit_mask(const at::Tensor& m, F&& f) {
  switch (m.scalar_type()) {
    case at::kBool:
    case at::kByte: return f(mat<const uint8_t>(m));
    case at::kInt: return f(mat<const int32_t>(m));
    case at::kLong: return f(mat<const int64_t>(m));
    case at::kFloat: return f(mat<const float>(m));
    default: return f(mat<const double>(m));
  }
}

/// Runs a sapo kernel; a sapo::error becomes a c10::Error with the kernel's message.
template <class F>
auto call_kernel(F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const sapo::error& e) {
    TORCH_CHECK(false, e.what());
    throw;  // unreachable
  }
}

/// Worker threads for the kernels: 0 follows torch (at::get_num_threads()).
inline int threads(int64_t requested) {
  return requested > 0 ? static_cast<int>(requested) : at::get_num_threads();
}

inline at::TensorOptions cpu(at::ScalarType t) { return at::TensorOptions().dtype(t).device(at::kCPU); }

inline at::Tensor advantage_stats_tensor(const advantage_stats& s, int64_t K) {
  at::Tensor out = at::empty({6, K}, cpu(at::kDouble));
  double* p = out.data_ptr<double>();
  for (int64_t k = 0; k < K; ++k) {
    const auto j = static_cast<size_t>(k);
    p[0 * K + k] = s.mean_reward[j];
    p[1 * K + k] = s.zero_variance_fraction[j];
    p[2 * K + k] = s.advantage_std[j];
    p[3 * K + k] = static_cast<double>(s.n_present[j]);
    p[4 * K + k] = static_cast<double>(s.n_zero_variance[j]);
    p[5 * K + k] = static_cast<double>(s.n_pairs[j]);
  }
  return out;
}

/// The registered operator `name` (e.g. "sapo::policy_loss"). Defined in register_ops.cpp,
/// so code that calls the ops links libsapo_torch.so, whose static initializers register them.
SAPO_TORCH_API c10::OperatorHandle find_op(const char* name);
}  // namespace detail

// ---------------------------------------------------------------------------------------
// CPU kernels of the ops (what TORCH_LIBRARY_IMPL(sapo, CPU, m) registers). They can be
// called directly, but the functions at the end of this file (through the dispatcher) are
// the C++ API.
// ---------------------------------------------------------------------------------------
/// The CPU kernels of the ops: the sapo:: functions on host memory. The functions of
/// namespace impl take the backend as a template argument, so the CUDA backend
/// (adapters/torch/cuda_ops.cu) shares every check, conversion and output allocation.
struct cpu_backend {
  static void check_device(const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor for the CPU kernel, got device ", t.device());
  }
  // A user-provided destructor, as the CUDA backend's guard has: without it every kernel's
  // `const auto device_guard = Backend::guard(...)` warns "set but not used" on the CPU.
  struct no_guard {
    ~no_guard() {}
  };
  static no_guard guard(const at::Tensor&) { return {}; }
  template <class... A>
  static auto segment_steps(A&&... a) { return sapo::segment_steps(std::forward<A>(a)...); }
  template <class... A>
  static auto step_rewards(A&&... a) { return sapo::step_rewards(std::forward<A>(a)...); }
  template <class... A>
  static auto group_advantages(A&&... a) { return sapo::group_advantages(std::forward<A>(a)...); }
  template <class... A>
  static auto outcome_advantages(A&&... a) { return sapo::outcome_advantages(std::forward<A>(a)...); }
  template <class... A>
  static auto mix_advantages(A&&... a) { return sapo::mix_advantages(std::forward<A>(a)...); }
  template <class... A>
  static auto broadcast_step_advantages(A&&... a) { return sapo::broadcast_step_advantages(std::forward<A>(a)...); }
  template <class... A>
  static auto broadcast_outcome_advantages(A&&... a) {
    return sapo::broadcast_outcome_advantages(std::forward<A>(a)...);
  }
  template <class... A>
  static auto policy_loss(A&&... a) { return sapo::policy_loss(std::forward<A>(a)...); }
  template <class... A>
  static auto local_group_partials(A&&... a) { return sapo::local_group_partials(std::forward<A>(a)...); }
  template <class... A>
  static void local_group_deviations(A&&... a) { sapo::local_group_deviations(std::forward<A>(a)...); }
  template <class... A>
  static auto finalize_group_advantages(A&&... a) { return sapo::finalize_group_advantages(std::forward<A>(a)...); }
  template <class... A>
  static void finish_advantage_std(A&&... a) { sapo::finish_advantage_std(std::forward<A>(a)...); }
  template <class... A>
  static auto count_loss_normalizers(A&&... a) { return sapo::count_loss_normalizers(std::forward<A>(a)...); }
};

namespace impl {

template <class Backend = cpu_backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> segment_steps(
    const at::Tensor& tokens, const at::Tensor& mask, int64_t num_steps, at::IntArrayRef sid_ranges,
    c10::string_view layout, at::IntArrayRef codes_per_level, int64_t think_end_id, bool sid_token_in_step,
    c10::string_view tail, int64_t num_threads) {
  const auto device_guard = Backend::guard(tokens);
  detail::check_matrix<Backend>(tokens, "tokens", "(B, T)");
  detail::check_int(tokens, "tokens");
  const int64_t B = tokens.size(0), T = tokens.size(1);
  detail::check_shape<Backend>(mask, "mask", "(B, T)", B, T);
  detail::check_mask_dtype(mask, "mask");
  TORCH_CHECK(num_steps >= 1 && num_steps <= max_steps, "num_steps must be a number of steps K in [1, ", max_steps,
              "], got ", num_steps);
  TORCH_CHECK(sid_ranges.size() % 2 == 0,
              "sid_ranges must be a flat list of [lo, hi) pairs (an even number of ids), got ", sid_ranges.size(),
              " ids");
  segment_options o;
  o.num_steps = num_steps;
  o.layout = detail::parse_enum<step_layout>(layout, "layout", detail::layout_names);
  for (size_t j = 0; j < sid_ranges.size(); j += 2) o.sid_ranges.push_back({sid_ranges[j], sid_ranges[j + 1]});
  o.codes_per_level.assign(codes_per_level.begin(), codes_per_level.end());
  o.think_end_id = think_end_id;
  o.sid_token_in_step = sid_token_in_step;
  o.tail = detail::parse_enum<tail_policy>(tail, "tail", detail::tail_names);
  o.num_threads = detail::threads(num_threads);

  at::Tensor step = at::empty({B, T}, tokens.options().dtype(at::kInt));
  at::Tensor n_steps = at::empty({B}, tokens.options().dtype(at::kInt));
  at::Tensor codes = at::empty({B, num_steps}, tokens.options().dtype(at::kLong));
  at::Tensor malformed = at::empty({B}, tokens.options().dtype(at::kBool));
  const segment_outputs out{detail::mat<int32_t>(step), detail::vec<int32_t>(n_steps), detail::mat<int64_t>(codes),
                            detail::vec<uint8_t>(malformed)};
  const at::Tensor ids = tokens.scalar_type() == at::kInt ? tokens : detail::as_dtype(tokens, at::kLong);
  const at::Tensor m = detail::mask_for_kernel(mask);
  detail::visit_mask(m, [&](auto mv) {
    detail::call_kernel([&] {
      if (ids.scalar_type() == at::kInt)
        Backend::segment_steps(detail::mat<const int32_t>(ids), mv, o, out);
      else
        Backend::segment_steps(detail::mat<const int64_t>(ids), mv, o, out);
    });
  });
  return {step, n_steps, codes, malformed};
}

template <class Backend = cpu_backend>
at::Tensor step_rewards(const at::Tensor& codes, const at::Tensor& malformed, const at::Tensor& targets,
                               c10::string_view kind, c10::ArrayRef<double> level_weights, double malformed_reward,
                               c10::optional<at::ScalarType> dtype) {
  const auto device_guard = Backend::guard(codes);
  detail::check_matrix<Backend>(codes, "codes", "(B, K)");
  detail::check_int(codes, "codes");
  const int64_t B = codes.size(0), K = codes.size(1);
  detail::check_shape<Backend>(malformed, "malformed", "(B)", B);
  TORCH_CHECK(malformed.scalar_type() == at::kBool || detail::is_int_dtype(malformed.scalar_type()),
              "malformed must be a bool or integer tensor, got ", detail::dtype_name(malformed.scalar_type()));
  detail::check_shape<Backend>(targets, "targets", "(B, K)", B, K);
  detail::check_int(targets, "targets");
  const at::ScalarType out_t = dtype.value_or(at::kFloat);
  TORCH_CHECK(detail::is_float_dtype(out_t), "dtype must be float32, float64, bfloat16 or float16, got ",
              detail::dtype_name(out_t));
  reward_options o;
  o.kind = detail::parse_enum<reward_kind>(kind, "kind", detail::reward_names);
  o.level_weights.assign(level_weights.begin(), level_weights.end());
  o.malformed_reward = malformed_reward;

  const at::ScalarType ct = detail::compute_type(out_t);
  at::Tensor rewards = at::empty({B, K}, codes.options().dtype(ct));
  const at::Tensor c = detail::as_dtype(codes, at::kLong), y = detail::as_dtype(targets, at::kLong);
  const bool bytes = malformed.scalar_type() == at::kBool || malformed.scalar_type() == at::kByte;
  const at::Tensor f = bytes ? malformed : malformed.to(at::kLong);
  detail::call_kernel([&] {
    auto run = [&](auto flags) {
      if (ct == at::kDouble)
        Backend::step_rewards(detail::mat<const int64_t>(c), flags, detail::mat<const int64_t>(y), o,
                           detail::mat<double>(rewards));
      else
        Backend::step_rewards(detail::mat<const int64_t>(c), flags, detail::mat<const int64_t>(y), o,
                           detail::mat<float>(rewards));
    };
    if (bytes)
      run(detail::vec<const uint8_t>(f));
    else
      run(detail::vec<const int64_t>(f));
  });
  return out_t == ct ? rewards : rewards.to(out_t);
}

namespace detail_adv {
inline advantage_options options(c10::string_view norm, bool unbiased_std, double eps, c10::string_view singleton) {
  advantage_options o;
  o.norm = detail::parse_enum<normalization>(norm, "norm", detail::norm_names);
  o.unbiased_std = unbiased_std;
  o.eps = eps;
  o.singleton = detail::parse_enum<singleton_policy>(singleton, "singleton", detail::singleton_names);
  return o;
}

/// The group layout and the int64 ids tensor it points into (kept alive by the caller).
template <class Backend>
group_layout layout(int64_t B, int64_t group_size, const c10::optional<at::Tensor>& group_ids,
                           int64_t n_groups, at::Tensor& ids_keepalive) {
  if (!group_ids.has_value() || !group_ids->defined()) return group_layout::contiguous(group_size);
  TORCH_CHECK(group_size == 0, "give either group_size or group_ids, not both (group_size = ", group_size, ")");
  detail::check_shape<Backend>(*group_ids, "group_ids", "(B)", B);
  detail::check_int(*group_ids, "group_ids");
  ids_keepalive = detail::as_dtype(*group_ids, at::kLong);
  return group_layout::explicit_ids(detail::vec<const int64_t>(ids_keepalive), n_groups);
}
}  // namespace detail_adv

template <class Backend = cpu_backend>
std::tuple<at::Tensor, at::Tensor> group_advantages(const at::Tensor& rewards, int64_t group_size,
                                                           const c10::optional<at::Tensor>& group_ids,
                                                           int64_t n_groups, c10::string_view norm,
                                                           bool unbiased_std, double eps,
                                                           c10::string_view singleton) {
  const auto device_guard = Backend::guard(rewards);
  detail::check_matrix<Backend>(rewards, "rewards", "(B, K)");
  detail::check_float(rewards, "rewards");
  const int64_t B = rewards.size(0), K = rewards.size(1);
  TORCH_CHECK(K >= 1 && K <= max_steps, "rewards must have K in [1, ", max_steps, "] columns, got shape ",
              detail::shape_str(rewards.sizes()));
  const advantage_options o = detail_adv::options(norm, unbiased_std, eps, singleton);
  at::Tensor ids;
  const group_layout g = detail_adv::layout<Backend>(B, group_size, group_ids, n_groups, ids);
  const at::ScalarType ct = detail::compute_type(rewards.scalar_type());
  const at::Tensor r = detail::as_dtype(rewards, ct);
  at::Tensor adv = at::empty({B, K}, rewards.options().dtype(ct));
  const advantage_stats s = detail::call_kernel([&] {
    return ct == at::kDouble
               ? Backend::group_advantages(detail::mat<const double>(r), g, o, detail::mat<double>(adv))
               : Backend::group_advantages(detail::mat<const float>(r), g, o, detail::mat<float>(adv));
  });
  return {detail::as_dtype(adv, rewards.scalar_type()), detail::advantage_stats_tensor(s, K).to(rewards.device())};
}

template <class Backend = cpu_backend>
std::tuple<at::Tensor, at::Tensor> outcome_advantages(const at::Tensor& rewards, int64_t group_size,
                                                             const c10::optional<at::Tensor>& group_ids,
                                                             int64_t n_groups, c10::string_view norm,
                                                             bool unbiased_std, double eps,
                                                             c10::string_view singleton) {
  const auto device_guard = Backend::guard(rewards);
  detail::check_vector<Backend>(rewards, "rewards", "(B)");
  detail::check_float(rewards, "rewards");
  const int64_t B = rewards.size(0);
  const advantage_options o = detail_adv::options(norm, unbiased_std, eps, singleton);
  at::Tensor ids;
  const group_layout g = detail_adv::layout<Backend>(B, group_size, group_ids, n_groups, ids);
  const at::ScalarType ct = detail::compute_type(rewards.scalar_type());
  const at::Tensor r = detail::as_dtype(rewards, ct);
  at::Tensor adv = at::empty({B}, rewards.options().dtype(ct));
  const advantage_stats s = detail::call_kernel([&] {
    return ct == at::kDouble
               ? Backend::outcome_advantages(detail::vec<const double>(r), g, o, detail::vec<double>(adv))
               : Backend::outcome_advantages(detail::vec<const float>(r), g, o, detail::vec<float>(adv));
  });
  return {detail::as_dtype(adv, rewards.scalar_type()), detail::advantage_stats_tensor(s, 1).to(rewards.device())};
}

template <class Backend = cpu_backend>
at::Tensor mix_advantages(const at::Tensor& outcome_adv, const at::Tensor& step_adv, double outcome_weight,
                                 double step_weight) {
  const auto device_guard = Backend::guard(step_adv);
  detail::check_matrix<Backend>(step_adv, "step_adv", "(B, K)");
  detail::check_float(step_adv, "step_adv");
  const int64_t B = step_adv.size(0), K = step_adv.size(1);
  detail::check_shape<Backend>(outcome_adv, "outcome_adv", "(B)", B);
  detail::check_float(outcome_adv, "outcome_adv");
  const at::ScalarType ct = detail::compute_type(step_adv.scalar_type());
  const at::Tensor s = detail::as_dtype(step_adv, ct), a = detail::as_dtype(outcome_adv, ct);
  at::Tensor out = at::empty({B, K}, step_adv.options().dtype(ct));
  const mix_weights w{outcome_weight, step_weight};
  detail::call_kernel([&] {
    if (ct == at::kDouble)
      Backend::mix_advantages(detail::vec<const double>(a), detail::mat<const double>(s), w, detail::mat<double>(out));
    else
      Backend::mix_advantages(detail::vec<const float>(a), detail::mat<const float>(s), w, detail::mat<float>(out));
  });
  return detail::as_dtype(out, step_adv.scalar_type());
}

template <class Backend = cpu_backend>
at::Tensor broadcast_step_advantages(const at::Tensor& adv, const at::Tensor& step, const at::Tensor& mask) {
  const auto device_guard = Backend::guard(step);
  detail::check_matrix<Backend>(step, "step", "(B, T)");
  detail::check_int(step, "step");
  const int64_t B = step.size(0), T = step.size(1);
  detail::check_matrix<Backend>(adv, "adv", "(B, K)");
  TORCH_CHECK(adv.size(0) == B, "adv must have shape (B, K) with B = ", B, ", got ", detail::shape_str(adv.sizes()));
  detail::check_float(adv, "adv");
  detail::check_shape<Backend>(mask, "mask", "(B, T)", B, T);
  detail::check_mask_dtype(mask, "mask");
  const at::ScalarType ct = detail::compute_type(adv.scalar_type());
  const at::Tensor a = detail::as_dtype(adv, ct), s = detail::step_for_kernel(step), m = detail::mask_for_kernel(mask);
  at::Tensor out = at::empty({B, T}, step.options().dtype(ct));
  detail::visit_mask(m, [&](auto mv) {
    detail::call_kernel([&] {
      if (ct == at::kDouble)
        Backend::broadcast_step_advantages(detail::mat<const double>(a), detail::mat<const int32_t>(s), mv,
                                        detail::mat<double>(out));
      else
        Backend::broadcast_step_advantages(detail::mat<const float>(a), detail::mat<const int32_t>(s), mv,
                                        detail::mat<float>(out));
    });
  });
  return detail::as_dtype(out, adv.scalar_type());
}

template <class Backend = cpu_backend>
at::Tensor broadcast_outcome_advantages(const at::Tensor& adv, const at::Tensor& mask) {
  const auto device_guard = Backend::guard(mask);
  detail::check_matrix<Backend>(mask, "mask", "(B, T)");
  detail::check_mask_dtype(mask, "mask");
  const int64_t B = mask.size(0), T = mask.size(1);
  detail::check_shape<Backend>(adv, "adv", "(B)", B);
  detail::check_float(adv, "adv");
  const at::ScalarType ct = detail::compute_type(adv.scalar_type());
  const at::Tensor a = detail::as_dtype(adv, ct), m = detail::mask_for_kernel(mask);
  at::Tensor out = at::empty({B, T}, mask.options().dtype(ct));
  detail::visit_mask(m, [&](auto mv) {
    detail::call_kernel([&] {
      if (ct == at::kDouble)
        Backend::broadcast_outcome_advantages(detail::vec<const double>(a), mv, detail::mat<double>(out));
      else
        Backend::broadcast_outcome_advantages(detail::vec<const float>(a), mv, detail::mat<float>(out));
    });
  });
  return detail::as_dtype(out, adv.scalar_type());
}

namespace detail_loss {
/// The fused kernel on views of the prepared tensors (all in compute type T; mask in T or bytes).
template <class Backend, class T>
loss_result run(const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& mask, const at::Tensor& tok,
                const at::Tensor& stp_adv, const at::Tensor& stp, const at::Tensor& ref, const loss_options& o,
                at::Tensor& grad) {
  auto fill = [&](auto& in) {
    in.logp = detail::mat<const T>(logp);
    in.old_logp = detail::mat<const T>(old_logp);
    if (ref.defined()) in.ref_logp = detail::mat<const T>(ref);
    if (tok.defined()) in.token_advantages = detail::mat<const T>(tok);
    if (stp_adv.defined()) in.step_advantages = detail::mat<const T>(stp_adv);
    if (stp.defined()) in.step = detail::mat<const int32_t>(stp);
  };
  if (mask.scalar_type() == at::kBool || mask.scalar_type() == at::kByte) {
    policy_inputs<T, uint8_t> in;
    fill(in);
    in.mask = detail::mat<const uint8_t>(mask);
    return detail::call_kernel([&] { return Backend::policy_loss(in, o, detail::mat<T>(grad)); });
  }
  policy_inputs<T> in;
  fill(in);
  in.mask = detail::mat<const T>(mask);
  return detail::call_kernel([&] { return Backend::policy_loss(in, o, detail::mat<T>(grad)); });
}
}  // namespace detail_loss

/// Parses the string / number arguments of the loss ops into loss_options.
inline loss_options make_loss_options(c10::string_view ratio, double clip_low, double clip_high, bool dual_clip,
                                      double dual_clip_c, double kl_coef, c10::string_view kl, c10::string_view agg,
                                      double max_response_length, double global_tokens, double global_sequences,
                                      double global_steps, c10::string_view nonfinite, int64_t num_threads) {
  loss_options o;
  o.ratio = detail::parse_enum<ratio_level>(ratio, "ratio", detail::ratio_names);
  o.clip_low = clip_low;
  o.clip_high = clip_high;
  o.dual_clip = dual_clip;
  o.dual_clip_c = dual_clip_c;
  o.kl_coef = kl_coef;
  o.kl = detail::parse_enum<kl_estimator>(kl, "kl", detail::kl_names);
  o.agg = detail::parse_enum<aggregation>(agg, "agg", detail::agg_names);
  o.max_response_length = max_response_length;
  o.global_tokens = global_tokens;
  o.global_sequences = global_sequences;
  o.global_steps = global_steps;
  o.nonfinite = detail::parse_enum<nonfinite_policy>(nonfinite, "nonfinite", detail::nonfinite_names);
  TORCH_CHECK(num_threads >= 0 && num_threads <= std::numeric_limits<int>::max(),
              "num_threads must be >= 0 (0 = torch's intra-op thread count), got ", num_threads);
  o.num_threads = static_cast<int>(num_threads);
  return o;
}

using kernels::opt_tensor;

template <class Backend = cpu_backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor> policy_loss_fwd(SAPO_TORCH_LOSS_ARGS) {
  loss_options o = make_loss_options(ratio, clip_low, clip_high, dual_clip, dual_clip_c, kl_coef, kl, agg,
                                     max_response_length, global_tokens, global_sequences, global_steps, nonfinite,
                                     num_threads);
  o.num_threads = detail::threads(num_threads);
  const auto device_guard = Backend::guard(logp);
  detail::check_matrix<Backend>(logp, "logp", "(B, T)");
  detail::check_float(logp, "logp");
  const int64_t B = logp.size(0), T = logp.size(1);
  detail::check_shape<Backend>(old_logp, "old_logp", "(B, T)", B, T);
  detail::check_float(old_logp, "old_logp");
  detail::check_shape<Backend>(mask, "mask", "(B, T)", B, T);
  detail::check_mask_dtype(mask, "mask");
  auto given = [](const opt_tensor& t) { return t.has_value() && t->defined(); };
  const bool by_token = given(token_advantages), by_step = given(step_advantages);
  TORCH_CHECK(by_token != by_step, "give exactly one of token_advantages (B, T) and step_advantages (B, K), got ",
              by_token ? "both" : "neither");
  if (by_token) {
    detail::check_shape<Backend>(*token_advantages, "token_advantages", "(B, T)", B, T);
    detail::check_float(*token_advantages, "token_advantages");
  } else {
    detail::check_matrix<Backend>(*step_advantages, "step_advantages", "(B, K)");
    TORCH_CHECK(step_advantages->size(0) == B, "step_advantages must have shape (B, K) with B = ", B, ", got ",
                detail::shape_str(step_advantages->sizes()));
    detail::check_float(*step_advantages, "step_advantages");
  }
  if (given(step)) {
    detail::check_shape<Backend>(*step, "step", "(B, T)", B, T);
    detail::check_int(*step, "step");
  }
  if (given(ref_logp)) {
    detail::check_shape<Backend>(*ref_logp, "ref_logp", "(B, T)", B, T);
    detail::check_float(*ref_logp, "ref_logp");
  }

  const at::ScalarType out_t = logp.scalar_type(), ct = detail::compute_type(out_t);
  const at::Tensor lp = detail::as_dtype(logp, ct), old = detail::as_dtype(old_logp, ct);
  const at::Tensor ref = given(ref_logp) ? detail::as_dtype(*ref_logp, ct) : at::Tensor();
  const at::Tensor tok = by_token ? detail::as_dtype(*token_advantages, ct) : at::Tensor();
  const at::Tensor sa = by_step ? detail::as_dtype(*step_advantages, ct) : at::Tensor();
  const at::Tensor st = given(step) ? detail::step_for_kernel(*step) : at::Tensor();
  const at::ScalarType mt = mask.scalar_type();
  const at::Tensor m = (mt == at::kBool || mt == at::kByte) ? mask : detail::as_dtype(mask, ct);

  at::Tensor grad = at::empty({B, T}, logp.options().dtype(ct));
  const loss_result r = ct == at::kDouble ? detail_loss::run<Backend, double>(lp, old, m, tok, sa, st, ref, o, grad)
                                          : detail_loss::run<Backend, float>(lp, old, m, tok, sa, st, ref, o, grad);
  at::Tensor diag = at::empty({static_cast<int64_t>(loss_diagnostic_names.size())}, detail::cpu(at::kDouble));
  double* d = diag.data_ptr<double>();
  const double values[] = {r.loss,          r.clip_frac_low,
                           r.clip_frac_high, r.clip_frac_dual,
                           r.ratio_mean,    r.ratio_max,
                           r.approx_kl_old, r.approx_kl_old_k3,
                           r.kl_ref,        static_cast<double>(r.n_tokens),
                           static_cast<double>(r.n_sequences), static_cast<double>(r.n_steps),
                           static_cast<double>(r.n_nonfinite_masked)};
  std::copy(std::begin(values), std::end(values), d);
  diag = diag.to(logp.device());  // no-op on the CPU
  at::Tensor loss = at::scalar_tensor(r.loss, logp.options().dtype(out_t));
  return {loss, detail::as_dtype(grad, out_t), diag};
}

}  // namespace impl

/// The CPU kernels by their old names (the template argument defaults to cpu_backend).
namespace cpu {
using kernels::opt_tensor;
using impl::broadcast_outcome_advantages;
using impl::broadcast_step_advantages;
using impl::group_advantages;
using impl::make_loss_options;
using impl::mix_advantages;
using impl::outcome_advantages;
using impl::policy_loss_fwd;
using impl::segment_steps;
using impl::step_rewards;
}  // namespace cpu

/// loss_result from the (13) float64 diagnostics tensor (any device: copied to the CPU).
inline loss_result to_loss_result(const at::Tensor& diagnostics) {
  TORCH_CHECK(diagnostics.defined() && diagnostics.dim() == 1 &&
                  diagnostics.size(0) == static_cast<int64_t>(loss_diagnostic_names.size()),
              "diagnostics must have shape (", loss_diagnostic_names.size(), "), got ",
              diagnostics.defined() ? detail::shape_str(diagnostics.sizes()) : std::string("an undefined tensor"));
  const at::Tensor c = diagnostics.detach().to(at::kCPU, at::kDouble).contiguous();
  const double* d = c.data_ptr<double>();
  loss_result r;
  r.loss = d[0];
  r.clip_frac_low = d[1];
  r.clip_frac_high = d[2];
  r.clip_frac_dual = d[3];
  r.ratio_mean = d[4];
  r.ratio_max = d[5];
  r.approx_kl_old = d[6];
  r.approx_kl_old_k3 = d[7];
  r.kl_ref = d[8];
  r.n_tokens = static_cast<int64_t>(d[9]);
  r.n_sequences = static_cast<int64_t>(d[10]);
  r.n_steps = static_cast<int64_t>(d[11]);
  r.n_nonfinite_masked = static_cast<int64_t>(d[12]);
  return r;
}

/// advantage_stats from the (6, K) float64 statistics tensor.
inline advantage_stats to_advantage_stats(const at::Tensor& stats) {
  TORCH_CHECK(stats.defined() && stats.dim() == 2 && stats.size(0) == 6,
              "stats must have shape (6, K), got ",
              stats.defined() ? detail::shape_str(stats.sizes()) : std::string("an undefined tensor"));
  const at::Tensor c = stats.detach().to(at::kCPU, at::kDouble).contiguous();
  const int64_t K = c.size(1);
  const double* d = c.data_ptr<double>();
  advantage_stats s;
  for (int64_t k = 0; k < K; ++k) {
    s.mean_reward.push_back(d[0 * K + k]);
    s.zero_variance_fraction.push_back(d[1 * K + k]);
    s.advantage_std.push_back(d[2 * K + k]);
    s.n_present.push_back(static_cast<int64_t>(d[3 * K + k]));
    s.n_zero_variance.push_back(static_cast<int64_t>(d[4 * K + k]));
    s.n_pairs.push_back(static_cast<int64_t>(d[5 * K + k]));
  }
  return s;
}

// ---------------------------------------------------------------------------------------
// CPU kernels of the distributed phases (docs/distributed.md): the ops sapo::group_partials,
// group_deviations, finalize_group_advantages, finish_advantage_std and loss_counts, thin
// tensor wrappers around the core functions of sapo/advantages.hpp, so that every transport
// (c10d in C++, torch.distributed in Python) runs the one implementation of SPEC §3. The
// arrays are O(n_groups * K): they are read into host vectors and come back as new tensors
// on the device of the call's leading tensor, ready to all-reduce.
// ---------------------------------------------------------------------------------------
namespace impl {
namespace detail_phase {

/// rewards (B, K) floating with K in [1, max_steps], as group_advantages requires.
template <class Backend>
void check_rewards(const at::Tensor& rewards) {
  detail::check_matrix<Backend>(rewards, "rewards", "(B, K)");
  detail::check_float(rewards, "rewards");
  TORCH_CHECK(rewards.size(1) >= 1 && rewards.size(1) <= max_steps, "rewards must have K in [1, ", max_steps,
              "] columns, got shape ", detail::shape_str(rewards.sizes()));
}

/// The global groups of the B local rows, and the int64 ids tensor the slice points into
/// (kept alive by the caller). n_groups counts the groups of every rank, so it cannot be
/// inferred from the local rows and has no "0 = automatic" as in group_advantages.
template <class Backend>
group_slice slice(int64_t B, int64_t group_size, const c10::optional<at::Tensor>& group_ids, int64_t n_groups,
                  int64_t first_row, at::Tensor& ids_keepalive) {
  TORCH_CHECK(n_groups > 0, "n_groups must be > 0 (the number of groups over every rank), got ", n_groups);
  if (!group_ids.has_value() || !group_ids->defined()) return group_slice::contiguous(group_size, first_row, n_groups);
  TORCH_CHECK(group_size == 0, "give either group_size or group_ids, not both (group_size = ", group_size, ")");
  // first_row places the local rows in contiguous groups; ignoring it silently would hide a
  // caller who meant contiguous groups.
  TORCH_CHECK(first_row == 0, "first_row applies to contiguous groups (group_size > 0) only; with group_ids it must be 0, got ",
              first_row);
  detail::check_shape<Backend>(*group_ids, "group_ids", "(B)", B);
  detail::check_int(*group_ids, "group_ids");
  ids_keepalive = detail::as_dtype(*group_ids, at::kLong);
  return group_slice::explicit_ids(detail::vec<const int64_t>(ids_keepalive), n_groups);
}

/// A reduced (n_groups + 1, K) array of an earlier round as host values (float64, or int64
/// for the counts); any floating dtype is accepted (an all-reduce may have changed it).
template <class Backend>
std::vector<double> read_partial(const at::Tensor& t, const char* name, int64_t rows, int64_t K) {
  detail::check_shape<Backend>(t, name, "(n_groups + 1, K)", rows, K);
  detail::check_float(t, name);
  const at::Tensor c = t.to(at::kCPU, at::kDouble).contiguous();
  return std::vector<double>(c.data_ptr<double>(), c.data_ptr<double>() + c.numel());
}
template <class Backend>
std::vector<int64_t> read_count(const at::Tensor& t, int64_t rows, int64_t K) {
  detail::check_shape<Backend>(t, "count", "(n_groups + 1, K)", rows, K);
  detail::check_int(t, "count");
  const at::Tensor c = t.to(at::kCPU, at::kLong).contiguous();
  return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
}

/// A (rows, cols) tensor of the values v on `device`.
template <class T>
at::Tensor to_tensor(const std::vector<T>& v, int64_t rows, int64_t cols, at::ScalarType type,
                     const at::Device& device) {
  at::Tensor out = at::empty({rows, cols}, detail::cpu(type));
  std::copy(v.begin(), v.end(), out.data_ptr<T>());
  return out.to(device);
}

}  // namespace detail_phase

/// Round 1: this rank's count, sum, min, max per (group, step) (sapo::local_group_partials).
template <class Backend = cpu_backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_partials(const at::Tensor& rewards,
                                                                          int64_t group_size,
                                                                          const c10::optional<at::Tensor>& group_ids,
                                                                          int64_t n_groups, int64_t first_row) {
  const auto device_guard = Backend::guard(rewards);
  detail_phase::check_rewards<Backend>(rewards);
  const int64_t B = rewards.size(0), K = rewards.size(1);
  at::Tensor ids;
  const group_slice g = detail_phase::slice<Backend>(B, group_size, group_ids, n_groups, first_row, ids);
  const at::ScalarType ct = detail::compute_type(rewards.scalar_type());
  const at::Tensor r = detail::as_dtype(rewards, ct);
  const ::sapo::group_partials p = detail::call_kernel([&] {
    return ct == at::kDouble ? Backend::local_group_partials(detail::mat<const double>(r), g)
                             : Backend::local_group_partials(detail::mat<const float>(r), g);
  });
  const at::Device dev = rewards.device();
  return {detail_phase::to_tensor(p.count, n_groups + 1, K, at::kLong, dev),
          detail_phase::to_tensor(p.sum, n_groups + 1, K, at::kDouble, dev),
          detail_phase::to_tensor(p.min, n_groups + 1, K, at::kDouble, dev),
          detail_phase::to_tensor(p.max, n_groups + 1, K, at::kDouble, dev)};
}

/// Round 2: this rank's sums of squared deviations from the global means sum / count of the
/// reduced round-1 arrays (sapo::local_group_deviations).
template <class Backend = cpu_backend>
at::Tensor group_deviations(const at::Tensor& rewards, int64_t group_size, const c10::optional<at::Tensor>& group_ids,
                            int64_t n_groups, const at::Tensor& count, const at::Tensor& sum, int64_t first_row) {
  const auto device_guard = Backend::guard(rewards);
  detail_phase::check_rewards<Backend>(rewards);
  const int64_t B = rewards.size(0), K = rewards.size(1);
  at::Tensor ids;
  const group_slice g = detail_phase::slice<Backend>(B, group_size, group_ids, n_groups, first_row, ids);
  ::sapo::group_partials p;
  p.n_groups = n_groups;
  p.K = K;
  p.count = detail_phase::read_count<Backend>(count, n_groups + 1, K);
  p.sum = detail_phase::read_partial<Backend>(sum, "sum", n_groups + 1, K);
  // Round 2 reads only count and sum; min / max are sized for the core's shape check.
  p.min.assign(p.size(), std::numeric_limits<double>::infinity());
  p.max.assign(p.size(), -std::numeric_limits<double>::infinity());
  const at::ScalarType ct = detail::compute_type(rewards.scalar_type());
  const at::Tensor r = detail::as_dtype(rewards, ct);
  detail::call_kernel([&] {
    if (ct == at::kDouble)
      Backend::local_group_deviations(detail::mat<const double>(r), g, p);
    else
      Backend::local_group_deviations(detail::mat<const float>(r), g, p);
  });
  return detail_phase::to_tensor(p.sq_dev, n_groups + 1, K, at::kDouble, rewards.device());
}

/// Finish: the advantages of the local rows from the fully reduced arrays, the statistics
/// of the whole batch (advantage_std of the local rows only), and the local advantage sums
/// (2, K) to all-reduce for finish_advantage_std (sapo::finalize_group_advantages).
template <class Backend = cpu_backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor> finalize_group_advantages(
    const at::Tensor& rewards, int64_t group_size, const c10::optional<at::Tensor>& group_ids, int64_t n_groups,
    const at::Tensor& count, const at::Tensor& sum, const at::Tensor& min, const at::Tensor& max,
    const at::Tensor& sq_dev, int64_t first_row, c10::string_view norm, bool unbiased_std, double eps,
    c10::string_view singleton) {
  const auto device_guard = Backend::guard(rewards);
  detail_phase::check_rewards<Backend>(rewards);
  const int64_t B = rewards.size(0), K = rewards.size(1);
  const advantage_options o = detail_adv::options(norm, unbiased_std, eps, singleton);
  at::Tensor ids;
  const group_slice g = detail_phase::slice<Backend>(B, group_size, group_ids, n_groups, first_row, ids);
  ::sapo::group_partials p;
  p.n_groups = n_groups;
  p.K = K;
  p.count = detail_phase::read_count<Backend>(count, n_groups + 1, K);
  p.sum = detail_phase::read_partial<Backend>(sum, "sum", n_groups + 1, K);
  p.min = detail_phase::read_partial<Backend>(min, "min", n_groups + 1, K);
  p.max = detail_phase::read_partial<Backend>(max, "max", n_groups + 1, K);
  p.sq_dev = detail_phase::read_partial<Backend>(sq_dev, "sq_dev", n_groups + 1, K);
  const at::ScalarType ct = detail::compute_type(rewards.scalar_type());
  const at::Tensor r = detail::as_dtype(rewards, ct);
  at::Tensor adv = at::empty({B, K}, rewards.options().dtype(ct));
  ::sapo::advantage_sums sums;
  const advantage_stats s = detail::call_kernel([&] {
    return ct == at::kDouble ? Backend::finalize_group_advantages(detail::mat<const double>(r), g, p, o,
                                                                  detail::mat<double>(adv), sums)
                             : Backend::finalize_group_advantages(detail::mat<const float>(r), g, p, o,
                                                                  detail::mat<float>(adv), sums);
  });
  std::vector<double> both(sums.sum);
  both.insert(both.end(), sums.sum_sq.begin(), sums.sum_sq.end());
  return {detail::as_dtype(adv, rewards.scalar_type()), detail::advantage_stats_tensor(s, K).to(rewards.device()),
          detail_phase::to_tensor(both, 2, K, at::kDouble, rewards.device())};
}

/// stats (6, K) with advantage_std (row 2) recomputed from the all-reduced advantage sums
/// (2, K) and stats' n_present (sapo::finish_advantage_std); the other rows are unchanged.
template <class Backend = cpu_backend>
at::Tensor finish_advantage_std(const at::Tensor& stats, const at::Tensor& advantage_sums) {
  const auto device_guard = Backend::guard(stats);
  detail::check_matrix<Backend>(stats, "stats", "(6, K)");
  TORCH_CHECK(stats.size(0) == static_cast<int64_t>(advantage_stat_names.size()), "stats must have shape (6, K), got ",
              detail::shape_str(stats.sizes()));
  detail::check_float(stats, "stats");
  const int64_t K = stats.size(1);
  detail::check_shape<Backend>(advantage_sums, "advantage_sums", "(2, K)", 2, K);
  detail::check_float(advantage_sums, "advantage_sums");
  advantage_stats s = to_advantage_stats(stats);
  const at::Tensor a = advantage_sums.to(at::kCPU, at::kDouble).contiguous();
  ::sapo::advantage_sums reduced;  // qualified: the parameter advantage_sums hides the type
  reduced.sum.assign(a.data_ptr<double>(), a.data_ptr<double>() + K);
  reduced.sum_sq.assign(a.data_ptr<double>() + K, a.data_ptr<double>() + 2 * K);
  detail::call_kernel([&] { Backend::finish_advantage_std(s, reduced); });
  return detail::advantage_stats_tensor(s, K).to(stats.device());
}

/// This rank's counts behind the loss normalizers, (4) int64: tokens, sequences, steps (0
/// without step ids), rows (sapo::count_loss_normalizers); all-reduce with SUM.
template <class Backend = cpu_backend>
at::Tensor loss_counts(const at::Tensor& mask, const c10::optional<at::Tensor>& step) {
  const auto device_guard = Backend::guard(mask);
  detail::check_matrix<Backend>(mask, "mask", "(B, T)");
  detail::check_mask_dtype(mask, "mask");
  const int64_t B = mask.size(0), T = mask.size(1);
  const bool have_step = step.has_value() && step->defined();
  at::Tensor s;
  if (have_step) {
    detail::check_shape<Backend>(*step, "step", "(B, T)", B, T);
    detail::check_int(*step, "step");
    s = detail::step_for_kernel(*step);
  }
  const at::Tensor m = detail::mask_for_kernel(mask);
  ::sapo::loss_counts c;
  detail::visit_mask(m, [&](auto mv) {
    c = detail::call_kernel([&] {
      return have_step ? Backend::count_loss_normalizers(mv, detail::mat<const int32_t>(s))
                       : Backend::count_loss_normalizers(mv, mat_view<const int32_t>{});
    });
  });
  const std::vector<int64_t> v{c.tokens, c.sequences, c.steps, c.rows};
  return detail_phase::to_tensor(v, 1, 4, at::kLong, mask.device()).view({4});
}

}  // namespace impl

namespace cpu {
using impl::finalize_group_advantages;
using impl::finish_advantage_std;
using impl::group_deviations;
using impl::group_partials;
using impl::loss_counts;
}  // namespace cpu

// ---------------------------------------------------------------------------------------
// The autograd function: forward runs the fused kernel (op sapo::policy_loss_fwd) and saves
// only its gradient buffer; backward scales that buffer by the incoming gradient.
// ---------------------------------------------------------------------------------------
namespace detail {
/// Calls sapo::policy_loss_fwd through the dispatcher (CPU or a registered CUDA kernel).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> call_policy_loss_fwd(
    const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& mask, const kernels::opt_tensor& tok,
    const kernels::opt_tensor& step_adv, const kernels::opt_tensor& step, const kernels::opt_tensor& ref,
    const loss_options& o) {
  static const auto op = find_op("sapo::policy_loss_fwd").typed<kernels::policy_loss_fwd_fn>();
  return op.call(logp, old_logp, mask, tok, step_adv, step, ref, enum_name(o.ratio, ratio_names), o.clip_low,
                 o.clip_high, o.dual_clip, o.dual_clip_c, o.kl_coef, enum_name(o.kl, kl_names),
                 enum_name(o.agg, agg_names), o.max_response_length, o.global_tokens, o.global_sequences,
                 o.global_steps, enum_name(o.nonfinite, nonfinite_names), static_cast<int64_t>(o.num_threads));
}
}  // namespace detail

struct policy_loss_function : public torch::autograd::Function<policy_loss_function> {
  /// Returns {loss (), diagnostics (13) float64, not differentiable}.
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& logp,
                                                const at::Tensor& old_logp, const at::Tensor& mask,
                                                const kernels::opt_tensor& token_advantages,
                                                const kernels::opt_tensor& step_advantages,
                                                const kernels::opt_tensor& step, const kernels::opt_tensor& ref_logp,
                                                const loss_options& options) {
    at::Tensor loss, grad, diagnostics;
    std::tie(loss, grad, diagnostics) = detail::call_policy_loss_fwd(logp, old_logp, mask, token_advantages,
                                                                     step_advantages, step, ref_logp, options);
    ctx->save_for_backward({grad});
    ctx->mark_non_differentiable({diagnostics});
    return {loss, diagnostics};
  }

  /// d L / d logp = (d L / d loss) * (d loss / d logp). The saved gradient is a constant:
  /// under create_graph the result is differentiable with respect to the incoming gradient,
  /// but the second derivative of the loss with respect to logp (d grad / d logp) is taken
  /// as 0 -- there is no double backward through the kernel.
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const at::Tensor grad = ctx->get_saved_variables()[0];
    const at::Tensor& upstream = grad_outputs[0];
    if (!upstream.defined())
      return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
              at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    // loss.backward() sends exactly 1: hand over the kernel's gradient as it is, which saves
    // a pass over (B, T) and a (B, T) allocation (the upstream value is read only on the CPU,
    // where reading it costs no device synchronisation).
    const bool unit = !upstream.requires_grad() && upstream.device().is_cpu() && upstream.numel() == 1 &&
                      upstream.item<double>() == 1.0;
    at::Tensor d_logp = unit ? grad : grad * upstream;
    // One entry per forward argument: logp, old_logp, mask, 4 optional tensors, options.
    return {d_logp, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

namespace cpu {
/// The CompositeImplicitAutograd kernel of sapo::policy_loss (any device).
inline std::tuple<at::Tensor, at::Tensor> policy_loss(SAPO_TORCH_LOSS_ARGS) {
  const loss_options o = make_loss_options(ratio, clip_low, clip_high, dual_clip, dual_clip_c, kl_coef, kl, agg,
                                           max_response_length, global_tokens, global_sequences, global_steps,
                                           nonfinite, num_threads);
  auto out =
      policy_loss_function::apply(logp, old_logp, mask, token_advantages, step_advantages, step, ref_logp, o);
  return {out[0], out[1]};
}
}  // namespace cpu

// =======================================================================================
// The C++ API: tensors in, new tensors out, through the dispatcher.
// =======================================================================================

struct segment_result {
  at::Tensor step;       ///< (B, T) int32, -1 .. K-1
  at::Tensor n_steps;    ///< (B) int32
  at::Tensor codes;      ///< (B, K) int64, -1 where not found
  at::Tensor malformed;  ///< (B) bool
  int64_t n_malformed = 0;
};

/// SPEC §1. tokens (B, T) int64/int32, mask (B, T) 0/1; options as for sapo::segment_steps.
inline segment_result segment_steps(const at::Tensor& tokens, const at::Tensor& mask, const segment_options& options) {
  static const auto op = detail::find_op("sapo::segment_steps").typed<kernels::segment_steps_fn>();
  std::vector<int64_t> ranges;
  for (const token_range& r : options.sid_ranges) {
    ranges.push_back(r.lo);
    ranges.push_back(r.hi);
  }
  segment_result r;
  std::tie(r.step, r.n_steps, r.codes, r.malformed) =
      op.call(tokens, mask, options.num_steps, ranges, detail::enum_name(options.layout, detail::layout_names),
              options.codes_per_level, options.think_end_id, options.sid_token_in_step,
              detail::enum_name(options.tail, detail::tail_names), static_cast<int64_t>(options.num_threads));
  r.n_malformed = r.malformed.sum().item<int64_t>();
  return r;
}

/// SPEC §2. codes (B, K) int, malformed (B) bool/int, targets (B, K) int -> rewards (B, K) in dtype.
inline at::Tensor step_rewards(const at::Tensor& codes, const at::Tensor& malformed, const at::Tensor& targets,
                               const reward_options& options = {}, at::ScalarType dtype = at::kFloat) {
  static const auto op = detail::find_op("sapo::step_rewards").typed<kernels::step_rewards_fn>();
  return op.call(codes, malformed, targets, detail::enum_name(options.kind, detail::reward_names),
                 options.level_weights, options.malformed_reward, dtype);
}

struct advantage_result {
  at::Tensor adv;    ///< (B, K) or (B), dtype of the rewards
  at::Tensor stats;  ///< (6, K) float64, rows in advantage_stat_names order
  advantage_stats statistics() const { return to_advantage_stats(stats); }
};

namespace detail {
inline advantage_result call_advantages(const char* name, const at::Tensor& rewards, int64_t group_size,
                                        const kernels::opt_tensor& ids, int64_t n_groups,
                                        const advantage_options& o) {
  const auto op = find_op(name).typed<kernels::advantages_fn>();
  advantage_result r;
  std::tie(r.adv, r.stats) = op.call(rewards, group_size, ids, n_groups, enum_name(o.norm, norm_names),
                                     o.unbiased_std, o.eps, enum_name(o.singleton, singleton_names));
  return r;
}
}  // namespace detail

/// SPEC §3. rewards (B, K) (NaN = absent step), contiguous groups of group_size.
inline advantage_result group_advantages(const at::Tensor& rewards, int64_t group_size,
                                         const advantage_options& options = {}) {
  return detail::call_advantages("sapo::group_advantages", rewards, group_size, c10::nullopt, 0, options);
}
/// SPEC §3. rewards (B, K), explicit group ids (B) in [0, n_groups).
inline advantage_result group_advantages(const at::Tensor& rewards, const at::Tensor& group_ids, int64_t n_groups,
                                         const advantage_options& options = {}) {
  return detail::call_advantages("sapo::group_advantages", rewards, 0, group_ids, n_groups, options);
}
/// Outcome mode: rewards (B) -> adv (B), stats (6, 1).
inline advantage_result outcome_advantages(const at::Tensor& rewards, int64_t group_size,
                                           const advantage_options& options = {}) {
  return detail::call_advantages("sapo::outcome_advantages", rewards, group_size, c10::nullopt, 0, options);
}
inline advantage_result outcome_advantages(const at::Tensor& rewards, const at::Tensor& group_ids, int64_t n_groups,
                                           const advantage_options& options = {}) {
  return detail::call_advantages("sapo::outcome_advantages", rewards, 0, group_ids, n_groups, options);
}

/// Mixed mode: w.outcome * outcome_adv[i] + w.step * step_adv[i, k] -> (B, K), step_adv's dtype.
inline at::Tensor mix_advantages(const at::Tensor& outcome_adv, const at::Tensor& step_adv, mix_weights w = {}) {
  static const auto op = detail::find_op("sapo::mix_advantages").typed<kernels::mix_advantages_fn>();
  return op.call(outcome_adv, step_adv, w.outcome, w.step);
}

/// adv (B, K), step (B, T), mask (B, T) -> token advantages (B, T) in adv's dtype.
inline at::Tensor broadcast_step_advantages(const at::Tensor& adv, const at::Tensor& step, const at::Tensor& mask) {
  static const auto op =
      detail::find_op("sapo::broadcast_step_advantages").typed<kernels::broadcast_step_advantages_fn>();
  return op.call(adv, step, mask);
}

/// adv (B), mask (B, T) -> token advantages (B, T) in adv's dtype.
inline at::Tensor broadcast_outcome_advantages(const at::Tensor& adv, const at::Tensor& mask) {
  static const auto op =
      detail::find_op("sapo::broadcast_outcome_advantages").typed<kernels::broadcast_outcome_advantages_fn>();
  return op.call(adv, mask);
}

/// The tensors of a policy loss; an undefined tensor is absent. Give token_advantages, or
/// step_advantages with step.
struct loss_inputs {
  at::Tensor logp;              ///< (B, T) the variable of the gradient
  at::Tensor old_logp;          ///< (B, T)
  at::Tensor mask;              ///< (B, T) 0/1
  at::Tensor token_advantages;  ///< (B, T), or
  at::Tensor step_advantages;   ///< (B, K) with step
  at::Tensor step;              ///< (B, T) step ids (needed by step_advantages, ratio step, step_mean)
  at::Tensor ref_logp;          ///< (B, T), needed when kl_coef > 0
};

struct policy_loss_output {
  at::Tensor loss;         ///< () in logp's dtype; differentiable with respect to logp
  at::Tensor diagnostics;  ///< (13) float64, loss_diagnostic_names order (loss in double first)
  loss_result result() const { return to_loss_result(diagnostics); }
};

struct policy_loss_forward_output {
  at::Tensor loss;         ///< () in logp's dtype, no autograd
  at::Tensor grad;         ///< (B, T) d loss / d logp in logp's dtype
  at::Tensor diagnostics;  ///< (13) float64
  loss_result result() const { return to_loss_result(diagnostics); }
};

namespace detail {
inline kernels::opt_tensor optional(const at::Tensor& t) {
  return t.defined() ? kernels::opt_tensor(t) : kernels::opt_tensor(c10::nullopt);
}
}  // namespace detail

/// SPEC §4-6 with autograd: loss.backward() puts d loss / d logp into logp.grad().
inline policy_loss_output policy_loss(const loss_inputs& in, const loss_options& options = {}) {
  auto out = policy_loss_function::apply(in.logp, in.old_logp, in.mask, detail::optional(in.token_advantages),
                                         detail::optional(in.step_advantages), detail::optional(in.step),
                                         detail::optional(in.ref_logp), options);
  return {out[0], out[1]};
}
/// Token advantages (B, T).
inline policy_loss_output policy_loss(const at::Tensor& logp, const at::Tensor& old_logp,
                                      const at::Tensor& token_advantages, const at::Tensor& mask,
                                      const loss_options& options = {}) {
  loss_inputs in;
  in.logp = logp;
  in.old_logp = old_logp;
  in.token_advantages = token_advantages;
  in.mask = mask;
  return policy_loss(in, options);
}
/// Step advantages (B, K) with step ids (B, T).
inline policy_loss_output policy_loss(const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& step,
                                      const at::Tensor& step_advantages, const at::Tensor& mask,
                                      const loss_options& options = {}) {
  loss_inputs in;
  in.logp = logp;
  in.old_logp = old_logp;
  in.step = step;
  in.step_advantages = step_advantages;
  in.mask = mask;
  return policy_loss(in, options);
}

/// The fused kernel without autograd: loss, gradient and diagnostics as tensors, for
/// callers that chain the gradient themselves.
inline policy_loss_forward_output policy_loss_forward(const loss_inputs& in, const loss_options& options = {}) {
  policy_loss_forward_output r;
  std::tie(r.loss, r.grad, r.diagnostics) =
      detail::call_policy_loss_fwd(in.logp, in.old_logp, in.mask, detail::optional(in.token_advantages),
                                   detail::optional(in.step_advantages), detail::optional(in.step),
                                   detail::optional(in.ref_logp), options);
  return r;
}

}  // namespace libtorch
}  // namespace sapo
