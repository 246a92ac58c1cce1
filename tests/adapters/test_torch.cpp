// Tests of adapters/torch (sapo/torch.hpp + libsapo_torch.so): the policy loss and its
// gradient against the same math written op by op with libtorch tensors and autograd, for
// every aggregation, ratio level and KL estimator, in float32 and float64; strided and
// broadcast inputs; bfloat16 / float16 inputs; upstream gradients != 1 and a loss used
// twice; the torch.ops dispatcher path; error messages; the stage functions against the
// core kernels on plain buffers; the distributed phase ops over ranks simulated in one process.
#include <sapo/torch.hpp>

#include <torch/csrc/autograd/autograd.h>
#include <torch/utils.h>

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

namespace {

namespace st = sapo::libtorch;
using at::Tensor;

void use_two_threads() { torch::set_num_threads(2); }

const at::TensorOptions f64 = at::TensorOptions().dtype(at::kDouble);

template <class T>
std::vector<T> values(const Tensor& t) {
  const Tensor c = t.contiguous();
  return std::vector<T>(c.data_ptr<T>(), c.data_ptr<T>() + c.numel());
}

double max_abs(const Tensor& t) { return t.abs().max().item<double>(); }

// ---------------------------------------------------------------------------------------
// A batch for the loss: step ids from K cuts per row (some rows unfinished, one row with a
// missing last step, one empty row), garbage step ids under mask = 0, finite values.
// ---------------------------------------------------------------------------------------
struct Problem {
  int64_t B = 0, T = 0, K = 0;
  Tensor logp, old_logp, ref_logp, token_adv, step_adv;  // float64
  Tensor step;                                           // int32
  Tensor mask;                                           // float64 0/1
};

Problem make_problem(int64_t B, int64_t T, int64_t K, unsigned seed) {
  std::mt19937 rng(seed);
  std::vector<int32_t> step(static_cast<size_t>(B * T));
  std::vector<double> mask(static_cast<size_t>(B * T), 0.0);
  for (int64_t i = 0; i < B; ++i) {
    const int64_t start = static_cast<int64_t>(rng() % 4), end = T - static_cast<int64_t>(rng() % 6);
    int64_t cuts = K;
    if (i % 4 == 1) cuts = K - 1;              // unfinished: the last tokens carry id K - 1
    if (i % 4 == 2) cuts = std::max<int64_t>(0, K - 2);  // steps K-1 absent
    std::vector<int64_t> pos;
    for (int64_t t = start; t < end; ++t) pos.push_back(t);
    std::shuffle(pos.begin(), pos.end(), rng);
    pos.resize(static_cast<size_t>(cuts));
    std::sort(pos.begin(), pos.end());
    for (int64_t t = 0; t < T; ++t) {
      const size_t j = static_cast<size_t>(i * T + t);
      const bool on = i != B - 1 && t >= start && t < end;  // the last row is empty
      mask[j] = on ? 1.0 : 0.0;
      if (!on) {
        step[j] = (t % 3 == 0) ? 99 : -7;  // ignored under mask = 0
        continue;
      }
      int64_t k = 0;
      for (int64_t c : pos) k += c < t ? 1 : 0;
      step[j] = k >= K ? -1 : static_cast<int32_t>(k);  // tail after the K-th cut
    }
  }
  at::manual_seed(seed);
  Problem p;
  p.B = B;
  p.T = T;
  p.K = K;
  p.logp = -(at::rand({B, T}, f64) * 2.0 + 0.05);
  p.old_logp = p.logp + 0.35 * at::randn({B, T}, f64);
  p.ref_logp = p.logp + 0.3 * at::randn({B, T}, f64);
  p.token_adv = at::randn({B, T}, f64);
  p.step_adv = at::randn({B, K}, f64);
  p.step = at::from_blob(step.data(), {B, T}, at::TensorOptions().dtype(at::kInt)).clone();
  p.mask = at::from_blob(mask.data(), {B, T}, f64).clone();
  return p;
}

// ---------------------------------------------------------------------------------------
// The reference: SPEC §4-5 op by op on float64 tensors, differentiated by autograd.
// ---------------------------------------------------------------------------------------
struct Reference {
  Tensor loss;
  double n_tokens = 0, n_sequences = 0, n_steps = 0, ratio_mean = 0, approx_kl_old = 0, kl_ref = 0;
};

Reference reference_loss(const Tensor& logp, const Problem& p, const Tensor& old_in, const Tensor& ref_in,
                         const Tensor& adv_in, bool by_step, const sapo::loss_options& o) {
  const int64_t B = p.B, T = p.T, K = p.K;
  const Tensor old = old_in.to(at::kDouble), adv = adv_in.to(at::kDouble), m = p.mask;
  const Tensor step = p.step.to(at::kLong);
  const Tensor has_step = (step >= 0).logical_and(m > 0);
  const Tensor hs = has_step.to(at::kDouble);
  const Tensor sidx = step.clamp(0, K - 1);
  const Tensor flat = (at::arange(B, at::TensorOptions().dtype(at::kLong)).unsqueeze(1) * K + sidx).reshape({-1});
  auto per_step_sum = [&](const Tensor& v) { return at::zeros({B * K}, f64).index_add(0, flat, v.reshape({-1})); };
  const Tensor count = per_step_sum(hs);

  const Tensor a = by_step ? adv.gather(1, sidx) * hs : adv;
  const Tensor delta = (logp - old).clamp(-20, 20);
  Tensor rho = delta.exp();
  if (o.ratio != sapo::ratio_level::token) {
    const Tensor slope_one = (logp - logp.detach()).exp();  // value 1, d/dlogp = 1
    Tensor mean_delta, grouped;
    if (o.ratio == sapo::ratio_level::step) {
      const Tensor means = per_step_sum((delta * hs).detach()) / count.clamp_min(1);
      mean_delta = means.index_select(0, flat).view({B, T});
      grouped = has_step;
    } else {
      const Tensor rs = (delta * m).detach().sum(1, true), rc = m.sum(1, true);
      mean_delta = (rs / rc.clamp_min(1)).expand({B, T});
      grouped = m > 0;
    }
    rho = at::where(grouped, mean_delta.exp() * slope_one, rho);
  }
  Tensor l = at::maximum(-a * rho, -a * rho.clamp(1 - o.clip_low, 1 + o.clip_high));
  if (o.dual_clip) l = at::where(a < 0, at::minimum(l, -a * o.dual_clip_c), l);
  Tensor k;
  if (ref_in.defined()) {
    const Tensor d = ref_in.to(at::kDouble) - logp;
    if (o.kl == sapo::kl_estimator::k1) {
      k = -d;
    } else if (o.kl == sapo::kl_estimator::k2) {
      k = 0.5 * d * d;
    } else {
      const Tensor dc = d.clamp(-20, 20);
      k = (dc.exp() - dc - 1).clamp(-10, 10);
    }
    l = l + o.kl_coef * k;
  }

  Reference r;
  const Tensor lm = l * m, rows = m.sum(1);
  r.n_tokens = m.sum().item<double>();
  r.n_sequences = (rows > 0).sum().item<double>();
  r.n_steps = (count > 0).sum().item<double>();
  const double seqs = o.global_sequences > 0 ? o.global_sequences : r.n_sequences;
  switch (o.agg) {
    case sapo::aggregation::token_mean:
      r.loss = lm.sum() / (o.global_tokens > 0 ? o.global_tokens : r.n_tokens);
      break;
    case sapo::aggregation::seq_mean_token_mean: r.loss = (lm.sum(1) / rows.clamp_min(1)).sum() / seqs; break;
    case sapo::aggregation::seq_mean_token_sum: r.loss = lm.sum(1).sum() / seqs; break;
    case sapo::aggregation::seq_mean_token_sum_norm:
      r.loss = lm.sum() / ((o.global_sequences > 0 ? o.global_sequences : static_cast<double>(B)) *
                           (o.max_response_length > 0 ? o.max_response_length : static_cast<double>(T)));
      break;
    case sapo::aggregation::step_mean:
      r.loss = (per_step_sum(l * hs) / count.clamp_min(1)).sum() /
               (o.global_steps > 0 ? o.global_steps : r.n_steps);
      break;
  }
  r.ratio_mean = (rho.detach() * m).sum().item<double>() / r.n_tokens;
  r.approx_kl_old = (-delta.detach() * m).sum().item<double>() / r.n_tokens;
  if (k.defined()) r.kl_ref = (k.detach() * m).sum().item<double>() / r.n_tokens;
  return r;
}

/// Runs the adapter (autograd) and the reference on the same values; compares loss,
/// gradient and the diagnostics the reference knows.
void check_against_reference(const Problem& p, at::ScalarType dtype, bool by_step, bool with_ref,
                             const sapo::loss_options& o) {
  const double tol = dtype == at::kDouble ? 1e-12 : 2e-5;
  st::loss_inputs in;
  in.logp = p.logp.to(dtype).clone().requires_grad_();
  in.old_logp = p.old_logp.to(dtype);
  in.mask = p.mask.to(dtype);
  in.step = p.step;
  if (by_step)
    in.step_advantages = p.step_adv.to(dtype);
  else
    in.token_advantages = p.token_adv.to(dtype);
  if (with_ref) in.ref_logp = p.ref_logp.to(dtype);
  const st::policy_loss_output out = st::policy_loss(in, o);
  REQUIRE(out.loss.dim() == 0);
  REQUIRE(out.loss.scalar_type() == dtype);
  REQUIRE(out.loss.requires_grad());
  out.loss.backward();
  const Tensor grad = in.logp.grad();
  REQUIRE(grad.defined());
  REQUIRE(grad.scalar_type() == dtype);

  // The reference sees exactly the values the adapter saw (rounded to dtype), in float64.
  const Tensor logp64 = in.logp.detach().to(at::kDouble).requires_grad_();
  const Reference ref = reference_loss(logp64, p, in.old_logp, with_ref ? in.ref_logp : Tensor(),
                                       by_step ? in.step_advantages : in.token_advantages, by_step, o);
  ref.loss.backward();
  const Tensor ref_grad = logp64.grad();

  const double loss = out.loss.item<double>(), ref_value = ref.loss.item<double>();
  INFO("loss " << loss << " reference " << ref_value);
  CHECK(std::abs(loss - ref_value) <= tol * (1 + std::abs(ref_value)));
  const double scale = std::max(max_abs(ref_grad), 1e-30);
  INFO("max |grad - reference| / max |reference| = " << max_abs(grad.to(at::kDouble) - ref_grad) / scale);
  CHECK(max_abs(grad.to(at::kDouble) - ref_grad) <= tol * scale);
  CHECK(max_abs(grad.to(at::kDouble) * (1 - p.mask)) == 0.0);  // 0 where mask = 0

  const sapo::loss_result r = out.result();
  CHECK(std::abs(r.loss - ref_value) <= tol * (1 + std::abs(ref_value)));
  CHECK(static_cast<double>(r.n_tokens) == ref.n_tokens);
  CHECK(static_cast<double>(r.n_sequences) == ref.n_sequences);
  CHECK(static_cast<double>(r.n_steps) == ref.n_steps);
  CHECK(std::abs(r.ratio_mean - ref.ratio_mean) <= tol * 10);
  CHECK(std::abs(r.approx_kl_old - ref.approx_kl_old) <= tol * 10);
  CHECK(std::abs(r.kl_ref - ref.kl_ref) <= tol * 10);
  // The data reach the clipped branches, so both sides of every max / min are tested.
  if (o.ratio == sapo::ratio_level::token) CHECK(r.clip_frac_low + r.clip_frac_high > 0.05);
  if (o.dual_clip && o.ratio == sapo::ratio_level::token) CHECK(r.clip_frac_dual > 0);
}

const char* name(sapo::aggregation a) { return st::detail::enum_name(a, st::detail::agg_names); }
const char* name(sapo::ratio_level r) { return st::detail::enum_name(r, st::detail::ratio_names); }
const char* name(sapo::kl_estimator k) { return st::detail::enum_name(k, st::detail::kl_names); }
std::string name(at::ScalarType t) { return st::detail::dtype_name(t); }

const sapo::aggregation all_aggregations[] = {
    sapo::aggregation::token_mean, sapo::aggregation::seq_mean_token_mean, sapo::aggregation::seq_mean_token_sum,
    sapo::aggregation::seq_mean_token_sum_norm, sapo::aggregation::step_mean};
const sapo::ratio_level all_ratios[] = {sapo::ratio_level::token, sapo::ratio_level::step,
                                        sapo::ratio_level::sequence};

}  // namespace

TEST_CASE("torch policy_loss: loss and gradient equal the op-by-op autograd reference, every aggregation and ratio",
          "[torch][loss]") {
  use_two_threads();
  const Problem p = make_problem(8, 40, 3, 11);
  for (at::ScalarType dtype : {at::kDouble, at::kFloat})
    for (sapo::aggregation agg : all_aggregations)
      for (sapo::ratio_level ratio : all_ratios)
        for (bool by_step : {true, false}) {
          sapo::loss_options o;
          o.agg = agg;
          o.ratio = ratio;
          INFO(name(dtype) << ", " << name(agg) << ", ratio " << name(ratio) << ", "
                           << (by_step ? "step" : "token") << " advantages");
          check_against_reference(p, dtype, by_step, false, o);
        }
}

TEST_CASE("torch policy_loss: KL k1/k2/k3, dual clip, other clip bounds and global normalizers", "[torch][loss]") {
  use_two_threads();
  const Problem p = make_problem(6, 33, 4, 12);
  for (at::ScalarType dtype : {at::kDouble, at::kFloat}) {
    for (sapo::kl_estimator kl : {sapo::kl_estimator::k1, sapo::kl_estimator::k2, sapo::kl_estimator::k3})
      for (sapo::ratio_level ratio : all_ratios)
        for (sapo::aggregation agg : {sapo::aggregation::token_mean, sapo::aggregation::step_mean}) {
          sapo::loss_options o;
          o.kl = kl;
          o.kl_coef = 0.07;
          o.ratio = ratio;
          o.agg = agg;
          o.dual_clip = true;
          o.dual_clip_c = 1.5;
          o.clip_low = 0.1;
          o.clip_high = 0.28;
          INFO(name(dtype) << ", KL " << name(kl) << ", ratio " << name(ratio) << ", " << name(agg));
          check_against_reference(p, dtype, true, true, o);
        }
    INFO(name(dtype) << ": global normalizers");
    sapo::loss_options o;
    o.global_tokens = 1000;
    check_against_reference(p, dtype, false, true, o);
    o.agg = sapo::aggregation::seq_mean_token_mean;
    o.global_sequences = 17;
    check_against_reference(p, dtype, false, true, o);
    o.agg = sapo::aggregation::seq_mean_token_sum_norm;
    o.max_response_length = 50;
    check_against_reference(p, dtype, false, true, o);
    o.agg = sapo::aggregation::step_mean;
    o.global_steps = 31;
    check_against_reference(p, dtype, true, false, o);
  }
}

TEST_CASE("torch policy_loss: upstream gradient != 1 and a loss used twice", "[torch][autograd]") {
  use_two_threads();
  const Problem p = make_problem(5, 24, 3, 13);
  for (at::ScalarType dtype : {at::kDouble, at::kFloat}) {
    INFO(name(dtype));
    sapo::loss_options o;
    o.ratio = sapo::ratio_level::step;
    o.agg = sapo::aggregation::step_mean;
    auto run = [&](const Tensor& logp) {
      return st::policy_loss(logp, p.old_logp.to(dtype), p.step, p.step_adv.to(dtype), p.mask.to(dtype), o);
    };
    const Tensor base = p.logp.to(dtype);
    const Tensor g1 = st::policy_loss_forward({base, p.old_logp.to(dtype), p.mask.to(dtype), Tensor(),
                                               p.step_adv.to(dtype), p.step, Tensor()},
                                              o)
                          .grad;
    const double tol = dtype == at::kDouble ? 1e-14 : 1e-6;

    {  // backward(2.5)
      const Tensor logp = base.clone().requires_grad_();
      run(logp).loss.backward(at::scalar_tensor(2.5, at::TensorOptions().dtype(dtype)));
      CHECK(max_abs(logp.grad() - 2.5 * g1) <= tol * max_abs(g1));
    }
    {  // the gradient of -1.75 * loss through torch::autograd::grad
      const Tensor logp = base.clone().requires_grad_();
      const Tensor g = torch::autograd::grad({run(logp).loss * -1.75}, {logp})[0];
      CHECK(max_abs(g + 1.75 * g1) <= tol * max_abs(g1));
    }
    {  // loss * 3 + loss ** 2: one backward call with d/dloss = 3 + 2 loss
      const Tensor logp = base.clone().requires_grad_();
      const Tensor loss = run(logp).loss;
      (loss * 3 + loss.pow(2)).backward();
      const double factor = 3 + 2 * loss.item<double>();
      CHECK(max_abs(logp.grad() - factor * g1) <= tol * std::abs(factor) * max_abs(g1));
    }
    {  // two calls of the loss on the same logp accumulate
      const Tensor logp = base.clone().requires_grad_();
      (run(logp).loss + 0.5 * run(logp).loss).backward();
      CHECK(max_abs(logp.grad() - 1.5 * g1) <= tol * max_abs(g1));
    }
    {  // no input requires grad: no graph, diagnostics still there
      const st::policy_loss_output out = run(base);
      CHECK_FALSE(out.loss.requires_grad());
      CHECK_FALSE(out.diagnostics.requires_grad());
      CHECK(out.result().n_tokens > 0);
      CHECK(out.loss.item<double>() == st::policy_loss_forward({base, p.old_logp.to(dtype), p.mask.to(dtype), Tensor(),
                                                                p.step_adv.to(dtype), p.step, Tensor()},
                                                               o)
                                           .loss.item<double>());
    }
  }
}

TEST_CASE("torch policy_loss: strided, transposed and broadcast inputs are viewed in place, same results",
          "[torch][strides]") {
  use_two_threads();
  const Problem p = make_problem(7, 30, 3, 14);
  const int64_t B = p.B, T = p.T, K = p.K;
  for (at::ScalarType dtype : {at::kDouble, at::kFloat}) {
    INFO(name(dtype));
    const auto opt = at::TensorOptions().dtype(dtype);
    sapo::loss_options o;
    o.ratio = sapo::ratio_level::step;
    o.agg = sapo::aggregation::seq_mean_token_mean;
    o.kl_coef = 0.05;

    st::loss_inputs flat;
    flat.logp = p.logp.to(dtype).clone().requires_grad_();
    flat.old_logp = p.old_logp.to(dtype);
    flat.ref_logp = p.ref_logp.to(dtype);
    flat.mask = p.mask.to(dtype);
    flat.step = p.step;
    flat.step_advantages = p.step_adv.to(dtype);
    const st::policy_loss_output expected = st::policy_loss(flat, o);
    expected.loss.backward();

    // logp: every other column of a wider leaf; old_logp, step, step_advantages: transposed
    // storage; ref_logp: a row slice with padding; mask: a column slice of a wider tensor.
    const Tensor big = at::full({B, 2 * T}, 123.0, opt).requires_grad_();
    {
      at::NoGradGuard no_grad;
      big.slice(1, 0, 2 * T, 2).copy_(flat.logp.detach());
    }
    st::loss_inputs strided;
    strided.logp = big.slice(1, 0, 2 * T, 2);
    strided.old_logp = flat.old_logp.t().contiguous().t();
    strided.ref_logp = at::full({B + 3, T + 5}, -1.0, opt).slice(0, 2, 2 + B).slice(1, 5, 5 + T);
    strided.ref_logp.copy_(flat.ref_logp);
    strided.mask = at::zeros({B, T + 4}, opt).slice(1, 1, 1 + T);
    strided.mask.copy_(flat.mask);
    strided.step = p.step.t().contiguous().t();
    strided.step_advantages = flat.step_advantages.t().contiguous().t();
    REQUIRE(strided.logp.stride(1) == 2);
    REQUIRE(strided.old_logp.stride(0) == 1);
    REQUIRE_FALSE(strided.ref_logp.is_contiguous());
    REQUIRE(strided.step.stride(0) == 1);
    REQUIRE(strided.step_advantages.stride(1) == B);

    // The views address the tensors' own storage with their strides (no copy).
    const Tensor& sl = strided.logp;
    if (dtype == at::kFloat) {
      const auto v = st::detail::mat<const float>(sl);
      CHECK(static_cast<const void*>(v.data) == sl.data_ptr());
      CHECK(v.rows == B);
      CHECK(v.cols == T);
      CHECK(v.row_stride == 2 * T);
      CHECK(v.col_stride == 2);
    }

    const st::policy_loss_output got = st::policy_loss(strided, o);
    got.loss.backward();
    // The kernel's results do not depend on the layout: bit-identical.
    CHECK(got.loss.item<double>() == expected.loss.item<double>());
    CHECK(at::equal(got.diagnostics, expected.diagnostics));
    CHECK(at::equal(big.grad().slice(1, 0, 2 * T, 2), flat.logp.grad()));
    CHECK(max_abs(big.grad().slice(1, 1, 2 * T, 2)) == 0.0);  // the columns in between

    // A mask of ones broadcast with zero strides, and a bool mask.
    const Tensor ones = at::ones({1, 1}, opt).expand({B, T});
    REQUIRE(ones.stride(0) == 0);
    REQUIRE(ones.stride(1) == 0);
    st::loss_inputs all_on = flat;
    all_on.logp = flat.logp.detach();
    all_on.mask = ones;
    all_on.step = p.step.masked_fill(p.mask == 0, -1);  // no garbage ids under the new mask
    st::loss_inputs all_on_bool = all_on;
    all_on_bool.mask = at::ones({B, T}, at::TensorOptions().dtype(at::kBool));
    st::loss_inputs all_on_flat = all_on;
    all_on_flat.mask = at::ones({B, T}, opt);
    const auto r1 = st::policy_loss_forward(all_on, o), r2 = st::policy_loss_forward(all_on_bool, o),
               r3 = st::policy_loss_forward(all_on_flat, o);
    CHECK(r1.result().n_tokens == B * T);
    CHECK(at::equal(r1.grad, r3.grad));
    CHECK(at::equal(r2.grad, r3.grad));
    CHECK(at::equal(r1.diagnostics, r3.diagnostics));

    // int64 step ids and int32 / int64 / uint8 masks give the same result.
    st::loss_inputs other = flat;
    other.logp = flat.logp.detach();
    other.step = p.step.to(at::kLong);
    other.mask = p.mask.to(at::kLong);
    const auto r4 = st::policy_loss_forward(other, o);
    other.mask = p.mask.to(at::kByte);
    const auto r5 = st::policy_loss_forward(other, o);
    other.mask = p.mask.to(at::kInt);
    const auto r6 = st::policy_loss_forward(other, o);
    const auto r0 = st::policy_loss_forward(flat, o);
    CHECK(at::equal(r4.grad, r0.grad));
    CHECK(at::equal(r5.grad, r0.grad));
    CHECK(at::equal(r6.grad, r0.grad));
    (void)K;
  }
}

TEST_CASE("torch policy_loss: bfloat16 / float16 inputs compute in float32, gradient in the input dtype",
          "[torch][dtypes]") {
  use_two_threads();
  const Problem p = make_problem(6, 28, 3, 15);
  for (at::ScalarType half : {at::kBFloat16, at::kHalf}) {
    INFO(name(half));
    sapo::loss_options o;
    o.ratio = sapo::ratio_level::sequence;
    o.kl_coef = 0.02;
    o.kl = sapo::kl_estimator::k2;
    st::loss_inputs in;
    in.logp = p.logp.to(half).clone().requires_grad_();
    in.old_logp = p.old_logp.to(half);
    in.ref_logp = p.ref_logp.to(half);
    in.mask = p.mask.to(half);
    in.token_advantages = p.token_adv.to(half);
    in.step = p.step;
    const st::policy_loss_output out = st::policy_loss(in, o);
    CHECK(out.loss.scalar_type() == half);
    CHECK(out.diagnostics.scalar_type() == at::kDouble);
    out.loss.backward();
    REQUIRE(in.logp.grad().scalar_type() == half);

    // The same values in float32: the half path is exactly the float32 path, rounded at the end.
    st::loss_inputs f = in;
    f.logp = in.logp.detach().to(at::kFloat);
    f.old_logp = in.old_logp.to(at::kFloat);
    f.ref_logp = in.ref_logp.to(at::kFloat);
    f.mask = in.mask.to(at::kFloat);
    f.token_advantages = in.token_advantages.to(at::kFloat);
    const st::policy_loss_forward_output single = st::policy_loss_forward(f, o);
    CHECK(at::equal(in.logp.grad(), single.grad.to(half)));
    CHECK(at::equal(out.diagnostics, single.diagnostics));
    CHECK(out.loss.item<double>() == at::scalar_tensor(single.result().loss, at::TensorOptions().dtype(half))
                                         .item<double>());

    // Mixed dtypes: half logp with float32 old_logp and advantages (converted, same result).
    st::loss_inputs mixed = in;
    mixed.logp = in.logp.detach();
    mixed.old_logp = f.old_logp;
    mixed.token_advantages = f.token_advantages;
    mixed.mask = p.mask.to(at::kBool);
    const auto m = st::policy_loss_forward(mixed, o);
    CHECK(at::equal(m.grad, single.grad.to(half)));
    CHECK(m.grad.scalar_type() == half);

    // And against the float64 reference, within half precision of the gradient's scale.
    const Tensor logp64 = in.logp.detach().to(at::kDouble).requires_grad_();
    const Reference ref = reference_loss(logp64, p, in.old_logp, in.ref_logp, in.token_advantages, false, o);
    ref.loss.backward();
    CHECK(std::abs(out.result().loss - ref.loss.item<double>()) <= 1e-5 * (1 + std::abs(ref.loss.item<double>())));
    CHECK(max_abs(in.logp.grad().to(at::kDouble) - logp64.grad()) <= 1e-2 * max_abs(logp64.grad()));
  }
}

TEST_CASE("torch policy_loss: the torch.ops dispatcher path gives the same loss and gradient", "[torch][ops]") {
  use_two_threads();
  const Problem p = make_problem(6, 26, 3, 16);
  const c10::OperatorHandle handle = c10::Dispatcher::singleton().findSchemaOrThrow("sapo::policy_loss", "");
  const auto op = handle.typed<st::kernels::policy_loss_fn>();

  sapo::loss_options o;
  o.ratio = sapo::ratio_level::step;
  o.agg = sapo::aggregation::step_mean;
  o.kl_coef = 0.03;
  o.kl = sapo::kl_estimator::k1;
  const Tensor logp_a = p.logp.to(at::kFloat).requires_grad_(), logp_b = p.logp.to(at::kFloat).requires_grad_();
  const Tensor old = p.old_logp.to(at::kFloat), ref = p.ref_logp.to(at::kFloat), A = p.step_adv.to(at::kFloat);
  const Tensor mask = p.mask.to(at::kBool);

  st::loss_inputs in;
  in.logp = logp_a;
  in.old_logp = old;
  in.mask = mask;
  in.step = p.step;
  in.step_advantages = A;
  in.ref_logp = ref;
  const st::policy_loss_output api = st::policy_loss(in, o);
  api.loss.backward();

  Tensor loss, diagnostics;
  std::tie(loss, diagnostics) = op.call(logp_b, old, mask, c10::nullopt, A, p.step, ref, "step", 0.2, 0.2, false, 3.0,
                                        0.03, "k1", "step_mean", 0.0, 0.0, 0.0, 0.0, "error", 0);
  REQUIRE(loss.requires_grad());
  CHECK_FALSE(diagnostics.requires_grad());
  (loss * 2).backward();
  CHECK(loss.item<double>() == api.loss.item<double>());
  CHECK(at::equal(diagnostics, api.diagnostics));
  CHECK(at::equal(logp_b.grad(), 2 * logp_a.grad()));

  // The schema as Python sees it: defaults, keyword-only options.
  const c10::FunctionSchema& schema = handle.schema();
  std::ostringstream text;
  text << schema;
  INFO(text.str());
  CHECK(text.str().find("str ratio=\"token\"") != std::string::npos);
  CHECK(text.str().find("Tensor? step_advantages=None") != std::string::npos);
  for (const c10::Argument& a : schema.arguments())
    if (a.name() != "logp" && a.name() != "old_logp" && a.name() != "mask") CHECK(a.default_value().has_value());
  CHECK(schema.arguments()[7].name() == "ratio");
  CHECK(schema.arguments()[7].kwarg_only());

  // Every op is registered, with a CPU kernel (policy_loss: composite, any device).
  for (const char* n : {"sapo::segment_steps", "sapo::step_rewards", "sapo::group_advantages",
                        "sapo::outcome_advantages", "sapo::mix_advantages", "sapo::broadcast_step_advantages",
                        "sapo::broadcast_outcome_advantages", "sapo::policy_loss_fwd"}) {
    INFO(n);
    const c10::OperatorHandle h = c10::Dispatcher::singleton().findSchemaOrThrow(n, "");
    CHECK(h.hasKernelForDispatchKey(c10::DispatchKey::CPU));
    CHECK(h.hasKernelForDispatchKey(c10::DispatchKey::CUDA));      // the "no CUDA kernels" message
    CHECK(h.hasKernelForDispatchKey(c10::DispatchKey::Autograd));  // fallthrough: not differentiable
  }
  CHECK(handle.hasKernelForDispatchKey(c10::DispatchKey::CompositeImplicitAutograd));

  // The diagnostic names, as torch.ops.sapo.loss_diagnostic_names() returns them.
  const auto names = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("sapo::loss_diagnostic_names", "")
                         .typed<std::vector<std::string>()>()
                         .call();
  REQUIRE(names.size() == st::loss_diagnostic_names.size());
  CHECK(names[0] == "loss");
  CHECK(names[7] == "approx_kl_old_k3");
  CHECK(names[12] == "n_nonfinite_masked");
}

TEST_CASE("torch adapter: bad inputs give TORCH_CHECK messages naming the tensor and both shapes", "[torch][errors]") {
  use_two_threads();
  const Problem p = make_problem(8, 40, 3, 17);
  const Tensor logp = p.logp.to(at::kFloat), old = p.old_logp.to(at::kFloat), mask = p.mask.to(at::kFloat);
  const Tensor adv = p.token_adv.to(at::kFloat), A = p.step_adv.to(at::kFloat);
  using Catch::Contains;

  CHECK_THROWS_AS(st::policy_loss(logp, old.slice(1, 0, 39), adv, mask), c10::Error);
  CHECK_THROWS_WITH(st::policy_loss(logp, old.slice(1, 0, 39), adv, mask),
                    Contains("old_logp must have shape (B, T) = (8, 40), got (8, 39)"));
  CHECK_THROWS_WITH(st::policy_loss(logp, old, adv, mask.unsqueeze(2)),
                    Contains("mask must have shape (B, T) = (8, 40), got (8, 40, 1)"));
  CHECK_THROWS_WITH(st::policy_loss(logp, old, adv.slice(0, 0, 7), mask),
                    Contains("token_advantages must have shape (B, T) = (8, 40), got (7, 40)"));
  CHECK_THROWS_WITH(st::policy_loss(logp[0], old, adv, mask), Contains("logp must be a 2-D tensor (B, T), got shape (40)"));
  CHECK_THROWS_WITH(st::policy_loss(logp, old, p.step, A.slice(0, 0, 7), mask),
                    Contains("step_advantages must have shape (B, K) with B = 8, got (7, 3)"));
  CHECK_THROWS_WITH(st::policy_loss(logp, old, p.step.slice(1, 0, 20), A, mask),
                    Contains("step must have shape (B, T) = (8, 40), got (8, 20)"));
  CHECK_THROWS_WITH(st::policy_loss(logp.to(at::kLong), old, adv, mask),
                    Contains("logp must have a floating dtype (float32, float64, bfloat16 or float16), got int64"));
  CHECK_THROWS_WITH(st::policy_loss(logp, old, p.step.to(at::kFloat), A, mask),
                    Contains("step must have an integer dtype (int64 or int32), got float32"));
  {
    st::loss_inputs both;
    both.logp = logp;
    both.old_logp = old;
    both.mask = mask;
    both.token_advantages = adv;
    both.step_advantages = A;
    both.step = p.step;
    CHECK_THROWS_WITH(st::policy_loss(both), Contains("give exactly one of token_advantages (B, T) and "
                                                      "step_advantages (B, K), got both"));
    both.token_advantages = Tensor();
    both.ref_logp = p.ref_logp.to(at::kFloat).t();
    CHECK_THROWS_WITH(st::policy_loss(both), Contains("ref_logp must have shape (B, T) = (8, 40), got (40, 8)"));
  }

  // sapo::error from the kernels: a c10::Error carrying the kernel's message.
  sapo::loss_options bad;
  bad.clip_low = 1.5;
  CHECK_THROWS_AS(st::policy_loss(logp, old, adv, mask, bad), c10::Error);
  CHECK_THROWS_WITH(st::policy_loss(logp, old, adv, mask, bad),
                    Contains("sapo: options.clip_low: expected a value in (0, 1), got 1.5"));
  {
    Tensor s = p.step.clone();
    s[0][10] = 7;
    CHECK_THROWS_WITH(st::policy_loss(logp, old, s, A, mask), Contains("sapo: step: expected ids in [-1, 3) at (0, 10)"));
    Tensor m = mask.clone();
    m[2][5] = 0.5;
    CHECK_THROWS_WITH(st::policy_loss(logp, old, adv, m), Contains("sapo: mask: expected 0 or 1 at (2, 5), got 0.5"));
    Tensor l = logp.clone();
    l[1][10] = std::nanf("");
    CHECK_THROWS_WITH(st::policy_loss(l, old, adv, mask), Contains("finite values at masked-in token (1, 10)"));
    sapo::loss_options drop;
    drop.nonfinite = sapo::nonfinite_policy::mask;
    CHECK(st::policy_loss(l, old, adv, mask, drop).result().n_nonfinite_masked == 1);
  }

  // Option strings of the ops.
  const auto op = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("sapo::policy_loss", "")
                      .typed<st::kernels::policy_loss_fn>();
  CHECK_THROWS_WITH(op.call(logp, old, mask, adv, c10::nullopt, c10::nullopt, c10::nullopt, "tokens", 0.2, 0.2, false,
                            3.0, 0.0, "k3", "token_mean", 0.0, 0.0, 0.0, 0.0, "error", 0),
                    Contains("ratio must be one of 'token', 'step', 'sequence', got 'tokens'"));
  CHECK_THROWS_WITH(op.call(logp, old, mask, adv, c10::nullopt, c10::nullopt, c10::nullopt, "token", 0.2, 0.2, false,
                            3.0, 0.0, "k3", "mean", 0.0, 0.0, 0.0, 0.0, "error", 0),
                    Contains("agg must be one of 'token_mean', "));

  // Devices: the CUDA key answers with a message of its own (this libtorch has no CUDA,
  // so the CUDA kernel is reached by redispatching CPU tensors to it).
  const auto fwd = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sapo::policy_loss_fwd", "")
                       .typed<st::kernels::policy_loss_fwd_fn>();
  CHECK_THROWS_WITH(fwd.redispatch(c10::DispatchKeySet(c10::DispatchKey::CUDA), logp, old, mask, adv, c10::nullopt,
                                   c10::nullopt, c10::nullopt, "token", 0.2, 0.2, false, 3.0, 0.0, "k3", "token_mean",
                                   0.0, 0.0, 0.0, 0.0, "error", 0),
                    Contains("sapo::policy_loss_fwd: an input is a CUDA tensor, but this build of sapo_torch has no "
                             "CUDA kernels"));
  CHECK_THROWS_WITH(st::cpu::policy_loss_fwd(logp.to(at::kMeta), old, mask, adv, c10::nullopt, c10::nullopt,
                                             c10::nullopt, "token", 0.2, 0.2, false, 3.0, 0.0, "k3", "token_mean", 0.0,
                                             0.0, 0.0, 0.0, "error", 0),
                    Contains("logp must be a CPU tensor for the CPU kernel, got device meta"));

  // Stage functions.
  CHECK_THROWS_WITH(st::group_advantages(p.step_adv, 3),
                    Contains("sapo: groups.group_size: expected a divisor of the batch size B = 8, got 3"));
  CHECK_THROWS_WITH(st::group_advantages(p.step_adv, at::zeros({7}, at::TensorOptions().dtype(at::kLong)), 2),
                    Contains("group_ids must have shape (B) = (8), got (7)"));
  CHECK_THROWS_WITH(st::broadcast_step_advantages(p.step_adv, p.step, mask.slice(1, 0, 39)),
                    Contains("mask must have shape (B, T) = (8, 40), got (8, 39)"));
  CHECK_THROWS_WITH(st::broadcast_outcome_advantages(p.step_adv.select(1, 0).slice(0, 0, 6), mask),
                    Contains("adv must have shape (B) = (8), got (6)"));
  CHECK_THROWS_WITH(st::mix_advantages(p.step_adv.select(1, 0), p.step_adv.t()),
                    Contains("outcome_adv must have shape (B) = (3), got (8)"));
  CHECK_THROWS_WITH(st::step_rewards(at::zeros({4, 3}, at::TensorOptions().dtype(at::kLong)),
                                     at::zeros({4}, at::TensorOptions().dtype(at::kBool)),
                                     at::zeros({4, 2}, at::TensorOptions().dtype(at::kLong))),
                    Contains("targets must have shape (B, K) = (4, 3), got (4, 2)"));
  sapo::segment_options seg;
  seg.num_steps = 3;
  seg.sid_ranges = {{1000, 1768}};
  const Tensor tokens = at::zeros({4, 10}, at::TensorOptions().dtype(at::kLong));
  CHECK_THROWS_WITH(st::segment_steps(tokens, at::ones({4, 9}), seg),
                    Contains("mask must have shape (B, T) = (4, 10), got (4, 9)"));
  CHECK_THROWS_WITH(st::segment_steps(tokens.to(at::kFloat), at::ones({4, 10}), seg),
                    Contains("tokens must have an integer dtype (int64 or int32), got float32"));
  seg.sid_ranges = {{1000, 900}};
  CHECK_THROWS_WITH(st::segment_steps(tokens, at::ones({4, 10}), seg),
                    Contains("sapo: options.sid_ranges: expected lo < hi in range 0, got [1000, 900)"));
}

// ---------------------------------------------------------------------------------------
// Stage functions against the core kernels on plain std::vector buffers.
// ---------------------------------------------------------------------------------------
namespace {

constexpr int64_t think_end = 7;
const std::vector<sapo::token_range> level_ranges = {{1000, 1256}, {1256, 1512}, {1512, 1768}};

/// Responses of K steps in either layout, some malformed (unfinished, wrong level, extra
/// SID token), after a prompt and before padding (mask 0 on both).
void make_tokens(int64_t B, int64_t T, sapo::step_layout layout, unsigned seed, std::vector<int64_t>& tok,
                 std::vector<uint8_t>& mask) {
  const int64_t K = 3;
  std::mt19937 rng(seed);
  tok.assign(static_cast<size_t>(B * T), 0);
  mask.assign(static_cast<size_t>(B * T), 0);
  for (int64_t i = 0; i < B; ++i) {
    std::vector<int64_t> row;
    const int64_t prompt = 1 + static_cast<int64_t>(rng() % 3);
    for (int64_t j = 0; j < prompt; ++j) row.push_back(10 + static_cast<int64_t>(rng() % 900));
    std::vector<int64_t> resp;
    auto think = [&] {
      const int n = static_cast<int>(rng() % 4);
      for (int j = 0; j < n; ++j) resp.push_back(10 + static_cast<int64_t>(rng() % 900));
    };
    auto sid = [&](int64_t k) {
      const int64_t level = (i % 6 == 4 && k == 1) ? 2 : k;  // wrong level in some rows
      resp.push_back(level_ranges[static_cast<size_t>(level)].lo + static_cast<int64_t>(rng() % 4));
    };
    const int64_t closed = i % 6 == 3 ? K - 1 : K;  // unfinished rows
    if (layout == sapo::step_layout::interleaved) {
      for (int64_t k = 0; k < closed; ++k) {
        think();
        sid(k);
      }
      if (closed < K) think();
    } else {
      for (int64_t k = 0; k < closed; ++k) {
        think();
        resp.push_back(think_end);
      }
      if (closed == K)
        for (int64_t k = 0; k < K; ++k) sid(k);
    }
    if (i % 6 == 5) sid(0);  // an extra SID token
    resp.push_back(2);       // eos
    for (size_t t = 0; t < row.size() + resp.size() && static_cast<int64_t>(t) < T; ++t) {
      const bool in_resp = t >= row.size();
      tok[static_cast<size_t>(i * T) + t] = in_resp ? resp[t - row.size()] : row[t];
      mask[static_cast<size_t>(i * T) + t] = in_resp ? 1 : 0;
    }
  }
}

Tensor long_tensor(const std::vector<int64_t>& v, int64_t rows, int64_t cols) {
  return at::from_blob(const_cast<int64_t*>(v.data()), {rows, cols}, at::TensorOptions().dtype(at::kLong)).clone();
}

}  // namespace

TEST_CASE("torch stage functions: segment_steps and step_rewards equal the core kernels", "[torch][stages]") {
  use_two_threads();
  const int64_t B = 12, T = 32, K = 3;
  for (sapo::step_layout layout : {sapo::step_layout::interleaved, sapo::step_layout::think_then_sid}) {
    INFO("layout " << static_cast<int>(layout));
    std::vector<int64_t> tok;
    std::vector<uint8_t> mask;
    make_tokens(B, T, layout, 21 + static_cast<unsigned>(layout), tok, mask);
    sapo::segment_options seg;
    seg.num_steps = K;
    seg.layout = layout;
    seg.sid_ranges = level_ranges;
    seg.think_end_id = think_end;
    seg.codes_per_level = {256, 256, 3};
    if (layout == sapo::step_layout::think_then_sid) {
      seg.tail = sapo::tail_policy::last_step;
      seg.sid_token_in_step = false;
    }
    std::vector<int32_t> step(static_cast<size_t>(B * T)), n_steps(static_cast<size_t>(B));
    std::vector<int64_t> codes(static_cast<size_t>(B * K));
    std::vector<uint8_t> malformed(static_cast<size_t>(B));
    const sapo::segment_stats core = sapo::segment_steps(
        sapo::mat_view<const int64_t>(tok.data(), B, T), sapo::mat_view<const uint8_t>(mask.data(), B, T), seg,
        {sapo::mat_view<int32_t>(step.data(), B, T), sapo::vec_view<int32_t>(n_steps.data(), B),
         sapo::mat_view<int64_t>(codes.data(), B, K), sapo::vec_view<uint8_t>(malformed.data(), B)});
    REQUIRE(core.n_malformed > 0);
    REQUIRE(core.n_malformed < B);

    const Tensor tokens = long_tensor(tok, B, T);
    const Tensor mask_u8 = at::from_blob(mask.data(), {B, T}, at::TensorOptions().dtype(at::kByte)).clone();
    // int64 tokens with a float mask; int32 tokens, transposed, with a bool mask.
    const Tensor tokens_t = tokens.to(at::kInt).t().contiguous().t();
    for (const auto& args : {std::make_pair(tokens, mask_u8.to(at::kFloat)), std::make_pair(tokens_t, mask_u8.to(at::kBool))}) {
      const st::segment_result r = st::segment_steps(args.first, args.second, seg);
      REQUIRE(r.step.scalar_type() == at::kInt);
      REQUIRE(r.n_steps.scalar_type() == at::kInt);
      REQUIRE(r.codes.scalar_type() == at::kLong);
      REQUIRE(r.malformed.scalar_type() == at::kBool);
      CHECK(values<int32_t>(r.step) == step);
      CHECK(values<int32_t>(r.n_steps) == n_steps);
      CHECK(values<int64_t>(r.codes) == codes);
      CHECK(values<uint8_t>(r.malformed.to(at::kByte)) == malformed);
      CHECK(r.n_malformed == core.n_malformed);
    }

    // Rewards: targets that match the codes at some levels.
    std::mt19937 rng(5);
    std::vector<int64_t> targets(codes);
    for (auto& y : targets)
      if (rng() % 3 == 0) y = static_cast<int64_t>(rng() % 4);
    const Tensor codes_t = st::segment_steps(tokens, mask_u8, seg).codes;
    const Tensor malformed_t = st::segment_steps(tokens, mask_u8, seg).malformed;
    for (sapo::reward_kind kind : {sapo::reward_kind::per_level, sapo::reward_kind::prefix,
                                   sapo::reward_kind::weighted_prefix, sapo::reward_kind::exact}) {
      sapo::reward_options ro;
      ro.kind = kind;
      ro.level_weights = {0.25, 0.5, 1.0};
      ro.malformed_reward = -0.5;
      std::vector<double> rewards(static_cast<size_t>(B * K));
      sapo::step_rewards(sapo::mat_view<const int64_t>(codes.data(), B, K),
                         sapo::vec_view<const uint8_t>(malformed.data(), B),
                         sapo::mat_view<const int64_t>(targets.data(), B, K), ro,
                         sapo::mat_view<double>(rewards.data(), B, K));
      const Tensor r64 = st::step_rewards(codes_t, malformed_t, long_tensor(targets, B, K), ro, at::kDouble);
      CHECK(r64.scalar_type() == at::kDouble);
      CHECK(values<double>(r64) == rewards);
      // Default float32; int32 codes and an int64 malformed flag; a transposed target.
      const Tensor r32 = st::step_rewards(codes_t.to(at::kInt), malformed_t.to(at::kLong),
                                          long_tensor(targets, B, K).t().contiguous().t(), ro);
      CHECK(r32.scalar_type() == at::kFloat);
      CHECK(at::equal(r32, r64.to(at::kFloat)));
      const Tensor rbf = st::step_rewards(codes_t, malformed_t, long_tensor(targets, B, K), ro, at::kBFloat16);
      CHECK(at::equal(rbf, r32.to(at::kBFloat16)));
    }
  }
}

TEST_CASE("torch stage functions: advantages, mixed mode and broadcasts equal the core kernels", "[torch][stages]") {
  use_two_threads();
  const int64_t B = 12, K = 3, T = 20, G = 4;
  std::mt19937 rng(31);
  std::vector<double> r(static_cast<size_t>(B * K));
  for (auto& v : r) v = (rng() % 7 == 0) ? std::nan("") : 0.5 * static_cast<double>(rng() % 3);
  const Tensor rewards = at::from_blob(r.data(), {B, K}, f64).clone();
  const std::vector<int64_t> ids = {0, 1, 0, 1, 2, 2, 2, 1, 3, 0, 0, 1};  // group 3 is a singleton

  auto compare_stats = [](const sapo::advantage_stats& a, const sapo::advantage_stats& b) {
    CHECK(a.mean_reward == b.mean_reward);
    CHECK(a.zero_variance_fraction == b.zero_variance_fraction);
    CHECK(a.advantage_std == b.advantage_std);
    CHECK(a.n_present == b.n_present);
    CHECK(a.n_zero_variance == b.n_zero_variance);
    CHECK(a.n_pairs == b.n_pairs);
  };

  for (sapo::normalization norm : {sapo::normalization::std, sapo::normalization::std_floor,
                                   sapo::normalization::none, sapo::normalization::loo,
                                   sapo::normalization::batch_std})
    for (bool explicit_ids : {false, true}) {
      INFO("norm " << static_cast<int>(norm) << (explicit_ids ? ", explicit ids" : ", contiguous"));
      sapo::advantage_options ao;
      ao.norm = norm;
      ao.singleton = sapo::singleton_policy::raw;
      ao.unbiased_std = norm != sapo::normalization::std_floor;
      const sapo::group_layout g = explicit_ids ? sapo::group_layout::explicit_ids({ids.data(), B}, 4)
                                                : sapo::group_layout::contiguous(G);
      std::vector<double> adv(static_cast<size_t>(B * K));
      const sapo::advantage_stats core =
          sapo::group_advantages(sapo::mat_view<const double>(r.data(), B, K), g, ao,
                                 sapo::mat_view<double>(adv.data(), B, K));
      const Tensor ids_t = long_tensor(ids, 1, B).view({B});
      const st::advantage_result a = explicit_ids ? st::group_advantages(rewards, ids_t.to(at::kInt), 4, ao)
                                                  : st::group_advantages(rewards, G, ao);
      CHECK(a.adv.scalar_type() == at::kDouble);
      CHECK(values<double>(a.adv) == adv);
      REQUIRE(a.stats.sizes() == at::IntArrayRef({6, K}));
      compare_stats(a.statistics(), core);
      // Transposed (column-major) rewards: viewed in place, same values.
      const st::advantage_result at_ = explicit_ids ? st::group_advantages(rewards.t().contiguous().t(), ids_t, 4, ao)
                                                    : st::group_advantages(rewards.t().contiguous().t(), G, ao);
      CHECK(at::equal(at_.adv, a.adv));
      // float32 and bfloat16 rewards: the float kernel, rounded to the input dtype.
      std::vector<float> r32(r.begin(), r.end()), adv32(static_cast<size_t>(B * K));
      sapo::group_advantages(sapo::mat_view<const float>(r32.data(), B, K), g, ao,
                             sapo::mat_view<float>(adv32.data(), B, K));
      const st::advantage_result af = explicit_ids ? st::group_advantages(rewards.to(at::kFloat), ids_t, 4, ao)
                                                   : st::group_advantages(rewards.to(at::kFloat), G, ao);
      CHECK(values<float>(af.adv) == adv32);
      const st::advantage_result ab = explicit_ids ? st::group_advantages(rewards.to(at::kBFloat16), ids_t, 4, ao)
                                                   : st::group_advantages(rewards.to(at::kBFloat16), G, ao);
      CHECK(ab.adv.scalar_type() == at::kBFloat16);
      CHECK(at::equal(ab.adv, af.adv.to(at::kBFloat16)));  // 0 / 0.5 / 1 rewards are exact in bfloat16

      // Outcome mode on column 0.
      std::vector<double> r0(static_cast<size_t>(B)), out0(static_cast<size_t>(B));
      for (int64_t i = 0; i < B; ++i) r0[static_cast<size_t>(i)] = r[static_cast<size_t>(i * K)];
      const sapo::advantage_stats core0 = sapo::outcome_advantages(sapo::vec_view<const double>(r0.data(), B), g, ao,
                                                                   sapo::vec_view<double>(out0.data(), B));
      const st::advantage_result o = explicit_ids ? st::outcome_advantages(rewards.select(1, 0), ids_t, 4, ao)
                                                  : st::outcome_advantages(rewards.select(1, 0), G, ao);
      CHECK(o.adv.dim() == 1);
      CHECK(values<double>(o.adv) == out0);
      REQUIRE(o.stats.sizes() == at::IntArrayRef({6, 1}));
      compare_stats(o.statistics(), core0);

      // Mixed mode.
      std::vector<double> mixed(static_cast<size_t>(B * K));
      sapo::mix_advantages(sapo::vec_view<const double>(out0.data(), B), sapo::mat_view<const double>(adv.data(), B, K),
                           {0.3, 0.9}, sapo::mat_view<double>(mixed.data(), B, K));
      CHECK(values<double>(st::mix_advantages(o.adv, a.adv, {0.3, 0.9})) == mixed);
    }

  // Broadcasts: step ids from a segmentation-like pattern, a float mask.
  const Problem p = make_problem(B, T, K, 41);
  std::vector<double> A = values<double>(p.step_adv), m = values<double>(p.mask), token(static_cast<size_t>(B * T));
  std::vector<int32_t> s = values<int32_t>(p.step);
  sapo::broadcast_step_advantages(sapo::mat_view<const double>(A.data(), B, K), sapo::mat_view<const int32_t>(s.data(), B, T),
                                  sapo::mat_view<const double>(m.data(), B, T), sapo::mat_view<double>(token.data(), B, T));
  CHECK(values<double>(st::broadcast_step_advantages(p.step_adv, p.step, p.mask)) == token);
  CHECK(values<double>(st::broadcast_step_advantages(p.step_adv.t().contiguous().t(), p.step.to(at::kLong),
                                                     p.mask.to(at::kBool))) == token);
  const Tensor tok32 = st::broadcast_step_advantages(p.step_adv.to(at::kFloat), p.step, p.mask);
  CHECK(tok32.scalar_type() == at::kFloat);
  CHECK(at::equal(tok32, at::from_blob(token.data(), {B, T}, f64).to(at::kFloat)));
  std::vector<double> out(static_cast<size_t>(B * T));
  sapo::broadcast_outcome_advantages(sapo::vec_view<const double>(A.data(), B, K),  // column 0 of A
                                     sapo::mat_view<const double>(m.data(), B, T), sapo::mat_view<double>(out.data(), B, T));
  CHECK(values<double>(st::broadcast_outcome_advantages(p.step_adv.select(1, 0), p.mask.to(at::kInt))) == out);

  // Inputs that require grad give plain outputs (the ops are not differentiable).
  const Tensor rg = rewards.nan_to_num(0.0).requires_grad_();
  CHECK_FALSE(st::group_advantages(rg, G).adv.requires_grad());
}

TEST_CASE("torch policy_loss: results do not depend on the thread count", "[torch][threads]") {
  const Problem p = make_problem(64, 1024, 4, 51);  // 4 row chunks of 16 rows: 2 threads at most
  st::loss_inputs in;
  in.logp = p.logp.to(at::kFloat);
  in.old_logp = p.old_logp.to(at::kFloat);
  in.mask = p.mask.to(at::kFloat);
  in.step = p.step;
  in.step_advantages = p.step_adv.to(at::kFloat);
  sapo::loss_options o;
  o.ratio = sapo::ratio_level::step;
  o.agg = sapo::aggregation::step_mean;
  o.num_threads = 1;
  const auto one = st::policy_loss_forward(in, o);
  o.num_threads = 3;
  const auto three = st::policy_loss_forward(in, o);
  o.num_threads = 0;  // torch's setting
  torch::set_num_threads(2);
  const auto torch_threads = st::policy_loss_forward(in, o);
  CHECK(at::equal(one.grad, three.grad));
  CHECK(at::equal(one.diagnostics, three.diagnostics));
  CHECK(at::equal(one.grad, torch_threads.grad));
  CHECK(at::equal(one.diagnostics, torch_threads.diagnostics));
}

TEST_CASE("torch policy_loss: empty batches give a zero loss and an empty gradient", "[torch][edge]") {
  for (int64_t B : {0, 3})
    for (int64_t T : {0, 5}) {
      if (B * T > 0) continue;
      INFO("B = " << B << ", T = " << T);
      const Tensor logp = at::zeros({B, T}).requires_grad_();
      const st::policy_loss_output out =
          st::policy_loss(logp, at::zeros({B, T}), at::zeros({B, T}), at::ones({B, T}, at::TensorOptions().dtype(at::kBool)));
      CHECK(out.loss.item<double>() == 0.0);
      out.loss.backward();
      CHECK(logp.grad().sizes() == logp.sizes());
      CHECK(out.result().n_tokens == 0);
    }
  // A batch whose mask is all 0: loss 0, gradient 0.
  const Tensor logp = at::randn({4, 6}).requires_grad_();
  const st::policy_loss_output out = st::policy_loss(logp, at::randn({4, 6}), at::randn({4, 6}), at::zeros({4, 6}));
  out.loss.backward();
  CHECK(out.loss.item<double>() == 0.0);
  CHECK(max_abs(logp.grad()) == 0.0);
}

// ---------------------------------------------------------------------------------------
// The distributed phases as dispatcher ops (sapo::group_partials, group_deviations,
// finalize_group_advantages, finish_advantage_std, loss_counts): ranks simulated by
// splitting one batch, their arrays reduced here (sum / min / max, the all-reduces of
// docs/distributed.md), against st::group_advantages on the whole batch.
// ---------------------------------------------------------------------------------------
namespace phases {
using opt = st::kernels::opt_tensor;

template <class Fn>
c10::TypedOperatorHandle<Fn> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

/// One rank's rows: rewards and either global ids or (group_size, first_row).
struct shard {
  Tensor rewards;
  opt ids;
  int64_t group_size = 0, first_row = 0;
};

/// The protocol over the shards; per shard (adv, stats after finish_advantage_std).
std::vector<std::pair<Tensor, Tensor>> run(const std::vector<shard>& shards, int64_t n_groups,
                                           const sapo::advantage_options& o) {
  const auto partials = op<st::kernels::group_partials_fn>("sapo::group_partials");
  const auto deviations = op<st::kernels::group_deviations_fn>("sapo::group_deviations");
  const auto finalize = op<st::kernels::finalize_group_advantages_fn>("sapo::finalize_group_advantages");
  const auto finish = op<st::kernels::finish_advantage_std_fn>("sapo::finish_advantage_std");
  std::vector<Tensor> counts, sums, mins, maxs;
  for (const shard& s : shards) {
    Tensor c, t, lo, hi;
    std::tie(c, t, lo, hi) = partials.call(s.rewards, s.group_size, s.ids, n_groups, s.first_row);
    counts.push_back(c);
    sums.push_back(t);
    mins.push_back(lo);
    maxs.push_back(hi);
  }
  const Tensor count = at::stack(counts).sum(0), total = at::stack(sums).sum(0);
  const Tensor lo = std::get<0>(at::stack(mins).min(0)), hi = std::get<0>(at::stack(maxs).max(0));
  std::vector<Tensor> sq;
  for (const shard& s : shards)
    sq.push_back(deviations.call(s.rewards, s.group_size, s.ids, n_groups, count, total, s.first_row));
  const Tensor sq_dev = at::stack(sq).sum(0);
  std::vector<std::tuple<Tensor, Tensor, Tensor>> fin;
  for (const shard& s : shards)
    fin.push_back(finalize.call(s.rewards, s.group_size, s.ids, n_groups, count, total, lo, hi, sq_dev, s.first_row,
                                st::detail::enum_name(o.norm, st::detail::norm_names), o.unbiased_std, o.eps,
                                st::detail::enum_name(o.singleton, st::detail::singleton_names)));
  Tensor a_sums = at::zeros({2, count.size(1)}, f64);
  for (const auto& f : fin) a_sums = a_sums + std::get<2>(f);
  std::vector<std::pair<Tensor, Tensor>> out;
  for (const auto& f : fin) out.emplace_back(std::get<0>(f), finish.call(std::get<1>(f), a_sums));
  return out;
}

bool close(const Tensor& a, const Tensor& b, double tol) {
  return a.sizes() == b.sizes() && ((a - b).abs() <= tol * (1 + b.abs())).all().item<bool>();
}

/// (6, K) statistics: rows 0-1 to 1e-12, the counts (rows 3-5) exactly, advantage_std
/// (row 2) through the variance, whose rounding error is relative to E[A^2] <= max A^2 (a
/// std near 0 is the square root of a rounding residue).
bool same_stats(const Tensor& got, const Tensor& want, const Tensor& adv) {
  if (got.sizes() != want.sizes()) return false;
  const double max_a2 = adv.numel() ? adv.pow(2).max().item<double>() : 0.0;
  return close(got.slice(0, 0, 2), want.slice(0, 0, 2), 1e-12) && at::equal(got.slice(0, 3), want.slice(0, 3)) &&
         ((got[2].pow(2) - want[2].pow(2)).abs() <= 1e-12 * max_a2 + 1e-300).all().item<bool>();
}
}  // namespace phases

TEST_CASE("torch distributed phase ops: split ranks reduced by hand equal group_advantages", "[torch][ops][distributed]") {
  use_two_threads();
  const int64_t B = 14, K = 3, n_groups = 5;  // group 4 is empty
  std::mt19937 rng(77);
  std::vector<double> r(static_cast<size_t>(B * K));
  for (auto& v : r)
    v = (rng() % 6 == 0) ? std::nan("") : (rng() % 2 ? 0.5 * static_cast<double>(rng() % 3) : (rng() % 1000) / 333.0);
  const Tensor rewards = at::from_blob(r.data(), {B, K}, f64).clone();
  const std::vector<int64_t> id_list = {0, 1, 0, 3, 2, 2, 1, 1, 0, 2, 3, 0, 1, 2};  // group 3: two members
  const Tensor ids = at::tensor(id_list);
  const Tensor rank0 = at::tensor(std::vector<int64_t>{0, 3, 4, 8, 13}), rank1 = at::tensor(std::vector<int64_t>{1, 2, 6, 7}),
               rank2 = at::tensor(std::vector<int64_t>{5, 9, 10, 11, 12});

  for (sapo::normalization norm : {sapo::normalization::std, sapo::normalization::std_floor, sapo::normalization::none,
                                   sapo::normalization::loo, sapo::normalization::batch_std})
    for (bool unbiased : {true, false}) {
      INFO("norm " << static_cast<int>(norm) << ", unbiased " << unbiased);
      sapo::advantage_options o;
      o.norm = norm;
      o.unbiased_std = unbiased;
      o.singleton = unbiased ? sapo::singleton_policy::zero : sapo::singleton_policy::raw;
      o.eps = 1e-3;
      const st::advantage_result single = st::group_advantages(rewards, ids, n_groups, o);

      // Scattered rows over three ranks, explicit global ids (int32 on one rank).
      std::vector<phases::shard> shards;
      for (const Tensor& rows : {rank0, rank1, rank2}) {
        phases::shard s;
        s.rewards = rewards.index_select(0, rows);
        s.ids = ids.index_select(0, rows);
        shards.push_back(s);
      }
      shards[1].ids = shards[1].ids->to(at::kInt);
      const auto got = phases::run(shards, n_groups, o);
      int q = 0;
      for (const Tensor& rows : {rank0, rank1, rank2}) {
        const Tensor adv = got[static_cast<size_t>(q)].first, stats = got[static_cast<size_t>(q)].second;
        ++q;
        CHECK(phases::close(adv, single.adv.index_select(0, rows), 1e-12));
        CHECK(phases::same_stats(stats, single.stats, single.adv));
      }

      // One rank holding everything: the very computation of group_advantages, bit for bit.
      phases::shard whole;
      whole.rewards = rewards;
      whole.ids = ids;
      const auto one = phases::run({whole}, n_groups, o);
      CHECK(at::equal(one[0].first, single.adv));
      CHECK(at::equal(one[0].second, single.stats));

      // Contiguous groups of 4 (n_groups 3 + 1 row outside: B = 12 here); rows [0, 5) and
      // [5, 12) so that group 1 straddles, plus an empty rank.
      const Tensor r12 = rewards.slice(0, 0, 12);
      const st::advantage_result single_c = st::group_advantages(r12, 4, o);
      std::vector<phases::shard> cuts(3);
      cuts[0].rewards = r12.slice(0, 0, 5);
      cuts[1].rewards = r12.slice(0, 5, 5);
      cuts[1].first_row = 5;
      cuts[2].rewards = r12.slice(0, 5, 12);
      cuts[2].first_row = 5;
      for (auto& c : cuts) c.group_size = 4;
      const auto got_c = phases::run(cuts, 3, o);
      CHECK(phases::close(got_c[0].first, single_c.adv.slice(0, 0, 5), 1e-12));
      CHECK(got_c[1].first.sizes() == at::IntArrayRef({0, K}));
      CHECK(phases::close(got_c[2].first, single_c.adv.slice(0, 5, 12), 1e-12));
      for (const auto& g : got_c) CHECK(phases::same_stats(g.second, single_c.stats, single_c.adv));
    }

  // The round-1 arrays of one rank against values counted here: row g = group g, last row
  // the batch; empty min +inf, empty max -inf.
  Tensor count, total, lo, hi;
  std::tie(count, total, lo, hi) = phases::op<st::kernels::group_partials_fn>("sapo::group_partials")
                                       .call(rewards, 0, ids, n_groups, 0);
  REQUIRE(count.sizes() == at::IntArrayRef({n_groups + 1, K}));
  CHECK(count.scalar_type() == at::kLong);
  CHECK(total.scalar_type() == at::kDouble);
  for (int64_t g = 0; g <= n_groups; ++g)
    for (int64_t k = 0; k < K; ++k) {
      int64_t n = 0;
      double s = 0, mn = INFINITY, mx = -INFINITY;
      for (int64_t i = 0; i < B; ++i) {
        const double v = r[static_cast<size_t>(i * K + k)];
        if (std::isnan(v) || (g < n_groups && id_list[static_cast<size_t>(i)] != g)) continue;
        ++n;
        s += v;
        mn = std::min(mn, v);
        mx = std::max(mx, v);
      }
      INFO("group " << g << ", step " << k);
      CHECK(count[g][k].item<int64_t>() == n);
      CHECK(std::abs(total[g][k].item<double>() - s) <= 1e-12 * (1 + std::abs(s)));
      CHECK(lo[g][k].item<double>() == mn);
      CHECK(hi[g][k].item<double>() == mx);
    }

  // loss_counts against counts made here from a mask and step ids.
  const Problem p = make_problem(7, 15, 3, 12);
  const Tensor counts = phases::op<st::kernels::loss_counts_fn>("sapo::loss_counts").call(p.mask, p.step);
  int64_t tokens = 0, sequences = 0, steps = 0;
  const std::vector<double> m = values<double>(p.mask);
  const std::vector<int32_t> s = values<int32_t>(p.step);
  for (int64_t i = 0; i < 7; ++i) {
    std::vector<bool> seen(3, false);
    int64_t row = 0;
    for (int64_t t = 0; t < 15; ++t) {
      const size_t j = static_cast<size_t>(i * 15 + t);
      if (m[j] == 0) continue;
      ++row;
      if (s[j] >= 0) seen[static_cast<size_t>(s[j])] = true;
    }
    tokens += row;
    sequences += row > 0;
    steps += std::count(seen.begin(), seen.end(), true);
  }
  CHECK(counts.scalar_type() == at::kLong);
  CHECK(values<int64_t>(counts) == std::vector<int64_t>{tokens, sequences, steps, 7});
  CHECK(values<int64_t>(phases::op<st::kernels::loss_counts_fn>("sapo::loss_counts").call(p.mask, c10::nullopt)) ==
        std::vector<int64_t>{tokens, sequences, 0, 7});

  // Registration: CPU, CUDA (message or kernel) and autograd fallthrough; the reduced arrays
  // are required keyword-only arguments.
  for (const char* n : {"sapo::group_partials", "sapo::group_deviations", "sapo::finalize_group_advantages",
                        "sapo::finish_advantage_std", "sapo::loss_counts"}) {
    INFO(n);
    const c10::OperatorHandle h = c10::Dispatcher::singleton().findSchemaOrThrow(n, "");
    CHECK(h.hasKernelForDispatchKey(c10::DispatchKey::CPU));
    CHECK(h.hasKernelForDispatchKey(c10::DispatchKey::CUDA));
    CHECK(h.hasKernelForDispatchKey(c10::DispatchKey::Autograd));
  }
  const c10::FunctionSchema& fs =
      c10::Dispatcher::singleton().findSchemaOrThrow("sapo::finalize_group_advantages", "").schema();
  CHECK(fs.arguments()[4].name() == "count");
  CHECK(fs.arguments()[4].kwarg_only());
  CHECK_FALSE(fs.arguments()[4].default_value().has_value());

  // Errors name the tensor and both shapes.
  using Catch::Contains;
  const auto deviations = phases::op<st::kernels::group_deviations_fn>("sapo::group_deviations");
  CHECK_THROWS_WITH(deviations.call(rewards, 0, ids, n_groups, count.slice(0, 0, n_groups), total, 0),
                    Contains("count must have shape (n_groups + 1, K) = (6, 3), got (5, 3)"));
  CHECK_THROWS_WITH(deviations.call(rewards, 0, ids, n_groups, count, total.t(), 0),
                    Contains("sum must have shape (n_groups + 1, K) = (6, 3), got (3, 6)"));
  CHECK_THROWS_WITH(deviations.call(rewards, 0, ids.slice(0, 0, 9), n_groups, count, total, 0),
                    Contains("group_ids must have shape (B) = (14), got (9)"));
  CHECK_THROWS_WITH(phases::op<st::kernels::finish_advantage_std_fn>("sapo::finish_advantage_std")
                        .call(at::zeros({6, K}, f64), at::zeros({2, K + 1}, f64)),
                    Contains("advantage_sums must have shape (2, K) = (2, 3), got (2, 4)"));
  CHECK_THROWS_WITH(phases::op<st::kernels::group_partials_fn>("sapo::group_partials").call(rewards, 4, c10::nullopt, 3, 2),
                    Contains("groups.first_row"));
  CHECK_THROWS_WITH(phases::op<st::kernels::loss_counts_fn>("sapo::loss_counts").call(p.mask, p.step.slice(1, 0, 9)),
                    Contains("step must have shape (B, T) = (7, 15), got (7, 9)"));
}
