// Peak extra memory of one call, per implementation, at the 2048x4096 shape, one thread.
//
// This executable replaces malloc, free, calloc, realloc, posix_memalign, aligned_alloc,
// memalign, valloc and pvalloc (forwarding to glibc's __libc_* entry points) and counts the
// live heap bytes with malloc_usable_size, so it sees operator new (libstdc++ calls malloc)
// and libtorch's CPU allocator (posix_memalign) alike. It checks itself on known
// allocations before measuring.
//
// For one call: base = live bytes before, peak = the most live bytes during, after = live
// bytes when the call returned (its results still held). retained = after - base is the
// output the call allocated itself (libtorch's logp.grad or result tensors, the
// reference's result); sapo and the rooflines write into caller buffers, so theirs is 0.
// peak extra = peak - base - retained: the bytes beyond the inputs and the output.
// Thread stacks (mmap) are not heap and are not counted; the measurement is single-threaded.
//
// Usage: bench_memory [--out=FILE.jsonl] [--sapo_skip_reference]
#include <malloc.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>
#include <vector>

#include "impls.hpp"
#include "problems.hpp"
#include "torch_impls.hpp"

// ------------------------------------------------------------------ allocation tracking

namespace {
std::atomic<int64_t> g_live{0};
std::atomic<int64_t> g_peak{0};

inline void note_alloc(void* p) {
  if (!p) return;
  const auto n = static_cast<int64_t>(malloc_usable_size(p));
  const int64_t now = g_live.fetch_add(n, std::memory_order_relaxed) + n;
  int64_t peak = g_peak.load(std::memory_order_relaxed);
  while (now > peak && !g_peak.compare_exchange_weak(peak, now, std::memory_order_relaxed)) {
  }
}
inline void note_free(void* p) {
  if (p) g_live.fetch_sub(static_cast<int64_t>(malloc_usable_size(p)), std::memory_order_relaxed);
}
}  // namespace

extern "C" {
void* __libc_malloc(size_t);
void __libc_free(void*);
void* __libc_calloc(size_t, size_t);
void* __libc_realloc(void*, size_t);
void* __libc_memalign(size_t, size_t);
void* __libc_valloc(size_t);
void* __libc_pvalloc(size_t);

void* malloc(size_t n) noexcept {
  void* p = __libc_malloc(n);
  note_alloc(p);
  return p;
}
void free(void* p) noexcept {
  note_free(p);
  __libc_free(p);
}
void* calloc(size_t a, size_t b) noexcept {
  void* p = __libc_calloc(a, b);
  note_alloc(p);
  return p;
}
void* realloc(void* p, size_t n) noexcept {
  const auto old = p ? static_cast<int64_t>(malloc_usable_size(p)) : 0;
  void* q = __libc_realloc(p, n);
  if (q) {
    g_live.fetch_sub(old, std::memory_order_relaxed);
    note_alloc(q);
  } else if (n == 0 && p) {
    g_live.fetch_sub(old, std::memory_order_relaxed);  // realloc(p, 0) freed p
  }
  return q;
}
int posix_memalign(void** out, size_t align, size_t n) noexcept {
  if (align < sizeof(void*) || (align & (align - 1)) != 0) return EINVAL;
  void* p = __libc_memalign(align, n);
  if (!p && n) return ENOMEM;
  note_alloc(p);
  *out = p;
  return 0;
}
void* aligned_alloc(size_t align, size_t n) noexcept {
  void* p = __libc_memalign(align, n);
  note_alloc(p);
  return p;
}
void* memalign(size_t align, size_t n) noexcept {
  void* p = __libc_memalign(align, n);
  note_alloc(p);
  return p;
}
void* valloc(size_t n) noexcept {
  void* p = __libc_valloc(n);
  note_alloc(p);
  return p;
}
void* pvalloc(size_t n) noexcept {
  void* p = __libc_pvalloc(n);
  note_alloc(p);
  return p;
}
}  // extern "C"

// ------------------------------------------------------------------ measuring

using namespace sapo_bench;

namespace {

constexpr double MiB = 1024.0 * 1024.0;

struct Mem {
  int64_t peak_extra = 0, retained = 0;
};

/// Runs f once (its result held until `after` is read) and returns the peak extra bytes.
template <class F>
Mem measure(F&& f) {
  const int64_t base = g_live.load();
  g_peak.store(base);
  int64_t after = 0, peak = 0;
  {
    auto result = f();
    after = g_live.load();
    peak = g_peak.load();
    asm volatile("" : : "r"(&result) : "memory");
  }
  Mem m;
  m.retained = after - base;
  m.peak_extra = peak - base - m.retained;
  return m;
}

/// The counters see every allocation path with the right size, and frees bring them back.
bool verify_tracking() {
  const int64_t size = 10 << 20;
  bool ok = true;
  auto expect = [&](const char* what, int64_t delta, int64_t want) {
    // malloc_usable_size may round up by a little (header, page).
    const bool good = delta >= want && delta <= want + 8192;
    if (!good) std::fprintf(stderr, "tracking check failed: %s: delta %lld, want %lld\n", what, (long long)delta, (long long)want);
    ok &= good;
  };
  int64_t b = g_live.load();
  void* volatile p = std::malloc(size);
  expect("malloc", g_live.load() - b, size);
  p = std::realloc(p, 2 * size);
  expect("realloc (grow)", g_live.load() - b, 2 * size);
  std::free(p);
  expect("free", g_live.load() - b + size, size);  // back to 0
  void* volatile q = nullptr;
  void* aligned = nullptr;
  if (posix_memalign(&aligned, 64, size) != 0) return false;
  q = aligned;
  expect("posix_memalign", g_live.load() - b, size);
  std::free(q);
  q = std::aligned_alloc(4096, size);
  expect("aligned_alloc", g_live.load() - b, size);
  std::free(q);
  q = std::calloc(size / 8, 8);
  expect("calloc", g_live.load() - b, size);
  std::free(q);
  char* volatile c = new char[size];
  expect("operator new[]", g_live.load() - b, size);
  delete[] c;
  {
    const TorchProbe t(size);
    expect("libtorch tensor", g_live.load() - b, size);
  }
  expect("all freed", g_live.load() - b + size, size);
  // peak tracking: a transient allocation raises the peak but not the live count
  const int64_t base = g_live.load();
  g_peak.store(base);
  void* volatile transient = std::malloc(3 * size);
  std::free(transient);
  expect("peak of a freed block", g_peak.load() - base, 3 * size);
  std::fprintf(stderr, "allocation tracking %s (malloc, realloc, posix_memalign, aligned_alloc, calloc, new[], libtorch)\n",
               ok ? "verified" : "FAILED");
  return ok;
}

struct Row {
  std::string kernel, impl;
  Shape s;
  Mem m;
  double input_bytes;
};

void report(std::FILE* out, const Row& r) {
  std::printf("  %-22s %-10s peak extra %9.1f MiB = %6.1f%% of the inputs (%.1f MiB); output allocated by the call %.1f MiB\n",
              r.kernel.c_str(), r.impl.c_str(), r.m.peak_extra / MiB, 100.0 * r.m.peak_extra / r.input_bytes,
              r.input_bytes / MiB, r.m.retained / MiB);
  std::fflush(stdout);
  if (out)
    std::fprintf(out,
                 "{\"kernel\": \"%s\", \"impl\": \"%s\", \"B\": %lld, \"T\": %lld, \"K\": %lld, \"G\": %lld, "
                 "\"threads\": 1, \"peak_extra_bytes\": %lld, \"output_bytes\": %lld, \"input_bytes\": %.0f}\n",
                 r.kernel.c_str(), r.impl.c_str(), (long long)r.s.B, (long long)r.s.T, (long long)r.s.K,
                 (long long)r.s.G, (long long)r.m.peak_extra, (long long)r.m.retained, r.input_bytes);
}

}  // namespace

int main(int argc, char** argv) {
  std::string out_path;
  bool skip_reference = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a.rfind("--out=", 0) == 0)
      out_path = a.substr(6);
    else if (a == "--sapo_skip_reference")
      skip_reference = true;
    else {
      std::fprintf(stderr, "usage: %s [--out=FILE.jsonl] [--sapo_skip_reference]\n", argv[0]);
      return 2;
    }
  }
  if (!verify_tracking()) return 1;
  std::FILE* out = out_path.empty() ? nullptr : std::fopen(out_path.c_str(), "w");
  if (!out_path.empty() && !out) {
    std::perror(out_path.c_str());
    return 1;
  }
  const Shape s = memory_shape();
  std::printf("peak extra memory of one call, %s, 1 thread\n", s.str().c_str());
  torch_set_threads(1);

  {
    auto p = make_loss_problem(s);
    for (bool step_kl : {false, true}) {
      const std::string kernel = step_kl ? "loss_step_kl" : "loss";
      const double in_bytes = loss_input_bytes(s, step_kl);
      SapoLoss sapo_run{*p, step_kl};
      sapo_run.run(1);  // warm-up
      report(out, {kernel, "sapo", s, measure([&] { return sapo_run.run(1); }), in_bytes});
      {
        TorchLoss t(*p, step_kl);
        t.run();  // warm-up (thread pools, autograd engine)
        t.release();
        report(out, {kernel, "libtorch", s, measure([&] { return t.run(); }), in_bytes});
      }
      if (!skip_reference) {
        const RefLossInputs ri = make_ref_loss_inputs(*p);
        report(out, {kernel, "reference", s, measure([&] { return reference_loss(ri, step_kl); }), in_bytes});
      }
      for (bool two_pass : {false, true}) {
        LossRoofline roof{*p, step_kl, two_pass};
        report(out, {kernel, two_pass ? "roofline_2pass" : "roofline", s, measure([&] { return roof.run(1); }),
                     in_bytes});
      }
    }
  }
  {
    const Batch b = make_batch(s);
    AdvOutputs o(s);
    for (bool bcast : {false, true})
      for (int id_bytes : {4, 8}) {
        const std::string kernel = std::string(bcast ? "advantages_bcast_i" : "advantages_i") + (id_bytes == 8 ? "64" : "32");
        const double in_bytes = adv_input_bytes(s, id_bytes);
        auto sapo_once = [&] {
          return id_bytes == 8 ? SapoAdvantages<int64_t>{b, o, bcast}.run(1) : SapoAdvantages<int32_t>{b, o, bcast}.run(1);
        };
        sapo_once();
        report(out, {kernel, "sapo", s, measure(sapo_once), in_bytes});
        {
          TorchAdvantages t(b, id_bytes == 8, bcast);
          t.run();
          t.release();
          report(out, {kernel, "libtorch", s, measure([&] { t.run(); return 0; }), in_bytes});
        }
        if (!skip_reference && id_bytes == 4) {  // the reference reads int64 ids whatever the input
          const RefAdvInputs ri = make_ref_adv_inputs(b);
          report(out, {kernel, "reference", s, measure([&] { return reference_advantages(ri, bcast); }), in_bytes});
        }
        auto roof_once = [&] {
          if (id_bytes == 8)
            AdvRoofline<int64_t>{b, o, bcast}.run(1);
          else
            AdvRoofline<int32_t>{b, o, bcast}.run(1);
          return 0;
        };
        report(out, {kernel, "roofline", s, measure(roof_once), in_bytes});
      }
  }
  if (out) std::fclose(out);
  return 0;
}
