/// \file common.cuh
/// \brief What every CUDA entry point shares: the CUDA error type, the workspace, the
/// deterministic block reductions and the "first rejected position" status word.
///
/// Conventions of the CUDA adapter (docs/cuda.md has the long form):
/// * Every array a view points to is **device memory** (cudaMalloc, cudaMallocAsync, managed
///   memory, or a framework tensor on the GPU); options structs and the returned statistics
///   live on the host.
/// * Every call takes a `cudaStream_t` and enqueues all its work there; it then waits for
///   one small device-to-host copy (the status word and the results), so it returns only
///   when its outputs are written.
/// * Rejected inputs: shapes and options are checked on the host before anything is
///   enqueued; data-dependent checks (mask values, non-finite values, step ids, group ids)
///   run in a first kernel that only reads, and the kernels that write outputs return at
///   once when it found something. The error is thrown as `sapo::error` naming the first
///   offending position (the smallest row-major index, a deterministic reduction), exactly
///   as the CPU kernels name it. Nothing is written to any output then.
/// * Floating-point sums are never done with atomics: every block writes its partial sums
///   (in double) to the workspace and a fixed-order reduction combines them, so results are
///   bit-identical from run to run (and the grid depends only on the problem's shape).
///   Integer counts and min-index searches, whose results do not depend on the order, use
///   integer atomics.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>

#include <sapo/checks.hpp>
#include <sapo/error.hpp>
#include <sapo/view.hpp>

namespace sapo {
namespace cuda {

/// Thrown when a CUDA runtime call fails (out of memory, a launch failure, no device).
/// Rejected inputs are `sapo::error`, as on the CPU.
class cuda_error : public std::runtime_error {
 public:
  cuda_error(cudaError_t code, const std::string& what) : std::runtime_error(what), code_(code) {}
  cudaError_t code() const noexcept { return code_; }

 private:
  cudaError_t code_;
};

/// \brief Device scratch memory for one call.
///
/// Empty (the default): the call allocates what it needs with `cudaMallocAsync` on its
/// stream and releases it with `cudaFreeAsync` on the same stream (stream-ordered, served
/// by the device's default memory pool, so repeated calls do not go to the driver).
/// Given: `data` must be device memory of at least `bytes` bytes (query the size with the
/// stage's `*_workspace_bytes` function), aligned to `workspace_alignment`; the call uses it
/// only between its first launch and its return, so one buffer can serve every call of a
/// stream, but not two calls running at the same time on different streams.
struct workspace {
  void* data = nullptr;
  size_t bytes = 0;
};

/// Alignment a caller-provided workspace must have (cudaMalloc gives 256).
constexpr size_t workspace_alignment = 256;

namespace detail {

namespace core = ::sapo::detail;

inline void check_cuda(cudaError_t e, const char* what, const char* file, int line) {
  if (e == cudaSuccess) return;
  std::ostringstream os;
  os << "sapo::cuda: " << what << " failed: " << cudaGetErrorName(e) << " (" << cudaGetErrorString(e) << ") ("
     << file << ":" << line << ")";
  throw cuda_error(e, os.str());
}
#define SAPO_CUDA_CALL(expr) ::sapo::cuda::detail::check_cuda((expr), #expr, __FILE__, __LINE__)

/// Launches `kernel` on `stream` and turns a launch error into cuda_error. The one place
/// with the triple-chevron syntax.
template <class... Params, class... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, const Args&... args) {
  kernel<<<grid, block, smem, stream>>>(args...);
  SAPO_CUDA_CALL(cudaGetLastError());
}

/// Carves typed arrays out of one workspace. Run once with a null base to size it, once
/// with the real base to get the pointers: both runs see the same sequence of take().
class carve {
 public:
  explicit carve(void* base) : base_(static_cast<char*>(base)) {}
  template <class T>
  T* take(size_t count) {
    offset_ = round_up(offset_);
    T* p = base_ != nullptr ? reinterpret_cast<T*>(base_ + offset_) : nullptr;
    offset_ += count * sizeof(T);
    return p;
  }
  size_t bytes() const { return round_up(offset_); }

 private:
  static size_t round_up(size_t n) { return (n + workspace_alignment - 1) / workspace_alignment * workspace_alignment; }
  char* base_;
  size_t offset_ = 0;
};

/// The workspace of one call: the caller's buffer, or a stream-ordered allocation freed
/// (stream-ordered) when the call returns or throws.
class scratch {
 public:
  scratch(const workspace& ws, size_t need, cudaStream_t stream) : stream_(stream) {
    if (ws.data != nullptr) {
      SAPO_CHECK(ws.bytes >= need, "workspace", "at least " << need << " bytes (see the *_workspace_bytes functions)",
                 ws.bytes << " bytes");
      SAPO_CHECK(reinterpret_cast<uintptr_t>(ws.data) % workspace_alignment == 0, "workspace",
                 "a device pointer aligned to " << workspace_alignment << " bytes", ws.data);
      base_ = ws.data;
      return;
    }
    SAPO_CUDA_CALL(cudaMallocAsync(&base_, need, stream));
    owned_ = true;
  }
  ~scratch() {
    if (owned_) cudaFreeAsync(base_, stream_);  // never throws; an error here resurfaces on the next call
  }
  scratch(const scratch&) = delete;
  scratch& operator=(const scratch&) = delete;
  void* base() const { return base_; }

 private:
  void* base_ = nullptr;
  cudaStream_t stream_;
  bool owned_ = false;
};

/// Copies `count` elements from the device and waits for them.
template <class T>
void copy_to_host(std::remove_const_t<T>* dst, T* src, size_t count, cudaStream_t stream) {
  SAPO_CUDA_CALL(cudaMemcpyAsync(dst, src, count * sizeof(T), cudaMemcpyDeviceToHost, stream));
  SAPO_CUDA_CALL(cudaStreamSynchronize(stream));
}

/// One element of a device array (the error path reads the offending value with it).
template <class T>
std::remove_const_t<T> fetch(T* p, cudaStream_t stream) {
  std::remove_const_t<T> v{};
  copy_to_host(&v, p, 1, stream);
  return v;
}

// ------------------------------------------------------------ the first rejected position

/// The first rejected position of one check is the smallest key (a row-major index, times
/// the number of checks per element plus the check). It is kept as its complement in a
/// zero-initialised word, so one memset clears it and atomicMax finds the minimum.
constexpr unsigned long long no_key = ~0ull;

__device__ inline void report_key(unsigned long long* word, unsigned long long key) {
  if (key != no_key) atomicMax(word, ~key);
}
__host__ __device__ inline bool has_key(unsigned long long word) { return word != 0; }
inline unsigned long long key_of(unsigned long long word) { return ~word; }

/// Status of the pipeline stages: the first rejected key of up to two checks, an integer
/// count (e.g. malformed responses) and the last-block counter.
struct stage_status {
  unsigned long long error[2];
  unsigned long long count;
  unsigned int blocks_done;
};

/// x is neither NaN nor +-Inf (x - x is NaN exactly then), for float and double alike.
template <class T>
__device__ inline bool finite(T x) {
  return x - x == T(0);
}

// ------------------------------------------------------------ deterministic reductions

constexpr int warp_size = 32;
constexpr unsigned full_mask = 0xffffffffu;

struct sum_op {
  template <class T>
  __device__ T operator()(T a, T b) const {
    return a + b;
  }
};
struct min_op {
  template <class T>
  __device__ T operator()(T a, T b) const {
    return b < a ? b : a;
  }
};
struct max_op {
  template <class T>
  __device__ T operator()(T a, T b) const {
    return a < b ? b : a;
  }
};
struct or_op {
  template <class T>
  __device__ T operator()(T a, T b) const {
    return a | b;
  }
};

/// Tree over the lanes of a warp; lane 0 gets the result. The pairing is fixed, so a sum
/// of doubles comes out the same bits every run. Every lane of the warp must call it.
template <class T, class Op>
__device__ T warp_reduce(T v, Op op) {
  for (int offset = warp_size / 2; offset > 0; offset /= 2) v = op(v, __shfl_down_sync(full_mask, v, offset));
  return v;
}

/// Reduces N values per thread over the block; thread 0 gets the N results. Fixed order
/// for a given blockDim (a multiple of 32), hence bit-identical sums. Every thread of the
/// block must call it (it synchronises).
template <int N, class T, class Op>
__device__ void block_reduce(T (&v)[N], Op op, T identity) {
  __shared__ T partial[warp_size][N];
  const int lane = static_cast<int>(threadIdx.x) % warp_size, warp = static_cast<int>(threadIdx.x) / warp_size;
  const int n_warps = static_cast<int>(blockDim.x) / warp_size;
  for (int f = 0; f < N; ++f) v[f] = warp_reduce(v[f], op);
  __syncthreads();  // the previous call may still read `partial`
  if (lane == 0)
    for (int f = 0; f < N; ++f) partial[warp][f] = v[f];
  __syncthreads();
  if (warp == 0)
    for (int f = 0; f < N; ++f) v[f] = warp_reduce(lane < n_warps ? partial[lane][f] : identity, op);
}

/// One value per thread; thread 0 gets the result.
template <class T, class Op>
__device__ T block_reduce(T v, Op op, T identity) {
  T a[1] = {v};
  block_reduce<1>(a, op, identity);
  return a[0];
}

/// True in every thread of the block that finished last. Call after the block wrote its
/// partial results; the last block may then read every block's partials (with
/// load_global, past the non-coherent L1) and reduce them in a fixed order.
__device__ inline bool last_block_done(unsigned int* blocks_done) {
  __shared__ bool last;
  __threadfence();  // whichever thread wrote a partial, it is visible before the count says so
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned int blocks = gridDim.x * gridDim.y * gridDim.z;
    last = atomicAdd(blocks_done, 1u) == blocks - 1;
  }
  __syncthreads();
  if (last) __threadfence();
  return last;
}

/// A load that bypasses L1 (which is not coherent across blocks).
template <class T>
__device__ inline T load_global(const T* p) {
  return __ldcg(p);
}

/// Strided 1-D access, usable on host and device (the shared row functions write through it).
template <class T>
struct strided {
  T* data;
  int64_t stride;
  __host__ __device__ T& operator()(int64_t i) const { return data[i * stride]; }
};

/// Blocks of a grid-stride loop over n items: enough to fill a large GPU, no more.
inline unsigned int blocks_for(int64_t n, int threads, int64_t max_blocks = 4096) {
  const int64_t b = (n + threads - 1) / threads;
  return static_cast<unsigned int>(b < 1 ? 1 : (b > max_blocks ? max_blocks : b));
}

/// (rows, cols) grid-stride loops without a division per element: blockIdx.y walks rows,
/// blockIdx.x tiles of a row.
inline dim3 grid_2d(int64_t rows, int64_t cols, int threads) {
  const int64_t gx = (cols + threads - 1) / threads;
  const int64_t gy = rows;
  return dim3(static_cast<unsigned int>(gx < 1 ? 1 : (gx > 64 ? 64 : gx)),
              static_cast<unsigned int>(gy < 1 ? 1 : (gy > 65535 ? 65535 : gy)), 1);
}

}  // namespace detail
}  // namespace cuda
}  // namespace sapo
