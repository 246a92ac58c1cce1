/// \file parallel.hpp
/// \brief Deterministic parallel loops over fixed chunks of rows, on a persistent pool.
///
/// The work is cut into chunks whose boundaries depend only on the problem's shape, never
/// on the thread count; each chunk keeps its own partial results (in double) and the
/// caller combines them in chunk order. So every result is bit-identical for 1, 2 or N
/// threads, and whichever threads run the chunks.
///
/// The chunks run on sapo's own pool: hardware_concurrency() - 1 worker threads started at
/// the first parallel call and kept (an RL trainer calls the loss thousands of times on small
/// batches; starting threads on every call cost more than the kernel). A program with a pool
/// of its own installs it with set_executor() so two pools do not fight over the cores: the
/// LibTorch adapter and the Python module install one that runs on at::parallel_for.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <mutex>
#include <system_error>
#include <thread>
#include <vector>

#include <unistd.h>

namespace sapo {

/// Runs task(context, c) for every c in [0, n), on up to `threads` threads (the caller may
/// be one of them), in any order, and returns when every task has returned. Tasks do not
/// throw. `threads` >= 2.
using executor_fn = void (*)(int64_t n, int threads, void* context, void (*task)(void*, int64_t));

namespace detail {

inline std::atomic<executor_fn>& executor_slot() {
  static std::atomic<executor_fn> slot{nullptr};
  return slot;
}

/// A fixed set of worker threads that run one job at a time, with the calling thread
/// taking part. A call that finds the pool busy (another thread's job, or a call from
/// inside a task) runs its tasks on the calling thread instead: the results are the same.
class thread_pool {
 public:
  explicit thread_pool(int workers) {
    threads_.reserve(static_cast<size_t>(workers));
    try {
      for (int i = 0; i < workers; ++i) threads_.emplace_back([this] { work_loop(); });
    } catch (const std::system_error&) {
      // No more threads to be had: the ones started (and the caller) share the work.
    }
  }
  ~thread_pool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& t : threads_) t.join();
  }
  thread_pool(const thread_pool&) = delete;
  thread_pool& operator=(const thread_pool&) = delete;

  int workers() const { return static_cast<int>(threads_.size()); }

  void run(int64_t n, int threads, void* context, void (*task)(void*, int64_t)) {
    std::unique_lock<std::mutex> busy(job_mutex_, std::defer_lock);
    // A task that calls back into sapo (in_task) must not wait for the pool it runs on.
    if (in_task() || threads_.empty() || !busy.try_lock()) {
      for (int64_t c = 0; c < n; ++c) task(context, c);
      return;
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      n_ = n;
      context_ = context;
      task_ = task;
      next_.store(0, std::memory_order_relaxed);
      wanted_ = std::min(threads - 1, workers());
      joined_ = 0;
      ++generation_;
      published_.store(generation_, std::memory_order_release);
    }
    wake_.notify_all();
    in_task() = true;
    drain();
    in_task() = false;
    std::unique_lock<std::mutex> lock(mutex_);
    wanted_ = 0;  // a worker that wakes up late finds nothing to join
    done_.wait(lock, [&] { return active_ == 0; });
  }

  /// The process's pool (a forked child gets a new one: the parent's workers are not there).
  static thread_pool& instance() {
    static std::mutex m;
    static thread_pool* pool = nullptr;
    static pid_t owner = 0;
    std::lock_guard<std::mutex> lock(m);
    if (!pool || owner != getpid()) {
      // The old pool of a parent process is left alone (its threads do not exist here).
      const unsigned hw = std::thread::hardware_concurrency();
      pool = new thread_pool(hw > 1 ? static_cast<int>(hw) - 1 : 0);
      owner = getpid();
    }
    return *pool;
  }

 private:
  static bool& in_task() {
    static thread_local bool inside = false;
    return inside;
  }

  void drain() {
    for (int64_t c = next_.fetch_add(1); c < n_; c = next_.fetch_add(1)) task_(context_, c);
  }

  void work_loop() {
    in_task() = true;
    std::unique_lock<std::mutex> lock(mutex_);
    uint64_t seen = generation_;
    for (;;) {
      // Spin a little before sleeping: a loss call is two jobs back to back (scan, then
      // compute), and waking a sleeping thread on a VM can take longer than a small job.
      lock.unlock();
      const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(spin_microseconds);
      for (int k = 1; published_.load(std::memory_order_acquire) == seen; ++k) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
        if (k % 64 == 0 && std::chrono::steady_clock::now() > until) break;
      }
      lock.lock();
      wake_.wait(lock, [&] { return stop_ || (generation_ != seen && joined_ < wanted_); });
      if (stop_) return;
      seen = generation_;
      ++joined_;
      ++active_;
      lock.unlock();
      drain();
      lock.lock();
      if (--active_ == 0) done_.notify_all();
    }
  }

  std::vector<std::thread> threads_;
  std::mutex job_mutex_;  // one job at a time
  std::mutex mutex_;      // guards the fields below
  std::condition_variable wake_, done_;
  static constexpr int spin_microseconds = 100;
  uint64_t generation_ = 0;
  std::atomic<uint64_t> published_{0};  // generation_, readable without the lock (for spinning)
  int wanted_ = 0, joined_ = 0, active_ = 0;
  bool stop_ = false;
  int64_t n_ = 0;
  void* context_ = nullptr;
  void (*task_)(void*, int64_t) = nullptr;
  std::atomic<int64_t> next_{0};
};

}  // namespace detail

/// Installs the executor that runs sapo's parallel loops (nullptr: sapo's own pool). The
/// LibTorch adapter installs one on at::parallel_for when it is loaded.
inline void set_executor(executor_fn fn) { detail::executor_slot().store(fn); }
/// The installed executor (nullptr: sapo's own pool).
inline executor_fn get_executor() { return detail::executor_slot().load(); }

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
/// included), on the installed executor or sapo's pool. Below `min_chunks_per_thread`
/// chunks per extra thread it stays serial. If bodies throw, the exception of the lowest
/// chunk is rethrown after every chunk ran, the same one a serial run would throw first.
template <class F>
void parallel_for_chunks(int64_t n_chunks, int threads, F&& body, int64_t min_chunks_per_thread = 2) {
  const int64_t useful = std::max<int64_t>(1, n_chunks / std::max<int64_t>(1, min_chunks_per_thread));
  const int n = static_cast<int>(std::min<int64_t>(resolve_threads(threads), useful));
  if (n <= 1) {
    for (int64_t c = 0; c < n_chunks; ++c) body(c);
    return;
  }
  struct job {
    F* body;
    std::vector<std::exception_ptr> errors;
  } j{&body, std::vector<std::exception_ptr>(static_cast<size_t>(n_chunks))};
  auto task = [](void* context, int64_t c) {
    job& jb = *static_cast<job*>(context);
    try {
      (*jb.body)(c);
    } catch (...) {
      jb.errors[static_cast<size_t>(c)] = std::current_exception();
    }
  };
  if (const executor_fn exec = get_executor())
    exec(n_chunks, n, &j, task);
  else
    thread_pool::instance().run(n_chunks, n, &j, task);
  for (auto& e : j.errors)
    if (e) std::rethrow_exception(e);
}

}  // namespace detail
}  // namespace sapo
