#include "model.hpp"

#include <cmath>

namespace rec {

namespace {

namespace nn = torch::nn;

// One pre-LayerNorm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x)). Attention is
// written out in decoder_lmImpl::hidden because it reads and grows the key/value cache.
struct blockImpl : nn::Module {
  explicit blockImpl(const model_config& c)
      : ln1(register_module("ln1", nn::LayerNorm(nn::LayerNormOptions({c.d_model})))),
        qkv(register_module("qkv", nn::Linear(c.d_model, 3 * c.d_model))),
        proj(register_module("proj", nn::Linear(c.d_model, c.d_model))),
        ln2(register_module("ln2", nn::LayerNorm(nn::LayerNormOptions({c.d_model})))),
        fc1(register_module("fc1", nn::Linear(c.d_model, c.d_ff))),
        fc2(register_module("fc2", nn::Linear(c.d_ff, c.d_model))),
        drop(register_module("drop", nn::Dropout(c.dropout))) {}
  nn::LayerNorm ln1;
  nn::Linear qkv, proj;
  nn::LayerNorm ln2;
  nn::Linear fc1, fc2;
  nn::Dropout drop;
};
TORCH_MODULE(block);

// A masked score must stay finite: a query row whose keys are all masked then gets a uniform
// (unused) distribution instead of NaN, and exp(-1e9 - max) is exactly 0 in float, so a row
// with one visible key is unaffected.
constexpr float kMasked = -1e9f;

}  // namespace

void kv_cache::select(const torch::Tensor& index) {
  TORCH_CHECK(index.dim() == 1, "kv_cache::select: index must be 1-D, got ", index.dim(), " dimensions");
  if (!prefix_keys.empty()) {
    const int64_t rows = own_length() > 0 ? keys[0].size(0) : prefix_keys[0].size(0) * group;
    TORCH_CHECK(index.size(0) == rows, "kv_cache::select: with a shared prefix the index must keep all ", rows,
                " rows, got ", index.size(0));
    const auto idx = index.to(torch::kLong);
    const auto own_group = torch::arange(rows, idx.options()).div(group, "floor");
    TORCH_CHECK(idx.div(group, "floor").equal(own_group),
                "kv_cache::select: a row may only take a row of its own prefix group (group size ", group, ")");
  }
  for (auto* ts : {&keys, &values})
    for (auto& t : *ts)
      if (t.defined()) t = t.index_select(0, index);
  if (key_padding.defined()) key_padding = key_padding.index_select(0, index);
}

void kv_cache::share_prefix(int64_t group_size) {
  TORCH_CHECK(group_size >= 1, "kv_cache::share_prefix: group size must be >= 1, got ", group_size);
  TORCH_CHECK(prefix_keys.empty(), "kv_cache::share_prefix: the cache already has a shared prefix");
  TORCH_CHECK(own_length() > 0, "kv_cache::share_prefix: nothing cached yet");
  prefix_keys = std::move(keys);
  prefix_values = std::move(values);
  prefix_padding = std::move(key_padding);
  keys.clear();
  values.clear();
  key_padding = torch::Tensor();
  group = group_size;
}

decoder_lmImpl::decoder_lmImpl(const model_config& cfg) : cfg_(cfg) {
  TORCH_CHECK(cfg.vocab > 0, "model_config.vocab must be > 0, got ", cfg.vocab);
  TORCH_CHECK(cfg.d_model > 0 && cfg.heads > 0 && cfg.d_model % cfg.heads == 0,
              "model_config.d_model must be a positive multiple of heads, got d_model ", cfg.d_model, ", heads ",
              cfg.heads);
  TORCH_CHECK(cfg.layers >= 1 && cfg.d_ff >= 1 && cfg.max_len >= 1,
              "model_config: layers, d_ff and max_len must be >= 1");
  tok_ = register_module("tok", nn::Embedding(cfg.vocab, cfg.d_model));
  pos_ = register_module("pos", nn::Embedding(cfg.max_len, cfg.d_model));
  blocks_ = register_module("blocks", nn::ModuleList());
  for (int64_t l = 0; l < cfg.layers; ++l) blocks_->push_back(block(cfg));
  ln_f_ = register_module("ln_f", nn::LayerNorm(nn::LayerNormOptions({cfg.d_model})));
  drop_ = register_module("drop", nn::Dropout(cfg.dropout));

  // GPT-2's initialization: small normal weights (the tied output projection would give
  // huge initial logits with Embedding's default N(0, 1)), and residual projections scaled by
  // 1/sqrt(2 layers) so the residual stream's variance does not grow with depth.
  torch::NoGradGuard no_grad;
  const double std = 0.02, resid_std = 0.02 / std::sqrt(2.0 * double(cfg.layers));
  for (auto& p : named_parameters()) {
    const std::string& name = p.key();
    torch::Tensor& w = p.value();
    const bool is_ln = name.find("ln") != std::string::npos;
    if (is_ln) continue;   // LayerNorm keeps weight 1, bias 0
    if (name.size() >= 4 && name.compare(name.size() - 4, 4, "bias") == 0)
      w.zero_();
    else if (name.find("proj.weight") != std::string::npos || name.find("fc2.weight") != std::string::npos)
      w.normal_(0.0, resid_std);
    else
      w.normal_(0.0, std);
  }
}

torch::Tensor decoder_lmImpl::hidden(const torch::Tensor& tokens, kv_cache& cache) {
  TORCH_CHECK(tokens.dim() == 2, "decoder_lm: tokens must be (batch, length), got ", tokens.sizes());
  const int64_t B = tokens.size(0), T = tokens.size(1);
  const int64_t Lp = cache.prefix_length(), Lo = cache.own_length(), L0 = Lp + Lo;
  TORCH_CHECK(L0 + T <= cfg_.max_len, "decoder_lm: ", L0 + T, " positions exceed max_len = ", cfg_.max_len);
  const bool shared = Lp > 0;
  const int64_t G = cache.group, P = shared ? cache.prefix_keys[0].size(0) : 0;
  if (shared) TORCH_CHECK(B == P * G, "decoder_lm: ", B, " rows for a shared prefix of ", P, " x ", G);
  if (Lo > 0) TORCH_CHECK(cache.keys[0].size(0) == B, "decoder_lm: ", B, " rows for a cache of ", cache.keys[0].size(0));
  const int64_t d = cfg_.d_model, H = cfg_.heads, dh = d / H;
  const auto lopt = torch::TensorOptions().dtype(torch::kLong).device(tokens.device());

  const torch::Tensor ids = tokens.to(torch::kLong);
  const torch::Tensor pad_new = ids.eq(cfg_.pad_token);
  const torch::Tensor own_padding = Lo > 0 ? torch::cat({cache.key_padding, pad_new}, 1) : pad_new;
  const int64_t Tk = Lo + T;
  // Query i sits at position L0 + i and sees own key j (position Lp + j) iff j <= Lo + i.
  const torch::Tensor causal = torch::arange(Tk, lopt).unsqueeze(0).le(torch::arange(T, lopt).unsqueeze(1) + Lo);
  const torch::Tensor blocked_own = causal.logical_not().view({1, 1, T, Tk}).logical_or(own_padding.view({B, 1, 1, Tk}));
  torch::Tensor blocked_prefix;
  if (shared) blocked_prefix = cache.prefix_padding.view({P, 1, 1, Lp});

  torch::Tensor x = drop_(tok_(ids) + pos_(torch::arange(L0, L0 + T, lopt)));
  const double scale = 1.0 / std::sqrt(double(dh));
  cache.keys.resize(size_t(cfg_.layers));
  cache.values.resize(size_t(cfg_.layers));
  for (int64_t l = 0; l < cfg_.layers; ++l) {
    auto& b = *blocks_[size_t(l)]->as<blockImpl>();
    const torch::Tensor qkv = b.qkv(b.ln1(x)).view({B, T, 3, H, dh}).permute({2, 0, 3, 1, 4});   // (3, B, H, T, dh)
    const torch::Tensor q = qkv[0] * scale;
    torch::Tensor k = qkv[1], v = qkv[2];
    if (Lo > 0) {
      k = torch::cat({cache.keys[size_t(l)], k}, 2);
      v = torch::cat({cache.values[size_t(l)], v}, 2);
    }
    cache.keys[size_t(l)] = k;
    cache.values[size_t(l)] = v;
    const torch::Tensor s_own = torch::matmul(q, k.transpose(-2, -1)).masked_fill(blocked_own, kMasked);
    torch::Tensor out;
    if (!shared) {
      out = torch::matmul(torch::softmax(s_own, -1), v);
    } else {
      // The G rows of a group share one prefix: fold them into the query dimension so the
      // product runs against the prefix once per group, (P, H, G*T, dh) x (P, H, dh, Lp),
      // without materializing the prefix per row.
      auto fold = [&](const torch::Tensor& t, int64_t last) {   // (B, H, T, last) -> (P, H, G*T, last)
        return t.reshape({P, G, H, T, last}).permute({0, 2, 1, 3, 4}).reshape({P, H, G * T, last});
      };
      auto unfold = [&](const torch::Tensor& t, int64_t last) {   // inverse of fold
        return t.reshape({P, H, G, T, last}).permute({0, 2, 1, 3, 4}).reshape({B, H, T, last});
      };
      const torch::Tensor s_pre = unfold(
          torch::matmul(fold(q, dh), cache.prefix_keys[size_t(l)].transpose(-2, -1)).masked_fill(blocked_prefix, kMasked),
          Lp);
      // One softmax over prefix and own keys together.
      const torch::Tensor a = torch::softmax(torch::cat({s_pre, s_own}, -1), -1);
      out = unfold(torch::matmul(fold(a.narrow(-1, 0, Lp), Lp), cache.prefix_values[size_t(l)]), dh) +
            torch::matmul(a.narrow(-1, Lp, Tk), v);
    }
    x = x + b.drop(b.proj(out.transpose(1, 2).reshape({B, T, d})));
    x = x + b.drop(b.fc2(torch::gelu(b.fc1(b.ln2(x)))));
  }
  cache.key_padding = own_padding;
  return ln_f_(x);
}

torch::Tensor decoder_lmImpl::project(const torch::Tensor& h) { return torch::matmul(h, tok_->weight.t()); }

torch::Tensor decoder_lmImpl::forward(const torch::Tensor& tokens, int64_t first_logit) {
  TORCH_CHECK(tokens.dim() == 2, "decoder_lm: tokens must be (batch, length), got ", tokens.sizes());
  TORCH_CHECK(first_logit >= 0 && first_logit <= tokens.size(1), "decoder_lm::forward: first_logit ", first_logit,
              " outside 0..", tokens.size(1));
  kv_cache scratch;
  torch::Tensor h = hidden(tokens, scratch);
  if (first_logit > 0) h = h.narrow(1, first_logit, tokens.size(1) - first_logit);
  return project(h);
}

torch::Tensor decoder_lmImpl::extend(const torch::Tensor& tokens, kv_cache& cache) {
  return project(hidden(tokens, cache));
}

}  // namespace rec
