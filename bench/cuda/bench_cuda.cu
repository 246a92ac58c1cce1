// GPU benchmark of the fused policy loss (forward + backward in one call): sapo::cuda::policy_loss
// at B x T from 64 x 512 to 2048 x 4096, float32, against a device-to-device cudaMemcpy that
// moves the same number of bytes (the bandwidth roofline). Prints a markdown table.
//
// "Bytes" are what one ideal pass must move: every input read once and the gradient written
// once. The memcpy copies half of them (it reads and writes each byte it copies), so both
// move the same traffic. sapo's call does more: a validation pass reads the inputs before the
// compute pass reads them again (that is how a rejected input leaves grad untouched), and
// the call ends with a small device-to-host copy of the result and a stream synchronisation.
// The times are per call, end to end, as a training step sees them.
//
// A plain CUDA program (cudaEvent timing, no Google Benchmark). Exits 77 without a GPU.
//   bench_cuda [iterations]     (default 20; the median is reported)
#include <sapo/cuda.cuh>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <vector>

namespace {

void ok(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "CUDA error in %s: %s\n", what, cudaGetErrorString(e));
    std::exit(1);
  }
}

template <class T>
T* device_copy(const std::vector<T>& h) {
  T* d = nullptr;
  ok(cudaMalloc(&d, h.size() * sizeof(T)), "cudaMalloc");
  ok(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice), "upload");
  return d;
}

/// Median over `iters` timed calls (after 3 warm-up calls), in microseconds.
double median_us(cudaStream_t stream, int iters, const std::function<void()>& call) {
  for (int w = 0; w < 3; ++w) call();
  ok(cudaStreamSynchronize(stream), "sync");
  cudaEvent_t start, stop;
  ok(cudaEventCreate(&start), "event");
  ok(cudaEventCreate(&stop), "event");
  std::vector<double> t;
  for (int k = 0; k < iters; ++k) {
    ok(cudaEventRecord(start, stream), "record");
    call();
    ok(cudaEventRecord(stop, stream), "record");
    ok(cudaEventSynchronize(stop), "sync");
    float ms = 0;
    ok(cudaEventElapsedTime(&ms, start, stop), "elapsed");
    t.push_back(1000.0 * ms);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

struct Problem {
  int64_t B, T, K = 3;
  float *logp = nullptr, *old_logp = nullptr, *token_adv = nullptr, *step_adv = nullptr, *mask = nullptr;
  float* grad = nullptr;
  int32_t* step = nullptr;

  Problem(int64_t b, int64_t t) : B(b), T(t) {
    const size_t n = static_cast<size_t>(B * T);
    std::vector<float> lp(n), old(n), adv(n), m(n), sa(static_cast<size_t>(B * K));
    std::vector<int32_t> st(n);
    uint64_t s = 0x9e3779b97f4a7c15ull;
    auto uniform = [&] {  // xorshift: no dependency, same data every run
      s ^= s << 13;
      s ^= s >> 7;
      s ^= s << 17;
      return static_cast<double>(s >> 11) / 9007199254740992.0;
    };
    for (auto& a : sa) a = static_cast<float>(3 * uniform() - 1.5);
    for (int64_t i = 0; i < B; ++i) {
      const int64_t prompt = static_cast<int64_t>(uniform() * 16), len = T - prompt - static_cast<int64_t>(uniform() * T / 4);
      for (int64_t j = 0; j < T; ++j) {
        const size_t k = static_cast<size_t>(i * T + j);
        const bool on = j >= prompt && j < prompt + len;
        lp[k] = static_cast<float>(-4 * uniform() - 0.05);
        old[k] = lp[k] + static_cast<float>(0.6 * uniform() - 0.3);
        m[k] = on ? 1.0f : 0.0f;
        st[k] = on ? static_cast<int32_t>(std::min<int64_t>(K - 1, (j - prompt) * K / std::max<int64_t>(len, 1))) : -1;
        adv[k] = on ? sa[static_cast<size_t>(i * K + st[k])] : 0.0f;
      }
    }
    logp = device_copy(lp);
    old_logp = device_copy(old);
    token_adv = device_copy(adv);
    step_adv = device_copy(sa);
    mask = device_copy(m);
    step = device_copy(st);
    ok(cudaMalloc(&grad, n * sizeof(float)), "cudaMalloc");
  }
  ~Problem() {
    for (void* p : {static_cast<void*>(logp), static_cast<void*>(old_logp), static_cast<void*>(token_adv),
                    static_cast<void*>(step_adv), static_cast<void*>(mask), static_cast<void*>(step),
                    static_cast<void*>(grad)})
      cudaFree(p);
  }
};

struct Config {
  const char* name;
  bool step_mode;  // step ratio + step_mean + step advantages with step ids; else token defaults
};

}  // namespace

int main(int argc, char** argv) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("SKIPPED: no CUDA device\n");
    return 77;
  }
  const int iters = argc > 1 ? std::max(1, std::atoi(argv[1])) : 20;
  cudaDeviceProp prop;
  ok(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
  cudaStream_t stream;
  ok(cudaStreamCreate(&stream), "cudaStreamCreate");

  std::printf("# sapo::cuda::policy_loss, fwd + bwd, float32 (%s, %d SMs, median of %d calls)\n\n", prop.name,
              prop.multiProcessorCount, iters);
  std::printf("| B x T | configuration | bytes (MB) | sapo (us) | memcpy same bytes (us) | sapo (GB/s) | "
              "memcpy (GB/s) | sapo / roofline |\n");
  std::printf("|---|---|---:|---:|---:|---:|---:|---:|\n");
  const int64_t shapes[][2] = {{64, 512}, {256, 1024}, {512, 2048}, {1024, 4096}, {2048, 4096}};
  const Config configs[] = {{"token ratio, token_mean, token advantages", false},
                            {"step ratio, step_mean, step advantages + step ids", true}};
  for (const auto& shape : shapes) {
    Problem p(shape[0], shape[1]);
    const int64_t B = p.B, T = p.T;
    for (const Config& cfg : configs) {
      sapo::policy_inputs<float> in;
      in.logp = sapo::mat_view<const float>(p.logp, B, T);
      in.old_logp = sapo::mat_view<const float>(p.old_logp, B, T);
      in.mask = sapo::mat_view<const float>(p.mask, B, T);
      sapo::loss_options opt;
      // Bytes read once: logp, old_logp, mask, and the advantages (token: (B, T); step: (B, K)
      // plus the (B, T) int32 step ids); written once: grad.
      double bytes = 3.0 * B * T * sizeof(float) + 1.0 * B * T * sizeof(float);
      if (cfg.step_mode) {
        in.step_advantages = sapo::mat_view<const float>(p.step_adv, B, p.K);
        in.step = sapo::mat_view<const int32_t>(p.step, B, T);
        opt.ratio = sapo::ratio_level::step;
        opt.agg = sapo::aggregation::step_mean;
        bytes += 1.0 * B * p.K * sizeof(float) + 1.0 * B * T * sizeof(int32_t);
      } else {
        in.token_advantages = sapo::mat_view<const float>(p.token_adv, B, T);
        bytes += 1.0 * B * T * sizeof(float);
      }
      const sapo::mat_view<float> grad(p.grad, B, T);
      const size_t ws_bytes = sapo::cuda::policy_loss_workspace_bytes(in, opt);
      void* ws = nullptr;
      ok(cudaMalloc(&ws, ws_bytes), "cudaMalloc workspace");
      double sink = 0;
      const double t_sapo = median_us(stream, iters, [&] {
        sink += sapo::cuda::policy_loss(in, opt, grad, stream, {ws, ws_bytes}).loss;
      });
      // The roofline: copy half the bytes (read + write = the same traffic).
      const size_t copy = static_cast<size_t>(bytes / 2);
      char *src = nullptr, *dst = nullptr;
      ok(cudaMalloc(&src, copy), "cudaMalloc");
      ok(cudaMalloc(&dst, copy), "cudaMalloc");
      ok(cudaMemsetAsync(src, 1, copy, stream), "memset");
      const double t_copy = median_us(stream, iters, [&] {
        ok(cudaMemcpyAsync(dst, src, copy, cudaMemcpyDeviceToDevice, stream), "cudaMemcpyAsync");
      });
      cudaFree(src);
      cudaFree(dst);
      cudaFree(ws);
      std::printf("| %lld x %lld | %s | %.1f | %.1f | %.1f | %.0f | %.0f | %.2f |\n", static_cast<long long>(B),
                  static_cast<long long>(T), cfg.name, bytes / 1e6, t_sapo, t_copy, bytes / t_sapo / 1e3,
                  bytes / t_copy / 1e3, t_copy / t_sapo);
      if (sink != sink) std::printf("(loss was NaN)\n");
    }
  }
  cudaStreamDestroy(stream);
  return 0;
}
