/// \file parallel.hpp
/// \brief Deterministic parallel loops over fixed chunks of rows, on std::thread.
///
/// The work is cut into chunks whose boundaries depend only on the problem's shape, never
/// on the thread count; each chunk keeps its own partial results (in double) and the
/// caller combines them in chunk order. So every result is bit-identical for 1, 2 or N
/// threads. Threads are plain std::thread (no framework pool), started per call; small
/// problems run on the calling thread.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <system_error>
#include <thread>
#include <vector>

namespace sapo {
namespace detail {

/// Threads to use for `requested` (0 = every hardware thread).
inline int resolve_threads(int requested) {
  if (requested > 0) return requested;
  const unsigned hw = std::thread::hardware_concurrency();
  return hw > 0 ? static_cast<int>(hw) : 1;
}

/// Rows [begin, end) of each chunk: about `tokens_per_chunk` tokens, at least one row.
struct row_chunks {
  int64_t rows = 0, rows_per_chunk = 1, count = 0;
  row_chunks(int64_t B, int64_t T, int64_t tokens_per_chunk = 16384)
      : rows(B), rows_per_chunk(std::max<int64_t>(1, tokens_per_chunk / std::max<int64_t>(T, 1))) {
    count = (B + rows_per_chunk - 1) / rows_per_chunk;
  }
  int64_t begin(int64_t c) const { return c * rows_per_chunk; }
  int64_t end(int64_t c) const { return std::min(rows, (c + 1) * rows_per_chunk); }
};

/// Runs body(c) for every chunk c in [0, n_chunks) on up to `threads` threads (the caller
/// included). Below `min_chunks_per_thread` chunks per extra thread it stays serial. If
/// bodies throw, the exception of the lowest chunk is rethrown after all threads joined,
/// the same one a serial run would throw first.
template <class F>
void parallel_for_chunks(int64_t n_chunks, int threads, F&& body, int64_t min_chunks_per_thread = 2) {
  const int64_t useful = std::max<int64_t>(1, n_chunks / std::max<int64_t>(1, min_chunks_per_thread));
  const int n = static_cast<int>(std::min<int64_t>(resolve_threads(threads), useful));
  if (n <= 1) {
    for (int64_t c = 0; c < n_chunks; ++c) body(c);
    return;
  }
  std::atomic<int64_t> next{0};
  std::vector<std::exception_ptr> errors(static_cast<size_t>(n_chunks));
  auto worker = [&] {
    for (int64_t c = next.fetch_add(1); c < n_chunks; c = next.fetch_add(1)) {
      try {
        body(c);
      } catch (...) {
        errors[static_cast<size_t>(c)] = std::current_exception();
      }
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(n - 1));
  try {
    for (int i = 1; i < n; ++i) pool.emplace_back(worker);
  } catch (const std::system_error&) {
    // No more threads to be had: the ones started (and this one) share the chunks anyway.
  }
  worker();
  for (auto& t : pool) t.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

}  // namespace detail
}  // namespace sapo
