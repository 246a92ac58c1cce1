// Benchmark inputs: the shapes, realistic batches (interleaved thinking + SID tokens,
// ragged response lengths, a few malformed responses), and the "minimal bytes" of each
// kernel (every input read once + every output written once). No libtorch here.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <random>
#include <string>
#include <vector>

#include <sys/mman.h>

namespace sapo_bench {

struct Shape {
  int64_t B = 0, T = 0, K = 3, G = 8;
  int64_t tokens() const { return B * T; }
  bool operator==(const Shape& o) const { return B == o.B && T == o.T && K == o.K && G == o.G; }
  /// "B:2048/T:4096/K:4/G:16"
  std::string str() const {
    return "B:" + std::to_string(B) + "/T:" + std::to_string(T) + "/K:" + std::to_string(K) + "/G:" +
           std::to_string(G);
  }
};

/// Shapes, smallest to largest. --quick keeps 64x512, 512x2048 and 2048x4096.
inline std::vector<Shape> bench_shapes(bool quick) {
  if (quick) return {{64, 512, 3, 8}, {512, 2048, 4, 16}, {2048, 4096, 4, 16}};
  return {{64, 512, 3, 8},    {256, 1024, 4, 16},  {512, 2048, 3, 8},   {1024, 2048, 4, 16},
          {1024, 4096, 3, 16}, {2048, 4096, 3, 8}, {2048, 4096, 4, 16}};
}

/// The shape of the peak-memory measurement.
inline Shape memory_shape() { return {2048, 4096, 4, 16}; }

/// --sapo_huge_pages: buffers of 2 MiB or more ask the kernel for 2 MiB pages
/// (madvise(MADV_HUGEPAGE): transparent huge pages in "madvise" or "always" mode). Off by
/// default: then the inputs sit on the pages a PyTorch tensor of this size gets, 4 KiB
/// where transparent huge pages are in "madvise" mode. It shows what the page walks cost
/// (docs/benchmarks.md); libtorch's own temporaries stay on its allocator's pages.
inline bool g_huge_pages = false;

/// 64-byte aligned (2 MiB with g_huge_pages), zero-filled (so every page is touched before
/// timing), non-copyable.
template <class T>
class Buffer {
 public:
  Buffer() = default;
  explicit Buffer(size_t n) : n_(n) {
    constexpr size_t huge = size_t(2) << 20;
    const bool on_huge_pages = g_huge_pages && n * sizeof(T) >= huge;
    const size_t align = on_huge_pages ? huge : 64;
    const size_t bytes = std::max(align, (n * sizeof(T) + align - 1) / align * align);
    data_ = static_cast<T*>(std::aligned_alloc(align, bytes));
    if (!data_) throw std::bad_alloc();
    // Advice only: where the kernel has no huge pages to give, the buffer keeps small ones.
    if (on_huge_pages) (void)madvise(data_, bytes, MADV_HUGEPAGE);
    std::memset(static_cast<void*>(data_), 0, bytes);
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  Buffer(Buffer&& o) noexcept : data_(o.data_), n_(o.n_) { o.data_ = nullptr, o.n_ = 0; }
  Buffer& operator=(Buffer&& o) noexcept {
    std::swap(data_, o.data_);
    std::swap(n_, o.n_);
    return *this;
  }
  ~Buffer() { std::free(data_); }
  T* data() { return data_; }
  const T* data() const { return data_; }
  size_t size() const { return n_; }
  size_t bytes() const { return n_ * sizeof(T); }
  T& operator[](size_t i) { return data_[i]; }
  const T& operator[](size_t i) const { return data_[i]; }

 private:
  T* data_ = nullptr;
  size_t n_ = 0;
};

/// A Qwen-sized vocabulary: text ids below 151643, eos 151645, pad 151643, and K levels of
/// 256 SID codes each from 151669 on (level k: [sid_lo(k), sid_lo(k) + 256)).
struct Vocab {
  static constexpr int64_t n_text = 151643, pad = 151643, eos = 151645, sid_base = 151669, codes = 256;
  static int64_t sid_lo(int64_t k) { return sid_base + codes * k; }
};

/// Realistic batch in the interleaved layout (SPEC §1): each row is a response of ragged
/// length (T/4..T), K thinking blocks of random length each closed by the SID token of its
/// level, an eos (tail token, step -1), then padding (mask 0). 3% of the rows are
/// malformed: half miss their last SID token (unfinished step), half put one SID token at
/// the wrong level. Targets are per group (G consecutive rows); a generated code matches
/// the target with probability 0.8, 0.6, 0.5, 0.4 at levels 0..3 (then 0.3), so the
/// prefix rewards vary within groups.
struct Batch {
  Shape shape;
  Buffer<int64_t> tokens64;  // (B, T)
  Buffer<int32_t> tokens32;  // (B, T), the same ids
  Buffer<float> mask;        // (B, T) 0/1
  Buffer<int32_t> step;      // (B, T) the step ids segment_steps must produce
  Buffer<int64_t> targets;   // (B, K)
};

inline Batch make_batch(const Shape& s, uint64_t seed = 12345) {
  const int64_t B = s.B, T = s.T, K = s.K;
  Batch b;
  b.shape = s;
  const size_t n = static_cast<size_t>(B * T);
  b.tokens64 = Buffer<int64_t>(n);
  b.tokens32 = Buffer<int32_t>(n);
  b.mask = Buffer<float>(n);
  b.step = Buffer<int32_t>(n);
  b.targets = Buffer<int64_t>(static_cast<size_t>(B * K));
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int64_t> text(0, Vocab::n_text - 1), code(0, Vocab::codes - 1);
  std::uniform_int_distribution<int64_t> len(std::max<int64_t>(2 * K + 2, T / 4), T);
  std::uniform_real_distribution<double> u(0, 1);
  const double p_match[] = {0.8, 0.6, 0.5, 0.4};
  for (int64_t g = 0; g < B / s.G; ++g)
    for (int64_t k = 0; k < K; ++k) {
      const int64_t y = code(rng);
      for (int64_t j = 0; j < s.G; ++j) b.targets[static_cast<size_t>((g * s.G + j) * K + k)] = y;
    }
  std::vector<int64_t> cuts(static_cast<size_t>(K + 1));
  for (int64_t i = 0; i < B; ++i) {
    int64_t* tok = b.tokens64.data() + i * T;
    float* m = b.mask.data() + i * T;
    int32_t* st = b.step.data() + i * T;
    const int64_t L = len(rng);  // response tokens: K blocks (thinking + SID) + eos
    const double defect = u(rng);
    const bool missing_last = defect < 0.015, wrong_level = defect >= 0.015 && defect < 0.03;
    // K blocks of at least one token (the SID token) over L - 1 tokens.
    const int64_t body = L - 1;
    cuts[0] = 0;
    cuts[static_cast<size_t>(K)] = body;
    // K - 1 distinct cut points in [1, body - 1] (body >= 2K + 1 > K): every block has >= 1 token.
    std::uniform_int_distribution<int64_t> cut(1, body - 1);
    for (int64_t k = 1; k < K; ++k) {
      int64_t c;
      do c = cut(rng);
      while (std::find(cuts.begin() + 1, cuts.begin() + k, c) != cuts.begin() + k);
      cuts[static_cast<size_t>(k)] = c;
    }
    std::sort(cuts.begin() + 1, cuts.begin() + K);
    int64_t t = 0;
    const int64_t wrong_k = std::uniform_int_distribution<int64_t>(0, K - 1)(rng);
    for (int64_t k = 0; k < K; ++k) {
      const int64_t end = cuts[static_cast<size_t>(k + 1)];  // the SID token sits at end - 1
      for (; t < end - 1; ++t) {
        tok[t] = text(rng);
        m[t] = 1;
        st[t] = static_cast<int32_t>(k);
      }
      const int64_t y = b.targets[static_cast<size_t>(i * K + k)];
      const int64_t c = u(rng) < p_match[std::min<int64_t>(k, 3)] ? y : code(rng);
      const bool last_missing = missing_last && k == K - 1;
      const int64_t level = (wrong_level && k == wrong_k) ? (k + 1) % K : k;
      tok[t] = last_missing ? text(rng) : Vocab::sid_lo(level) + c;
      m[t] = 1;
      st[t] = static_cast<int32_t>(k);
      ++t;
    }
    tok[t] = Vocab::eos;  // tail token: step -1, or the unfinished step K-1
    m[t] = 1;
    st[t] = missing_last ? static_cast<int32_t>(K - 1) : -1;
    ++t;
    for (; t < T; ++t) {
      tok[t] = Vocab::pad;
      m[t] = 0;
      st[t] = -1;
    }
  }
  for (size_t j = 0; j < n; ++j) b.tokens32[j] = static_cast<int32_t>(b.tokens64[j]);
  return b;
}

/// The loss inputs: the batch's step ids and mask, log-probabilities near on-policy
/// (old = logp + N(0, 0.15): some tokens are clipped), a reference policy
/// (logp + N(0, 0.3)) and step advantages A (B, K) ~ N(0, 1).
struct LossProblem {
  Shape shape;
  Buffer<float> logp, old_logp, ref_logp, mask, step_adv, grad;
  Buffer<int32_t> step;
  Buffer<int64_t> step64;  // libtorch's index dtype, made once outside the timing
};

inline std::unique_ptr<LossProblem> make_loss_problem(const Shape& s, uint64_t seed = 777) {
  Batch b = make_batch(s, seed);
  auto p = std::make_unique<LossProblem>();
  p->shape = s;
  const size_t n = static_cast<size_t>(s.B * s.T);
  p->logp = Buffer<float>(n);
  p->old_logp = Buffer<float>(n);
  p->ref_logp = Buffer<float>(n);
  p->grad = Buffer<float>(n);
  p->step_adv = Buffer<float>(static_cast<size_t>(s.B * s.K));
  p->step64 = Buffer<int64_t>(n);
  p->mask = std::move(b.mask);
  p->step = std::move(b.step);
  std::mt19937_64 rng(seed + 1);
  std::uniform_real_distribution<float> lp(-4.0f, -0.05f);
  std::normal_distribution<float> d_old(0.0f, 0.15f), d_ref(0.0f, 0.3f), adv(0.0f, 1.0f);
  for (size_t j = 0; j < n; ++j) {
    p->logp[j] = lp(rng);
    p->old_logp[j] = p->logp[j] + d_old(rng);
    p->ref_logp[j] = p->logp[j] + d_ref(rng);
    p->step64[j] = p->step[j];
  }
  for (size_t j = 0; j < p->step_adv.size(); ++j) p->step_adv[j] = adv(rng);
  return p;
}

// ------------------------------------------------------------------ minimal bytes

/// loss: logp, old_logp, step ids (int32), mask (float32), A (B, K) read once, grad written once;
/// loss_step_kl reads ref_logp too.
inline double loss_bytes(const Shape& s, bool with_ref) {
  const double bt = static_cast<double>(s.B * s.T);
  return bt * 4.0 * (with_ref ? 6 : 5) + static_cast<double>(s.B * s.K) * 4.0;
}

/// Bytes of the loss inputs alone (the base of "% of the inputs" in the memory table).
inline double loss_input_bytes(const Shape& s, bool with_ref) {
  return loss_bytes(s, with_ref) - static_cast<double>(s.B * s.T) * 4.0;
}

/// advantage pipeline: tokens (4 or 8 bytes), mask (float32), targets (B, K int64) read once;
/// step ids (int32) and A (B, K float32) written once; with the broadcast also the token
/// advantages (float32).
inline double adv_bytes(const Shape& s, int id_bytes, bool bcast) {
  const double bt = static_cast<double>(s.B * s.T), bk = static_cast<double>(s.B * s.K);
  return bt * (id_bytes + 4 + 4 + (bcast ? 4 : 0)) + bk * (8 + 4);
}

inline double adv_input_bytes(const Shape& s, int id_bytes) {
  return static_cast<double>(s.B * s.T) * (id_bytes + 4) + static_cast<double>(s.B * s.K) * 8;
}

}  // namespace sapo_bench
