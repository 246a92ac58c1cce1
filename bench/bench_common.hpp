// Shared by the Google Benchmark executables: our own flags (stripped from argv before
// benchmark::Initialize), benchmark naming, and a one-shape cache of the inputs (the
// benchmarks are registered shape by shape, so each shape is generated once).
#pragma once

#include <benchmark/benchmark.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "problems.hpp"

namespace sapo_bench {

struct Flags {
  bool quick = false;
  std::vector<int> threads{1, 2};
  int64_t reference_max_tokens = 512 * 2048;  // the reference runs only up to this many tokens
  bool check_only = false;
};

/// Reads and removes --sapo_quick, --sapo_threads=1,2, --sapo_reference_max_tokens=N,
/// --sapo_check_only and --sapo_huge_pages (problems.hpp) from argv.
inline Flags parse_flags(int& argc, char** argv) {
  Flags f;
  int out = 1;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&](const char* key) -> const char* {
      const size_t n = std::strlen(key);
      return a.compare(0, n, key) == 0 ? argv[i] + n : nullptr;
    };
    if (a == "--sapo_quick") {
      f.quick = true;
    } else if (a == "--sapo_check_only") {
      f.check_only = true;
    } else if (a == "--sapo_huge_pages") {
      g_huge_pages = true;
    } else if (const char* v = value("--sapo_threads=")) {
      f.threads.clear();
      std::stringstream ss(v);
      std::string item;
      while (std::getline(ss, item, ','))
        if (!item.empty()) f.threads.push_back(std::atoi(item.c_str()));
    } else if (const char* v = value("--sapo_reference_max_tokens=")) {
      f.reference_max_tokens = std::atoll(v);
    } else {
      argv[out++] = argv[i];
    }
  }
  argc = out;
  return f;
}

/// "loss/sapo/B:2048/T:4096/K:4/G:16/threads:1" (Google Benchmark appends "/real_time").
inline std::string bench_name(const std::string& kernel, const std::string& impl, const Shape& s, int threads) {
  return kernel + "/" + impl + "/" + s.str() + "/threads:" + std::to_string(threads);
}

/// Registers one benchmark, timed in real milliseconds. fn(state, warm_up): warm_up is true on
/// the first of the calls Google Benchmark makes (iteration estimate, repetitions), so each
/// benchmark gets one untimed warm-up call.
inline void register_timed(const std::string& kernel, const std::string& impl, const Shape& s, int threads,
                           std::function<void(benchmark::State&, bool)> fn) {
  auto first = std::make_shared<bool>(true);
  benchmark::RegisterBenchmark(bench_name(kernel, impl, s, threads).c_str(), [fn, first](benchmark::State& st) {
    const bool warm_up = *first;
    *first = false;
    fn(st, warm_up);
  })
      ->UseRealTime()
      ->Unit(benchmark::kMillisecond);
}

/// Holds the inputs of one shape at a time.
template <class P>
class ShapeCache {
 public:
  explicit ShapeCache(std::function<std::unique_ptr<P>(const Shape&)> make) : make_(std::move(make)) {}
  P& get(const Shape& s) {
    if (!p_ || !(shape_ == s)) {
      p_.reset();  // free the previous shape first
      p_ = make_(s);
      shape_ = s;
    }
    return *p_;
  }

 private:
  std::function<std::unique_ptr<P>(const Shape&)> make_;
  std::unique_ptr<P> p_;
  Shape shape_;
};

/// The common settings of every benchmark: wall-clock time, milliseconds, and the
/// throughput counters (bytes = the kernel's minimal bytes, items = tokens).
inline void finish_state(benchmark::State& state, const Shape& s, double bytes, int threads) {
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()) * s.tokens());
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * static_cast<int64_t>(bytes));
  state.counters["bytes"] = benchmark::Counter(bytes);
  state.counters["tokens"] = benchmark::Counter(static_cast<double>(s.tokens()));
  state.counters["threads"] = benchmark::Counter(threads);
}

/// |got - want| <= atol + rtol |want| everywhere; prints the first failure.
template <class A, class B>
bool all_close(const char* what, const A* got, const B* want, size_t n, double rtol, double atol) {
  for (size_t j = 0; j < n; ++j) {
    const double g = static_cast<double>(got[j]), w = static_cast<double>(want[j]);
    if (!(std::fabs(g - w) <= atol + rtol * std::fabs(w))) {
      std::fprintf(stderr, "check failed: %s at %zu: got %.9g, want %.9g\n", what, j, g, w);
      return false;
    }
  }
  return true;
}

inline bool close(const char* what, double got, double want, double rtol, double atol) {
  return all_close(what, &got, &want, 1, rtol, atol);
}

}  // namespace sapo_bench
