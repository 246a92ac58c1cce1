// The CUDA adapter against the CPU kernels of include/sapo, on random batches: odd sizes,
// strided and column-major views, explicit groups, malformed responses, non-finite values.
// Integer outputs must be equal, floating-point ones within tight tolerances, and every GPU
// result bit-identical across runs and layouts. Rejected inputs must throw the same
// sapo::error as the CPU (argument, expected, actual) and leave every output untouched.
//
// A plain program (no Catch2): exit 0 = passed, 1 = failed, 77 = no CUDA device (ctest
// reports it as skipped through SKIP_RETURN_CODE).

// The CPU sapo::step_rewards, compared against below, hands host lambdas to the shared
// __host__ __device__ detail::row_rewards; nvcc warns about the device side of that host-only
// instantiation, which is never compiled for or run on the GPU.
#ifdef __NVCC__
#pragma nv_diag_suppress 20013, 20015
#endif
#include <sapo/sapo.hpp>
#include <sapo/cuda.cuh>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace {

// ------------------------------------------------------------------ reporting

long g_checks = 0, g_failures = 0;
std::string g_case;  // the case being run, printed with a failure

#define EXPECT(cond, msg)                                                                             \
  do {                                                                                                \
    ++g_checks;                                                                                       \
    if (!(cond)) {                                                                                    \
      ++g_failures;                                                                                   \
      if (g_failures <= 40) {                                                                         \
        std::ostringstream os_;                                                                       \
        os_ << msg;                                                                                   \
        std::fprintf(stderr, "FAIL %s:%d [%s] %s: %s\n", __FILE__, __LINE__, g_case.c_str(), #cond, \
                     os_.str().c_str());                                                              \
      }                                                                                               \
    }                                                                                                 \
  } while (0)

void cuda_ok(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "CUDA error in %s: %s\n", what, cudaGetErrorString(e));
    std::exit(1);
  }
}

// ------------------------------------------------------------------ host arrays and device mirrors

/// Where a (rows, cols) array sits in its store: row-major, a strided slice of a larger
/// buffer (every other column, padded rows), or column-major.
enum class Layout { contiguous, strided, column_major };
const Layout all_layouts[] = {Layout::contiguous, Layout::strided, Layout::column_major};
const char* name(Layout l) {
  return l == Layout::contiguous ? "contiguous" : l == Layout::strided ? "strided" : "column_major";
}

/// A host array with its whole store (padding included, holding `fill`), mirrored on the
/// device with the same strides, so GPU outputs can be compared with CPU outputs store
/// against store: padding written by mistake shows up too.
template <class T>
struct Arr {
  int64_t rows = 0, cols = 0, rs = 0, cs = 1;
  std::vector<T> host;
  T* dev = nullptr;

  Arr() = default;
  Arr(int64_t r, int64_t c, Layout layout, T fill) : rows(r), cols(c) {
    switch (layout) {
      case Layout::contiguous: rs = c; cs = 1; break;
      case Layout::strided: rs = 2 * c + 3; cs = 2; break;
      case Layout::column_major: rs = 1; cs = r; break;
    }
    host.assign(static_cast<size_t>(std::max<int64_t>(1, 2 * r * c + 5 * r + c + 4)), fill);
  }
  Arr(const Arr& o) : rows(o.rows), cols(o.cols), rs(o.rs), cs(o.cs), host(o.host) {}
  Arr& operator=(const Arr& o) {
    if (this != &o) {
      free_dev();
      rows = o.rows, cols = o.cols, rs = o.rs, cs = o.cs, host = o.host;
    }
    return *this;
  }
  ~Arr() { free_dev(); }
  void free_dev() {
    if (dev) cudaFree(dev);
    dev = nullptr;
  }

  T& at(int64_t i, int64_t j) { return host[static_cast<size_t>(i * rs + j * cs)]; }
  T at(int64_t i, int64_t j) const { return host[static_cast<size_t>(i * rs + j * cs)]; }

  /// Copies the whole host store to the device (allocating it the first time).
  void upload() {
    if (!dev) cuda_ok(cudaMalloc(&dev, host.size() * sizeof(T)), "cudaMalloc");
    cuda_ok(cudaMemcpy(dev, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice), "upload");
  }
  std::vector<T> download() const {
    std::vector<T> v(host.size());
    cuda_ok(cudaMemcpy(v.data(), dev, host.size() * sizeof(T), cudaMemcpyDeviceToHost), "download");
    return v;
  }

  sapo::mat_view<T> h() { return {host.data(), rows, cols, rs, cs}; }
  sapo::mat_view<const T> ch() const { return {host.data(), rows, cols, rs, cs}; }
  sapo::mat_view<T> d() const { return {dev, rows, cols, rs, cs}; }
  sapo::mat_view<const T> cd() const { return {dev, rows, cols, rs, cs}; }
  /// (rows, 1) arrays as vectors.
  sapo::vec_view<T> hv() { return {host.data(), rows, rs}; }
  sapo::vec_view<const T> chv() const { return {host.data(), rows, rs}; }
  sapo::vec_view<T> dv() const { return {dev, rows, rs}; }
  sapo::vec_view<const T> cdv() const { return {dev, rows, rs}; }
};

/// The same values in another layout.
template <class T>
Arr<T> relayout(const Arr<T>& a, Layout layout, T fill) {
  Arr<T> b(a.rows, a.cols, layout, fill);
  for (int64_t i = 0; i < a.rows; ++i)
    for (int64_t j = 0; j < a.cols; ++j) b.at(i, j) = a.at(i, j);
  return b;
}

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

/// Exact equality of two stores (integer outputs, copies, untouched padding).
template <class T>
void expect_equal(const std::vector<T>& gpu, const std::vector<T>& cpu, const char* what) {
  size_t bad = 0, first = 0;
  for (size_t k = 0; k < cpu.size(); ++k) {
    const bool same = std::memcmp(&gpu[k], &cpu[k], sizeof(T)) == 0;
    if (!same && bad++ == 0) first = k;
  }
  EXPECT(bad == 0, what << ": " << bad << " of " << cpu.size() << " store elements differ, first at " << first
                        << ": gpu " << +gpu[first] << ", cpu " << +cpu[first]);
}

/// |gpu - cpu| <= abs + rel |cpu| element by element; `skip(k)` exempts an element.
template <class T>
void expect_close(const std::vector<T>& gpu, const std::vector<T>& cpu, double rel, double abs, const char* what,
                  const std::function<bool(size_t)>& skip = nullptr) {
  size_t bad = 0, first = 0;
  for (size_t k = 0; k < cpu.size(); ++k) {
    const double g = static_cast<double>(gpu[k]), c = static_cast<double>(cpu[k]);
    if (std::isnan(g) && std::isnan(c)) continue;
    if (std::abs(g - c) <= abs + rel * std::abs(c)) continue;
    if (skip && skip(k)) continue;
    if (bad++ == 0) first = k;
  }
  EXPECT(bad == 0, what << ": " << bad << " of " << cpu.size() << " elements differ, first at store index " << first
                        << ": gpu " << static_cast<double>(gpu[first]) << ", cpu "
                        << static_cast<double>(cpu[first]));
}

void expect_near(double gpu, double cpu, double rel, double abs, const char* what) {
  EXPECT(std::abs(gpu - cpu) <= abs + rel * std::abs(cpu), what << ": gpu " << gpu << ", cpu " << cpu);
}

/// Runs f and returns the sapo::error it threw, if any.
template <class F>
std::optional<sapo::error> thrown(F&& f) {
  try {
    f();
  } catch (const sapo::error& e) {
    return e;
  }
  return std::nullopt;
}

void expect_same_error(const std::optional<sapo::error>& gpu, const std::optional<sapo::error>& cpu,
                       const char* what) {
  EXPECT(cpu.has_value(), what << ": the CPU kernel did not reject the input");
  EXPECT(gpu.has_value(), what << ": the CUDA kernel did not reject the input"
                               << (cpu ? std::string(" (CPU: ") + cpu->what() + ")" : std::string()));
  if (!gpu || !cpu) return;
  EXPECT(gpu->argument() == cpu->argument() && gpu->expected() == cpu->expected() && gpu->actual() == cpu->actual(),
         what << ":\n  gpu: " << gpu->what() << "\n  cpu: " << cpu->what());
}

// ------------------------------------------------------------------ random batches

/// Token vocabulary: thought tokens 0..49, think_end 50, eos 51, SID level k in
/// [100 + 10 k, 110 + 10 k).
struct Vocab {
  int64_t K = 3;
  static constexpr int64_t think_end = 50, eos = 51, sid_base = 100, width = 10;
  int64_t lo(int64_t k) const { return sid_base + width * k; }
  sapo::segment_options options(bool think_then_sid, bool per_level) const {
    sapo::segment_options o;
    o.num_steps = K;
    o.layout = think_then_sid ? sapo::step_layout::think_then_sid : sapo::step_layout::interleaved;
    if (per_level)
      for (int64_t k = 0; k < K; ++k) o.sid_ranges.push_back({lo(k), lo(k) + width});
    else
      o.sid_ranges.push_back({sid_base, sid_base + width});
    o.think_end_id = think_end;
    return o;
  }
};

/// B responses of length T: a prompt (mask 0), a response in the layout with random defects
/// (missing, extra or wrong-level SID tokens, stray SID tokens, truncation), eos, padding.
void random_tokens(std::mt19937_64& rng, const Vocab& v, int64_t B, int64_t T, bool think_then_sid, bool per_level,
                   double defect_rate, std::vector<std::vector<int64_t>>& ids_out,
                   std::vector<std::vector<int>>& mask_out) {
  std::uniform_int_distribution<int64_t> thought(0, 49), code(0, 9), think_len(0, 3), prompt_len(0, 4);
  std::uniform_real_distribution<double> u(0, 1);
  auto sid = [&](int64_t level, int64_t c) { return per_level ? v.lo(level) + c : Vocab::sid_base + c; };
  ids_out.assign(static_cast<size_t>(B), {});
  mask_out.assign(static_cast<size_t>(B), {});
  for (int64_t i = 0; i < B; ++i) {
    std::vector<int64_t> ids(static_cast<size_t>(T), 0);
    std::vector<int> m(static_cast<size_t>(T), 0);
    int64_t t = prompt_len(rng);
    for (int64_t p = 0; p < t && p < T; ++p) ids[static_cast<size_t>(p)] = thought(rng);
    auto put = [&](int64_t id) {
      if (t < T) {
        ids[static_cast<size_t>(t)] = id;
        m[static_cast<size_t>(t)] = 1;
      }
      ++t;
    };
    const bool defect = u(rng) < defect_rate;
    const int64_t steps = defect && u(rng) < 0.3 ? std::uniform_int_distribution<int64_t>(0, v.K + 1)(rng) : v.K;
    std::vector<int64_t> sids;
    for (int64_t k = 0; k < steps; ++k) {
      int64_t level = k < v.K ? k : v.K - 1;
      if (defect && u(rng) < 0.2) level = (level + 1) % v.K;  // wrong level
      sids.push_back(sid(level, code(rng)));
    }
    if (!think_then_sid) {
      for (int64_t id : sids) {
        for (int64_t j = think_len(rng); j > 0; --j) put(thought(rng));
        put(id);
      }
    } else {
      const int64_t blocks = defect && u(rng) < 0.3 ? std::uniform_int_distribution<int64_t>(0, v.K + 1)(rng) : v.K;
      for (int64_t k = 0; k < blocks; ++k) {
        for (int64_t j = think_len(rng); j > 0; --j) put(defect && u(rng) < 0.1 ? sid(0, 1) : thought(rng));
        put(Vocab::think_end);
      }
      for (int64_t id : sids) put(id);
    }
    if (u(rng) < 0.5) put(Vocab::eos);
    if (u(rng) < 0.2) put(thought(rng));
    for (int64_t p = t; p < T; ++p) ids[static_cast<size_t>(p)] = sid(0, 2);  // junk under mask 0
    ids_out[static_cast<size_t>(i)] = ids;
    mask_out[static_cast<size_t>(i)] = m;
  }
}

// ------------------------------------------------------------------ segmentation

template <class Id, class M>
void test_segment_case(std::mt19937_64& rng, cudaStream_t stream, int64_t B, int64_t T, int64_t K, bool tts,
                       bool per_level, bool catalogue, bool tail_last, bool sid_in_step, Layout layout) {
  std::ostringstream c;
  c << "segment B=" << B << " T=" << T << " K=" << K << " " << (tts ? "think_then_sid" : "interleaved")
    << (per_level ? " per-level" : " shared-range") << (catalogue ? " catalogue" : "") << (tail_last ? " tail=last" : "")
    << (sid_in_step ? "" : " sid-not-in-step") << " " << name(layout);
  g_case = c.str();
  Vocab v;
  v.K = K;
  std::vector<std::vector<int64_t>> ids;
  std::vector<std::vector<int>> m;
  random_tokens(rng, v, B, T, tts, per_level, 0.35, ids, m);
  Arr<Id> tokens(B, T, layout, Id(7));
  Arr<M> mask(B, T, layout, M(0));
  for (int64_t i = 0; i < B; ++i)
    for (int64_t t = 0; t < T; ++t) {
      tokens.at(i, t) = static_cast<Id>(ids[size_t(i)][size_t(t)]);
      mask.at(i, t) = static_cast<M>(m[size_t(i)][size_t(t)]);
    }
  sapo::segment_options opt = v.options(tts, per_level);
  if (catalogue) opt.codes_per_level.assign(static_cast<size_t>(K), 7);
  opt.tail = tail_last ? sapo::tail_policy::last_step : sapo::tail_policy::no_step;
  opt.sid_token_in_step = sid_in_step;

  Arr<int32_t> step(B, T, layout, -9), n_steps(B, 1, layout, -9);
  Arr<int64_t> codes(B, K, layout, -9);
  Arr<uint8_t> malformed(B, 1, layout, 9);
  Arr<int32_t> g_step = step, g_n_steps = n_steps;
  Arr<int64_t> g_codes = codes;
  Arr<uint8_t> g_malformed = malformed;
  for (auto* a : {&g_step, &g_n_steps}) a->upload();
  g_codes.upload();
  g_malformed.upload();
  tokens.upload();
  mask.upload();

  const sapo::segment_stats cpu =
      sapo::segment_steps(tokens.ch(), mask.ch(), opt, {step.h(), n_steps.hv(), codes.h(), malformed.hv()});
  const sapo::segment_stats gpu = sapo::cuda::segment_steps(
      tokens.cd(), mask.cd(), opt, {g_step.d(), g_n_steps.dv(), g_codes.d(), g_malformed.dv()}, stream);
  EXPECT(gpu.n_malformed == cpu.n_malformed, "n_malformed gpu " << gpu.n_malformed << " cpu " << cpu.n_malformed);
  expect_equal(g_step.download(), step.host, "step");
  expect_equal(g_n_steps.download(), n_steps.host, "n_steps");
  expect_equal(g_codes.download(), codes.host, "codes");
  expect_equal(g_malformed.download(), malformed.host, "malformed");

  // A mask value outside {0, 1} (two of them: the first in row-major order is named).
  if (B * T >= 2) {
    Arr<M> bad = mask;
    const int64_t i1 = B - 1, t1 = T - 1, i0 = B / 2, t0 = T / 3;
    bad.at(i1, t1) = M(2);
    bad.at(i0, t0) = M(3);
    bad.upload();
    Arr<int32_t> s2(B, T, layout, -5);
    s2.upload();
    const auto before = s2.download();
    const auto gpu_err = thrown([&] {
      sapo::cuda::segment_steps(tokens.cd(), bad.cd(), opt, {s2.d(), g_n_steps.dv(), g_codes.d(), g_malformed.dv()},
                                stream);
    });
    const auto cpu_err = thrown([&] {
      Arr<int32_t> s3 = s2;
      sapo::segment_steps(tokens.ch(), bad.ch(), opt, {s3.h(), n_steps.hv(), codes.h(), malformed.hv()});
    });
    expect_same_error(gpu_err, cpu_err, "segment: bad mask value");
    expect_equal(s2.download(), before, "segment: step untouched after a rejected mask");
    expect_equal(g_n_steps.download(), n_steps.host, "segment: n_steps untouched after a rejected mask");
  }
}

void test_segment(cudaStream_t stream) {
  std::mt19937_64 rng(11);
  const int64_t shapes[][2] = {{1, 1}, {3, 7}, {19, 61}, {133, 40}, {64, 300}};
  int n = 0;
  for (auto& s : shapes)
    for (int tts = 0; tts < 2; ++tts)
      for (int per_level = 0; per_level < 2; ++per_level) {
        const Layout layout = all_layouts[n % 3];
        const bool catalogue = n % 2 == 1, tail_last = n % 4 >= 2, sid_in_step = n % 5 != 3;
        const int64_t K = 1 + n % 4;
        if (n % 2 == 0)
          test_segment_case<int64_t, float>(rng, stream, s[0], s[1], K, tts, per_level, catalogue, tail_last,
                                            sid_in_step, layout);
        else
          test_segment_case<int32_t, uint8_t>(rng, stream, s[0], s[1], K, tts, per_level, catalogue, tail_last,
                                              sid_in_step, layout);
        ++n;
      }
  std::printf("segment_steps: %d cases\n", n);
}

// ------------------------------------------------------------------ step rewards

template <class R>
void test_rewards_case(std::mt19937_64& rng, cudaStream_t stream, int64_t B, int64_t K, sapo::reward_kind kind,
                       Layout layout) {
  std::ostringstream c;
  c << "rewards B=" << B << " K=" << K << " kind=" << static_cast<int>(kind) << " " << name(layout);
  g_case = c.str();
  std::uniform_int_distribution<int64_t> code(-1, 2), target(0, 2);
  std::uniform_real_distribution<double> u(0, 1);
  Arr<int64_t> codes(B, K, layout, 0), targets(B, K, layout, 0);
  Arr<uint8_t> malformed(B, 1, layout, 0);
  for (int64_t i = 0; i < B; ++i) {
    malformed.at(i, 0) = u(rng) < 0.2 ? 1 : 0;
    for (int64_t k = 0; k < K; ++k) {
      targets.at(i, k) = target(rng);
      codes.at(i, k) = u(rng) < 0.6 ? targets.at(i, k) : code(rng);
    }
  }
  sapo::reward_options opt;
  opt.kind = kind;
  opt.malformed_reward = -0.25;
  for (int64_t k = 0; k < K; ++k) opt.level_weights.push_back(0.25 * static_cast<double>(k + 1));
  Arr<R> rewards(B, K, layout, R(-9));
  Arr<R> g_rewards = rewards;
  g_rewards.upload();
  codes.upload();
  targets.upload();
  malformed.upload();
  sapo::step_rewards(codes.ch(), malformed.chv(), targets.ch(), opt, rewards.h());
  sapo::cuda::step_rewards(codes.cd(), malformed.cdv(), targets.cd(), opt, g_rewards.d(), stream);
  expect_equal(g_rewards.download(), rewards.host, "rewards");

  // A malformed flag that is neither 0 nor 1.
  Arr<uint8_t> bad = malformed;
  bad.at(B - 1, 0) = 2;
  if (B > 2) bad.at(B / 2, 0) = 5;
  bad.upload();
  Arr<R> untouched(B, K, layout, R(-3));
  untouched.upload();
  const auto gpu_err = thrown(
      [&] { sapo::cuda::step_rewards(codes.cd(), bad.cdv(), targets.cd(), opt, untouched.d(), stream); });
  const auto cpu_err = thrown([&] {
    Arr<R> r = untouched;
    sapo::step_rewards(codes.ch(), bad.chv(), targets.ch(), opt, r.h());
  });
  expect_same_error(gpu_err, cpu_err, "rewards: bad malformed flag");
  expect_equal(untouched.download(), untouched.host, "rewards untouched after a rejected flag");
}

void test_rewards(cudaStream_t stream) {
  std::mt19937_64 rng(12);
  const sapo::reward_kind kinds[] = {sapo::reward_kind::per_level, sapo::reward_kind::prefix,
                                     sapo::reward_kind::weighted_prefix, sapo::reward_kind::exact};
  const int64_t shapes[][2] = {{1, 1}, {3, 3}, {19, 4}, {133, 7}, {300, 64}};
  int n = 0;
  for (auto& s : shapes)
    for (auto kind : kinds) {
      if (n % 2 == 0)
        test_rewards_case<float>(rng, stream, s[0], s[1], kind, all_layouts[n % 3]);
      else
        test_rewards_case<double>(rng, stream, s[0], s[1], kind, all_layouts[n % 3]);
      ++n;
    }
  std::printf("step_rewards: %d cases\n", n);
}

// ------------------------------------------------------------------ group advantages

struct GroupSpec {
  int64_t G = 0;         // contiguous groups of G, or
  int64_t n_groups = 0;  // explicit random ids in [0, n_groups) (some groups empty)
};

template <class R, class A>
void test_advantages_case(std::mt19937_64& rng, cudaStream_t stream, int64_t B, int64_t K, GroupSpec groups,
                          const sapo::advantage_options& opt, Layout layout, bool discrete, double absent_rate) {
  std::ostringstream c;
  c << "advantages B=" << B << " K=" << K << (groups.G ? " G=" : " explicit n_groups=")
    << (groups.G ? groups.G : groups.n_groups) << " norm=" << static_cast<int>(opt.norm)
    << " unbiased=" << opt.unbiased_std << " singleton=" << static_cast<int>(opt.singleton) << " "
    << (discrete ? "discrete" : "continuous") << " absent=" << absent_rate << " " << name(layout);
  g_case = c.str();
  std::uniform_real_distribution<double> u(0, 1);
  std::uniform_int_distribution<int> level(0, 2);
  Arr<R> rewards(B, K, layout, R(0));
  for (int64_t i = 0; i < B; ++i)
    for (int64_t k = 0; k < K; ++k) {
      double r = discrete ? 0.5 * level(rng) : u(rng) * 2 - 0.5;
      if (u(rng) < absent_rate) r = std::numeric_limits<double>::quiet_NaN();
      rewards.at(i, k) = static_cast<R>(r);
    }
  Arr<int64_t> ids(B, 1, layout, 0);
  sapo::group_layout cpu_groups = sapo::group_layout::contiguous(groups.G), gpu_groups = cpu_groups;
  if (groups.G == 0) {
    std::uniform_int_distribution<int64_t> id(0, groups.n_groups - 1);
    for (int64_t i = 0; i < B; ++i) ids.at(i, 0) = id(rng);
    ids.upload();
    cpu_groups = sapo::group_layout::explicit_ids(ids.chv(), groups.n_groups);
    gpu_groups = sapo::group_layout::explicit_ids(ids.cdv(), groups.n_groups);
  }
  Arr<A> adv(B, K, layout, A(-9));
  Arr<A> g_adv = adv;
  g_adv.upload();
  rewards.upload();
  const sapo::advantage_stats cpu = sapo::group_advantages(rewards.ch(), cpu_groups, opt, adv.h());
  const sapo::advantage_stats gpu = sapo::cuda::group_advantages(rewards.cd(), gpu_groups, opt, g_adv.d(), stream);
  // Moments are the CPU's (member order, double, no FMA): only batch_std's batch moments are
  // summed in another order. A float output may round the other way at a tie.
  const bool is_float = std::is_same<A, float>::value;
  expect_close(g_adv.download(), adv.host, is_float ? 2e-7 : 1e-13, is_float ? 1e-7 : 1e-13, "adv");
  for (size_t k = 0; k < static_cast<size_t>(K); ++k) {
    EXPECT(gpu.n_present[k] == cpu.n_present[k], "n_present[" << k << "]");
    EXPECT(gpu.n_pairs[k] == cpu.n_pairs[k], "n_pairs[" << k << "]");
    EXPECT(gpu.n_zero_variance[k] == cpu.n_zero_variance[k], "n_zero_variance[" << k << "]");
    expect_near(gpu.zero_variance_fraction[k], cpu.zero_variance_fraction[k], 0, 0, "zero_variance_fraction");
    expect_near(gpu.mean_reward[k], cpu.mean_reward[k], 1e-13, 1e-14, "mean_reward");
    expect_near(gpu.advantage_std[k], cpu.advantage_std[k], 1e-10, 1e-11, "advantage_std");
  }
  // Bit-identical on a second run.
  Arr<A> again = adv;
  again.upload();
  const sapo::advantage_stats gpu2 = sapo::cuda::group_advantages(rewards.cd(), gpu_groups, opt, again.d(), stream);
  EXPECT(same_bits(again.download(), g_adv.download()), "adv differs between two runs");
  EXPECT(same_bits(gpu2.advantage_std, gpu.advantage_std) && same_bits(gpu2.mean_reward, gpu.mean_reward),
         "stats differ between two runs");
}

void test_advantages_errors(cudaStream_t stream) {
  g_case = "advantages errors";
  const int64_t B = 12, K = 3;
  Arr<float> rewards(B, K, Layout::strided, 0.5f);
  rewards.at(3, 1) = 1.0f;
  Arr<int64_t> ids(B, 1, Layout::strided, 0);
  for (int64_t i = 0; i < B; ++i) ids.at(i, 0) = i % 4;
  Arr<float> adv(B, K, Layout::strided, -7.0f);
  adv.upload();
  const sapo::advantage_options opt;
  auto check = [&](const char* what) {
    rewards.upload();
    ids.upload();
    const auto gpu_err = thrown([&] {
      sapo::cuda::group_advantages(rewards.cd(), sapo::group_layout::explicit_ids(ids.cdv(), 4), opt, adv.d(), stream);
    });
    const auto cpu_err = thrown([&] {
      Arr<float> a = adv;
      sapo::group_advantages(rewards.ch(), sapo::group_layout::explicit_ids(ids.chv(), 4), opt, a.h());
    });
    expect_same_error(gpu_err, cpu_err, what);
    expect_equal(adv.download(), adv.host, "adv untouched after a rejected input");
  };
  ids.at(9, 0) = 4;
  ids.at(5, 0) = -1;
  check("unknown group id");
  rewards.at(10, 0) = std::numeric_limits<float>::infinity();
  rewards.at(7, 2) = -std::numeric_limits<float>::infinity();
  check("Inf reward before an unknown group id");
}

void test_advantages(cudaStream_t stream) {
  std::mt19937_64 rng(13);
  const sapo::normalization norms[] = {sapo::normalization::std, sapo::normalization::std_floor,
                                       sapo::normalization::none, sapo::normalization::loo,
                                       sapo::normalization::batch_std};
  const GroupSpec specs[] = {{1, 0}, {3, 0}, {8, 0}, {0, 5}, {0, 40}};
  int n = 0;
  for (auto norm : norms)
    for (const GroupSpec& spec : specs) {
      sapo::advantage_options opt;
      opt.norm = norm;
      opt.unbiased_std = n % 2 == 0;
      opt.singleton = n % 3 == 0 ? sapo::singleton_policy::raw : sapo::singleton_policy::zero;
      opt.eps = n % 4 == 0 ? 0.3 : 1e-6;  // a large eps makes std_floor's floor bite
      const int64_t B = spec.G ? spec.G * (1 + n % 7) * 3 : 5 + 37 * (n % 3);
      const int64_t K = 1 + n % 5;
      const bool discrete = n % 2 == 1;
      const double absent = n % 3 == 1 ? 0.3 : 0.0;
      if (n % 2 == 0)
        test_advantages_case<float, float>(rng, stream, B, K, spec, opt, all_layouts[n % 3], discrete, absent);
      else
        test_advantages_case<double, double>(rng, stream, B, K, spec, opt, all_layouts[n % 3], discrete, absent);
      ++n;
    }
  // Outcome mode (K = 1 through the vector views) and a large explicit batch.
  {
    g_case = "outcome_advantages";
    const int64_t B = 515;
    Arr<double> r(B, 1, Layout::strided, 0.0);
    std::mt19937_64 g(5);
    std::uniform_int_distribution<int> lvl(0, 3);
    for (int64_t i = 0; i < B; ++i) r.at(i, 0) = lvl(g) * 0.25;
    Arr<double> a(B, 1, Layout::strided, -9.0), ga = a;
    r.upload();
    ga.upload();
    sapo::advantage_options opt;
    const auto cpu = sapo::outcome_advantages(r.chv(), sapo::group_layout::contiguous(5), opt, a.hv());
    const auto gpu = sapo::cuda::outcome_advantages(r.cdv(), sapo::group_layout::contiguous(5), opt, ga.dv(), stream);
    expect_close(ga.download(), a.host, 1e-13, 1e-13, "outcome adv");
    EXPECT(gpu.n_zero_variance[0] == cpu.n_zero_variance[0], "outcome n_zero_variance");
    ++n;
  }
  test_advantages_case<float, float>(rng, stream, 2000, 4, {0, 257}, sapo::advantage_options{}, Layout::contiguous,
                                     true, 0.1);
  ++n;
  test_advantages_errors(stream);
  std::printf("group_advantages / outcome_advantages: %d cases + errors\n", n);
}

// ------------------------------------------------------------------ token broadcast

template <class O>
void test_broadcast_case(std::mt19937_64& rng, cudaStream_t stream, int64_t B, int64_t T, int64_t K, Layout layout) {
  std::ostringstream c;
  c << "broadcast B=" << B << " T=" << T << " K=" << K << " " << name(layout);
  g_case = c.str();
  std::uniform_real_distribution<double> u(-1, 1);
  std::uniform_int_distribution<int32_t> st(-1, static_cast<int32_t>(K - 1));
  Arr<float> adv(B, K, layout, 0.0f), out_adv(B, 1, layout, 0.0f);
  Arr<int32_t> step(B, T, layout, 0);
  Arr<float> mask(B, T, layout, 0.0f);
  for (int64_t i = 0; i < B; ++i) {
    out_adv.at(i, 0) = static_cast<float>(u(rng));
    for (int64_t k = 0; k < K; ++k) adv.at(i, k) = static_cast<float>(u(rng));
    for (int64_t t = 0; t < T; ++t) {
      mask.at(i, t) = u(rng) < 0.5 ? 1.0f : 0.0f;
      step.at(i, t) = mask.at(i, t) != 0 ? st(rng) : 1000;  // junk under mask 0 is never read
    }
  }
  for (auto* a : {&adv, &out_adv, &mask}) a->upload();
  step.upload();
  Arr<O> tok(B, T, layout, O(-9)), g_tok = tok;
  g_tok.upload();
  sapo::broadcast_step_advantages(adv.ch(), step.ch(), mask.ch(), tok.h());
  sapo::cuda::broadcast_step_advantages(adv.cd(), step.cd(), mask.cd(), g_tok.d(), stream);
  expect_equal(g_tok.download(), tok.host, "token advantages");
  Arr<O> otok(B, T, layout, O(-9)), g_otok = otok;
  g_otok.upload();
  sapo::broadcast_outcome_advantages(out_adv.chv(), mask.ch(), otok.h());
  sapo::cuda::broadcast_outcome_advantages(out_adv.cdv(), mask.cd(), g_otok.d(), stream);
  expect_equal(g_otok.download(), otok.host, "outcome token advantages");

  // Errors, in the CPU's order: rows in order, and within a row every mask value before the
  // step ids.
  Arr<int32_t> bad_step = step;
  Arr<float> bad_mask = mask;
  bad_step.at(0, 0) = static_cast<int32_t>(K);
  bad_mask.at(0, 0) = 1.0f;
  bad_step.upload();
  bad_mask.upload();
  Arr<O> untouched(B, T, layout, O(-3));
  untouched.upload();
  auto run = [&](const char* what) {
    const auto gpu_err = thrown([&] {
      sapo::cuda::broadcast_step_advantages(adv.cd(), bad_step.cd(), bad_mask.cd(), untouched.d(), stream);
    });
    const auto cpu_err = thrown([&] {
      Arr<O> o = untouched;
      sapo::broadcast_step_advantages(adv.ch(), bad_step.ch(), bad_mask.ch(), o.h());
    });
    expect_same_error(gpu_err, cpu_err, what);
    expect_equal(untouched.download(), untouched.host, "token advantages untouched after a rejected input");
  };
  run("broadcast: step id out of range");
  bad_mask.at(B - 1, T - 1) = 0.5f;
  bad_mask.upload();
  run("broadcast: bad step id in row 0, bad mask value in the last row");
  bad_mask.at(0, T - 1) = 0.5f;
  bad_mask.upload();
  run("broadcast: bad step id and, later in the same row, a bad mask value");
}

void test_broadcast(cudaStream_t stream) {
  std::mt19937_64 rng(14);
  const int64_t shapes[][3] = {{1, 1, 1}, {3, 7, 3}, {19, 61, 4}, {133, 300, 64}, {2, 1025, 2}};
  int n = 0;
  for (auto& s : shapes) {
    if (n % 2 == 0)
      test_broadcast_case<float>(rng, stream, s[0], s[1], s[2], all_layouts[n % 3]);
    else
      test_broadcast_case<double>(rng, stream, s[0], s[1], s[2], all_layouts[n % 3]);
    ++n;
  }
  std::printf("broadcast_step_advantages / broadcast_outcome_advantages: %d cases\n", n);
}

// ------------------------------------------------------------------ policy loss

template <class T, class M>
struct LossData {
  int64_t B = 0, Tn = 0, K = 3;
  Arr<T> logp, old_logp, ref_logp, token_adv, step_adv;
  Arr<int32_t> step;
  Arr<M> mask;

  void upload() {
    for (auto* a : {&logp, &old_logp, &ref_logp, &token_adv, &step_adv}) a->upload();
    step.upload();
    mask.upload();
  }
  sapo::policy_inputs<T, M> inputs(bool device, bool by_step, bool with_ref, bool with_step) const {
    sapo::policy_inputs<T, M> in;
    in.logp = device ? logp.cd() : logp.ch();
    in.old_logp = device ? old_logp.cd() : old_logp.ch();
    if (with_ref) in.ref_logp = device ? ref_logp.cd() : ref_logp.ch();
    if (by_step)
      in.step_advantages = device ? step_adv.cd() : step_adv.ch();
    else
      in.token_advantages = device ? token_adv.cd() : token_adv.ch();
    if (with_step || by_step) in.step = device ? step.cd() : step.ch();
    in.mask = device ? mask.cd() : mask.ch();
    return in;
  }
};

/// Segmented random responses (CPU segmentation), log-probabilities whose ratios straddle the
/// clip range, step advantages and their token broadcast. Masked-out tokens hold NaN: they
/// must never be read.
template <class T, class M>
LossData<T, M> random_loss_data(std::mt19937_64& rng, int64_t B, int64_t Tn, Layout layout, double spread) {
  LossData<T, M> d;
  d.B = B;
  d.Tn = Tn;
  Vocab v;
  v.K = d.K;
  std::vector<std::vector<int64_t>> ids;
  std::vector<std::vector<int>> m;
  random_tokens(rng, v, B, Tn, false, true, 0.3, ids, m);
  const T nan = std::numeric_limits<T>::quiet_NaN();
  d.logp = Arr<T>(B, Tn, layout, nan);
  d.old_logp = d.logp;
  d.ref_logp = d.logp;
  d.token_adv = d.logp;
  d.step_adv = Arr<T>(B, d.K, layout, nan);
  d.step = Arr<int32_t>(B, Tn, layout, 1000);
  d.mask = Arr<M>(B, Tn, layout, M(0));
  Arr<int64_t> tok(B, Tn, Layout::contiguous, 0), codes(B, d.K, Layout::contiguous, 0);
  Arr<float> mk(B, Tn, Layout::contiguous, 0.0f);
  Arr<int32_t> st(B, Tn, Layout::contiguous, 0), ns(B, 1, Layout::contiguous, 0);
  Arr<uint8_t> mal(B, 1, Layout::contiguous, 0);
  for (int64_t i = 0; i < B; ++i)
    for (int64_t t = 0; t < Tn; ++t) {
      tok.at(i, t) = ids[size_t(i)][size_t(t)];
      mk.at(i, t) = static_cast<float>(m[size_t(i)][size_t(t)]);
    }
  sapo::segment_steps(tok.ch(), mk.ch(), v.options(false, true), {st.h(), ns.hv(), codes.h(), mal.hv()});
  std::uniform_real_distribution<double> lp(-4.0, -0.05), a(-1.5, 1.5);
  std::normal_distribution<double> noise(0.0, 1.0);
  for (int64_t i = 0; i < B; ++i) {
    for (int64_t k = 0; k < d.K; ++k) d.step_adv.at(i, k) = static_cast<T>(a(rng));
    for (int64_t t = 0; t < Tn; ++t) {
      if (mk.at(i, t) == 0) continue;
      const double x = lp(rng);
      d.mask.at(i, t) = M(1);
      d.step.at(i, t) = st.at(i, t);
      d.logp.at(i, t) = static_cast<T>(x);
      d.old_logp.at(i, t) = static_cast<T>(x + spread * noise(rng));
      d.ref_logp.at(i, t) = static_cast<T>(x + 0.5 * noise(rng));
      d.token_adv.at(i, t) = st.at(i, t) >= 0 ? d.step_adv.at(i, st.at(i, t)) : T(0);
    }
  }
  return d;
}

/// Tokens where the CPU and the GPU may legitimately take different branches: the ratio (or
/// the dual-clip cap, or the k3 clamp) within rounding of a branch point, where exp on the
/// GPU and on the host may differ by an ulp. Their gradients are not compared, and the clip
/// counts may differ by their number.
template <class T, class M>
std::vector<uint8_t> fragile_tokens(const LossData<T, M>& d, const sapo::loss_options& o, bool by_step) {
  const double tol = std::is_same<T, float>::value ? 1e-5 : 1e-12;
  std::vector<uint8_t> f(static_cast<size_t>(d.B * d.Tn), 0);
  for (int64_t i = 0; i < d.B; ++i) {
    // Group mean deltas for the step / sequence ratios.
    std::vector<double> sum(static_cast<size_t>(d.K + 1), 0.0), cnt(static_cast<size_t>(d.K + 1), 0.0);
    for (int64_t t = 0; t < d.Tn; ++t) {
      if (d.mask.at(i, t) == M(0)) continue;
      const double delta = std::clamp(static_cast<double>(d.logp.at(i, t)) - d.old_logp.at(i, t), -20.0, 20.0);
      const int32_t s = d.step.at(i, t);
      sum[0] += delta;
      cnt[0] += 1;
      if (s >= 0) sum[size_t(s + 1)] += delta, cnt[size_t(s + 1)] += 1;
    }
    for (int64_t t = 0; t < d.Tn; ++t) {
      if (d.mask.at(i, t) == M(0)) continue;
      const int32_t s = d.step.at(i, t);
      double delta = std::clamp(static_cast<double>(d.logp.at(i, t)) - d.old_logp.at(i, t), -20.0, 20.0);
      if (o.ratio == sapo::ratio_level::sequence) delta = sum[0] / cnt[0];
      if (o.ratio == sapo::ratio_level::step && s >= 0) delta = sum[size_t(s + 1)] / cnt[size_t(s + 1)];
      const double rho = std::exp(delta);
      const double a = by_step ? (s >= 0 ? static_cast<double>(d.step_adv.at(i, s)) : 0.0)
                               : static_cast<double>(d.token_adv.at(i, t));
      bool fragile = std::abs(rho - (1 - o.clip_low)) < tol || std::abs(rho - (1 + o.clip_high)) < tol;
      if (o.dual_clip && a < 0) {
        const double l = std::max(-a * rho, -a * std::clamp(rho, 1 - o.clip_low, 1 + o.clip_high));
        fragile = fragile || std::abs(-a * o.dual_clip_c - l) < tol * std::abs(a * o.dual_clip_c);
      }
      if (o.kl_coef > 0 && o.kl == sapo::kl_estimator::k3) {
        const double dk = static_cast<double>(d.ref_logp.at(i, t)) - d.logp.at(i, t);
        fragile = fragile || std::abs(std::exp(dk) - dk - 1 - 10) < 1e-3;
      }
      if (fragile) f[size_t(i * d.Tn + t)] = 1;
    }
  }
  return f;
}

struct LossConfig {
  sapo::loss_options o;
  bool by_step = false, with_ref = false, with_step = false;
  std::string describe() const {
    std::ostringstream s;
    s << "ratio=" << static_cast<int>(o.ratio) << " agg=" << static_cast<int>(o.agg)
      << (by_step ? " step-adv" : " token-adv") << (with_ref ? " ref" : "") << " kl=" << static_cast<int>(o.kl)
      << " beta=" << o.kl_coef << (o.dual_clip ? " dual" : "") << " clip=" << o.clip_low << "/" << o.clip_high
      << " global=" << o.global_tokens << "/" << o.global_sequences << "/" << o.global_steps
      << " L=" << o.max_response_length
      << (o.nonfinite == sapo::nonfinite_policy::mask ? " nonfinite=mask" : "");
    return s.str();
  }
};

bool same_result(const sapo::loss_result& a, const sapo::loss_result& b) {
  return std::memcmp(&a, &b, sizeof(sapo::loss_result)) == 0;
}

/// One configuration: CPU vs GPU, GPU run twice (internal and caller workspace), and the same
/// problem in another layout on the GPU (bit-identical too).
template <class T, class M, class G>
void test_loss_case(cudaStream_t stream, const LossData<T, M>& d, const LossConfig& cfg, Layout layout,
                    const LossData<T, M>* other_layout) {
  std::ostringstream c;
  c << "policy_loss " << (std::is_same<T, float>::value ? "float" : "double") << " mask="
    << (std::is_same<M, uint8_t>::value ? "u8" : "T") << " grad=" << (std::is_same<G, float>::value ? "float" : "double")
    << " B=" << d.B << " T=" << d.Tn << " " << cfg.describe() << " " << name(layout);
  g_case = c.str();
  const auto cpu_in = d.inputs(false, cfg.by_step, cfg.with_ref, cfg.with_step);
  const auto gpu_in = d.inputs(true, cfg.by_step, cfg.with_ref, cfg.with_step);
  const G sentinel = G(-1234.5);
  Arr<G> grad(d.B, d.Tn, layout, sentinel), g_grad = grad, g_grad2 = grad;
  g_grad.upload();
  g_grad2.upload();
  const sapo::loss_result cpu = sapo::policy_loss(cpu_in, cfg.o, grad.h());
  const sapo::loss_result gpu = sapo::cuda::policy_loss(gpu_in, cfg.o, g_grad.d(), stream);

  const bool is_float = std::is_same<T, float>::value;
  const std::vector<uint8_t> fragile = fragile_tokens(d, cfg.o, cfg.by_step);
  size_t n_fragile = 0;
  for (uint8_t f : fragile) n_fragile += f;
  // Store index -> token, for the fragile exemption.
  std::vector<int64_t> token_of(grad.host.size(), -1);
  for (int64_t i = 0; i < d.B; ++i)
    for (int64_t t = 0; t < d.Tn; ++t) token_of[size_t(i * grad.rs + t * grad.cs)] = i * d.Tn + t;
  double scale = 0;
  for (int64_t i = 0; i < d.B; ++i)
    for (int64_t t = 0; t < d.Tn; ++t) scale = std::max(scale, std::abs(static_cast<double>(grad.at(i, t))));
  const auto g_host = g_grad.download();
  expect_close(g_host, grad.host, is_float ? 2e-5 : 1e-11, (is_float ? 1e-6 : 1e-13) * scale, "grad",
               [&](size_t k) { return token_of[k] >= 0 && fragile[size_t(token_of[k])]; });

  EXPECT(gpu.n_tokens == cpu.n_tokens, "n_tokens gpu " << gpu.n_tokens << " cpu " << cpu.n_tokens);
  EXPECT(gpu.n_sequences == cpu.n_sequences, "n_sequences gpu " << gpu.n_sequences << " cpu " << cpu.n_sequences);
  EXPECT(gpu.n_steps == cpu.n_steps, "n_steps gpu " << gpu.n_steps << " cpu " << cpu.n_steps);
  EXPECT(gpu.n_nonfinite_masked == cpu.n_nonfinite_masked,
         "n_nonfinite_masked gpu " << gpu.n_nonfinite_masked << " cpu " << cpu.n_nonfinite_masked);
  const double rel = is_float ? 2e-5 : 1e-11, abs = is_float ? 2e-6 : 1e-12;
  expect_near(gpu.loss, cpu.loss, rel, abs, "loss");
  expect_near(gpu.ratio_mean, cpu.ratio_mean, rel, abs, "ratio_mean");
  expect_near(gpu.ratio_max, cpu.ratio_max, rel, abs, "ratio_max");
  expect_near(gpu.approx_kl_old, cpu.approx_kl_old, rel, abs, "approx_kl_old");
  expect_near(gpu.approx_kl_old_k3, cpu.approx_kl_old_k3, rel, abs, "approx_kl_old_k3");
  expect_near(gpu.kl_ref, cpu.kl_ref, rel, abs, "kl_ref");
  const double n = std::max<double>(1.0, static_cast<double>(cpu.n_tokens));
  const double clip_tol = static_cast<double>(n_fragile) / n + 1e-12;
  expect_near(gpu.clip_frac_low, cpu.clip_frac_low, 0, clip_tol, "clip_frac_low");
  expect_near(gpu.clip_frac_high, cpu.clip_frac_high, 0, clip_tol, "clip_frac_high");
  expect_near(gpu.clip_frac_dual, cpu.clip_frac_dual, 0, clip_tol, "clip_frac_dual");

  // Run to run, and with a caller-provided workspace: the same bits.
  const size_t bytes = sapo::cuda::policy_loss_workspace_bytes(gpu_in, cfg.o);
  void* ws = nullptr;
  cuda_ok(cudaMalloc(&ws, bytes), "cudaMalloc workspace");
  const sapo::loss_result gpu2 = sapo::cuda::policy_loss(gpu_in, cfg.o, g_grad2.d(), stream, {ws, bytes});
  cudaFree(ws);
  EXPECT(same_result(gpu, gpu2), "loss_result differs between two runs: loss " << gpu.loss << " vs " << gpu2.loss);
  EXPECT(same_bits(g_host, g_grad2.download()), "grad differs between two runs");

  if (other_layout) {
    const auto o_in = other_layout->inputs(true, cfg.by_step, cfg.with_ref, cfg.with_step);
    Arr<G> o_grad(d.B, d.Tn, Layout::column_major, sentinel);
    o_grad.upload();
    const sapo::loss_result gpu3 = sapo::cuda::policy_loss(o_in, cfg.o, o_grad.d(), stream);
    EXPECT(same_result(gpu, gpu3), "loss_result differs between layouts: loss " << gpu.loss << " vs " << gpu3.loss);
    const auto o_host = o_grad.download();
    bool same = true;
    for (int64_t i = 0; i < d.B && same; ++i)
      for (int64_t t = 0; t < d.Tn && same; ++t)
        same = std::memcmp(&g_host[size_t(i * grad.rs + t * grad.cs)], &o_host[size_t(i * o_grad.rs + t * o_grad.cs)],
                           sizeof(G)) == 0;
    EXPECT(same, "grad differs between layouts");
  }
}

template <class T, class M, class G>
void test_loss_errors(cudaStream_t stream) {
  std::mt19937_64 rng(21);
  const int64_t B = 9, Tn = 37;
  LossData<T, M> d = random_loss_data<T, M>(rng, B, Tn, Layout::strided, 0.3);
  // Masked-in tokens, in row-major order.
  std::vector<std::pair<int64_t, int64_t>> on;
  for (int64_t i = 0; i < B; ++i)
    for (int64_t t = 0; t < Tn; ++t)
      if (d.mask.at(i, t) != M(0)) on.emplace_back(i, t);
  const T nan = std::numeric_limits<T>::quiet_NaN(), inf = std::numeric_limits<T>::infinity();
  auto run = [&](const LossData<T, M>& bad, const LossConfig& cfg, const char* what) {
    g_case = std::string("policy_loss errors: ") + what;
    LossData<T, M> b = bad;
    b.upload();
    Arr<G> grad(B, Tn, Layout::strided, G(-77));
    grad.upload();
    const auto gpu_err = thrown([&] {
      sapo::cuda::policy_loss(b.inputs(true, cfg.by_step, cfg.with_ref, cfg.with_step), cfg.o, grad.d(), stream);
    });
    const auto cpu_err = thrown([&] {
      Arr<G> g = grad;
      sapo::policy_loss(b.inputs(false, cfg.by_step, cfg.with_ref, cfg.with_step), cfg.o, g.h());
    });
    expect_same_error(gpu_err, cpu_err, what);
    expect_equal(grad.download(), grad.host, "grad untouched after a rejected input");
  };
  LossConfig cfg;
  cfg.with_ref = true;
  cfg.o.kl_coef = 0.1;
  {
    LossData<T, M> b = d;
    b.logp.at(on[20].first, on[20].second) = nan;
    b.ref_logp.at(on[40].first, on[40].second) = inf;
    run(b, cfg, "NaN logp, then Inf ref_logp");
    b.old_logp.at(on[5].first, on[5].second) = -inf;
    run(b, cfg, "-Inf old_logp first");
    b.mask.at(on[3].first, on[3].second) = M(2);
    run(b, cfg, "mask value 2 first");
  }
  {
    LossData<T, M> b = d;
    b.token_adv.at(on[7].first, on[7].second) = nan;
    run(b, cfg, "NaN token advantage");
    LossConfig sc = cfg;
    sc.by_step = true;
    LossData<T, M> s = d;
    const auto [i, t] = on[11];
    s.step_adv.at(i, std::max(0, s.step.at(i, t))) = nan;
    s.step.at(i, t) = std::max(0, s.step.at(i, t));
    run(s, sc, "NaN step advantage");
    s.step.at(on[2].first, on[2].second) = static_cast<int32_t>(s.K);
    s.logp.at(on[2].first, on[2].second) = nan;
    run(s, sc, "step id K (and NaN logp) at one token: the step id is named");
  }
  // A token dropped under nonfinite_policy::mask, everything else fine: no error, and the
  // count must match (compared in test_loss); a workspace that is too small is an error.
  {
    g_case = "policy_loss: workspace too small";
    LossData<T, M> b = d;
    b.upload();
    Arr<G> grad(B, Tn, Layout::strided, G(-77));
    grad.upload();
    const auto in = b.inputs(true, false, true, false);
    const size_t bytes = sapo::cuda::policy_loss_workspace_bytes(in, cfg.o);
    void* ws = nullptr;
    cuda_ok(cudaMalloc(&ws, bytes), "cudaMalloc");
    const auto err = thrown([&] { sapo::cuda::policy_loss(in, cfg.o, grad.d(), stream, {ws, bytes - 1}); });
    cudaFree(ws);
    EXPECT(err.has_value() && err->argument() == "workspace", "expected a workspace error");
    expect_equal(grad.download(), grad.host, "grad untouched after a rejected workspace");
  }
}

template <class T, class M, class G>
void test_loss_types(cudaStream_t stream, uint64_t seed, int& n) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> u(0, 1);
  const sapo::ratio_level ratios[] = {sapo::ratio_level::token, sapo::ratio_level::step, sapo::ratio_level::sequence};
  const sapo::aggregation aggs[] = {sapo::aggregation::token_mean, sapo::aggregation::seq_mean_token_mean,
                                    sapo::aggregation::seq_mean_token_sum, sapo::aggregation::seq_mean_token_sum_norm,
                                    sapo::aggregation::step_mean};
  const sapo::kl_estimator kls[] = {sapo::kl_estimator::k1, sapo::kl_estimator::k2, sapo::kl_estimator::k3};
  const int64_t shapes[][2] = {{1, 1}, {3, 7}, {19, 61}, {5, 300}, {64, 33}, {7, 1030}};
  int local = 0;
  for (auto ratio : ratios)
    for (auto agg : aggs)
      for (int by_step = 0; by_step < 2; ++by_step) {
        LossConfig cfg;
        cfg.o.ratio = ratio;
        cfg.o.agg = agg;
        cfg.by_step = by_step;
        cfg.with_step = true;
        const int v = local++;
        cfg.with_ref = v % 3 != 0;
        if (cfg.with_ref) {
          cfg.o.kl = kls[v % 3];
          cfg.o.kl_coef = v % 4 == 1 ? 0.0 : 0.05;
        }
        cfg.o.dual_clip = v % 2 == 1;
        cfg.o.dual_clip_c = 2.5;
        cfg.o.clip_low = v % 5 == 2 ? 0.1 : 0.2;
        cfg.o.clip_high = v % 5 == 2 ? 0.28 : 0.2;
        if (v % 4 == 3) {  // data-parallel normalizers
          cfg.o.global_tokens = 1000;
          cfg.o.global_sequences = 17;
          cfg.o.global_steps = 51;
        }
        if (v % 6 == 4) cfg.o.max_response_length = 512;
        if (v % 7 == 5) cfg.o.nonfinite = sapo::nonfinite_policy::mask;
        const int64_t* s = shapes[v % 6];
        const Layout layout = all_layouts[v % 3];
        LossData<T, M> d = random_loss_data<T, M>(rng, s[0], s[1], layout, v % 2 ? 0.3 : 0.05);
        if (cfg.o.nonfinite == sapo::nonfinite_policy::mask) {
          // Non-finite values on a few masked-in tokens (and one step advantage): dropped.
          int placed = 0;
          for (int64_t i = 0; i < d.B && placed < 4; ++i)
            for (int64_t t = 0; t < d.Tn && placed < 4; ++t)
              if (d.mask.at(i, t) != M(0) && u(rng) < 0.05) {
                Arr<T>& a = placed % 3 == 0 ? d.logp : placed % 3 == 1 ? d.old_logp : d.token_adv;
                a.at(i, t) = placed % 2 ? std::numeric_limits<T>::infinity() : std::numeric_limits<T>::quiet_NaN();
                ++placed;
              }
          if (d.B > 1) d.step_adv.at(d.B - 1, 1) = std::numeric_limits<T>::quiet_NaN();
          if (cfg.with_ref && d.B > 2) d.ref_logp.at(1, d.Tn / 2) = std::numeric_limits<T>::quiet_NaN();
        }
        d.upload();
        LossData<T, M> other;
        const bool cross = v % 4 == 0;
        if (cross) {
          other = d;
          for (auto* p : {&other.logp, &other.old_logp, &other.ref_logp, &other.token_adv})
            *p = relayout(*p, Layout::column_major, std::numeric_limits<T>::quiet_NaN());
          other.step_adv = relayout(d.step_adv, Layout::column_major, std::numeric_limits<T>::quiet_NaN());
          other.step = relayout(d.step, Layout::column_major, int32_t(1000));
          other.mask = relayout(d.mask, Layout::column_major, M(0));
          other.upload();
        }
        test_loss_case<T, M, G>(stream, d, cfg, layout, cross ? &other : nullptr);
        ++n;
      }
  // A larger batch: many blocks feed the final reduction.
  {
    LossConfig cfg;
    cfg.o.ratio = sapo::ratio_level::step;
    cfg.o.agg = sapo::aggregation::step_mean;
    cfg.by_step = true;
    cfg.with_ref = true;
    cfg.o.kl_coef = 0.01;
    LossData<T, M> d = random_loss_data<T, M>(rng, 700, 129, Layout::contiguous, 0.3);
    d.upload();
    test_loss_case<T, M, G>(stream, d, cfg, Layout::contiguous, nullptr);
    ++n;
  }
  test_loss_errors<T, M, G>(stream);
}

void test_policy_loss(cudaStream_t stream) {
  int n = 0;
  test_loss_types<float, float, float>(stream, 31, n);
  test_loss_types<double, double, double>(stream, 32, n);
  test_loss_types<float, uint8_t, double>(stream, 33, n);
  std::printf("policy_loss: %d cases + errors\n", n);
}

}  // namespace

int main() {
  int devices = 0;
  const cudaError_t e = cudaGetDeviceCount(&devices);
  if (e != cudaSuccess || devices == 0) {
    std::printf("SKIPPED: no CUDA device\n");
    return 77;
  }
  cudaStream_t stream = nullptr;
  cuda_ok(cudaStreamCreate(&stream), "cudaStreamCreate");
  try {
    test_segment(stream);
    test_rewards(stream);
    test_advantages(stream);
    test_broadcast(stream);
    test_policy_loss(stream);
  } catch (const std::exception& ex) {
    std::fprintf(stderr, "FAIL [%s]: unexpected exception: %s\n", g_case.c_str(), ex.what());
    ++g_failures;
  }
  cudaStreamDestroy(stream);
  if (g_failures > 0) {
    std::printf("FAILED: %ld of %ld checks\n", g_failures, g_checks);
    return 1;
  }
  std::printf("PASSED: %ld checks\n", g_checks);
  return 0;
}
