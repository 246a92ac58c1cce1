#include "baselines.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <string>

#include "progress.hpp"

namespace rec {
namespace {

// One user's training interactions: sequences[user][0 .. length).
struct train_prefix {
  int32_t user = 0;
  int64_t length = 0;
};

// The interactions both baselines learn from (see baselines.hpp). The per-user count check
// catches a split made from another dataset or with different held-out positions, which
// would otherwise train silently on valid/test targets.
std::vector<train_prefix> training_prefixes(const std::vector<std::vector<int32_t>>& sequences, int64_t n_items,
                                            const split& sp) {
  const int64_t n_users = int64_t(sequences.size());
  std::vector<int64_t> held(size_t(n_users), 0), n_train(size_t(n_users), 0);
  auto user_of = [&](const example& e, const char* part) {
    if (e.user < 0 || e.user >= n_users)
      throw std::invalid_argument(std::string("baselines: ") + part + " example with user " + std::to_string(e.user) +
                                  " outside the dataset's " + std::to_string(n_users) + " users");
    return size_t(e.user);
  };
  for (const example& e : sp.valid) ++held[user_of(e, "valid")];
  for (const example& e : sp.test) ++held[user_of(e, "test")];
  for (const example& e : sp.train) ++n_train[user_of(e, "train")];

  std::vector<train_prefix> out;
  for (int64_t u = 0; u < n_users; ++u) {
    const size_t us = size_t(u);
    if (n_train[us] == 0 && held[us] == 0) continue;  // a user the split left out (too short)
    const int64_t len = int64_t(sequences[us].size()) - held[us];
    if (len < 0 || n_train[us] != std::max<int64_t>(0, len - 1))
      throw std::invalid_argument("baselines: split does not fit the dataset: user " + std::to_string(u) + " has " +
                                  std::to_string(n_train[us]) + " train examples and " + std::to_string(held[us]) +
                                  " held-out targets but " + std::to_string(sequences[us].size()) + " interactions");
    for (int64_t i = 0; i < len; ++i) {
      const int32_t it = sequences[us][size_t(i)];
      if (it < 0 || it >= n_items)
        throw std::invalid_argument("baselines: user " + std::to_string(u) + " has item " + std::to_string(it) +
                                    " outside the dataset's " + std::to_string(n_items) + " items");
    }
    if (len > 0) out.push_back({int32_t(u), len});
  }
  return out;
}

// ---- SASRec --------------------------------------------------------------------------------
// Token ids: 0 = padding, item i = i + 1.

// Pre-LN block: x + Attn(LN(x)), then x + FFN(LN(x)); FFN is d -> d -> d with ReLU (the
// paper's point-wise feed-forward). Attention is written out so the mask can keep every
// query row non-empty (see net::hidden).
struct blockImpl : torch::nn::Module {
  blockImpl(int64_t d, int64_t heads, double dropout)
      : ln1(register_module("ln1", torch::nn::LayerNorm(torch::nn::LayerNormOptions({d})))),
        qkv(register_module("qkv", torch::nn::Linear(d, 3 * d))),
        proj(register_module("proj", torch::nn::Linear(d, d))),
        ln2(register_module("ln2", torch::nn::LayerNorm(torch::nn::LayerNormOptions({d})))),
        ff1(register_module("ff1", torch::nn::Linear(d, d))),
        ff2(register_module("ff2", torch::nn::Linear(d, d))),
        heads_(heads),
        dropout_(dropout) {}

  // x (B, L, d); allowed (B, 1, L, L) bool, true where query i may attend to key j.
  torch::Tensor forward(torch::Tensor x, const torch::Tensor& allowed) {
    const int64_t B = x.size(0), L = x.size(1), d = x.size(2), dh = d / heads_;
    const bool tr = is_training();
    auto parts = qkv(ln1(x)).view({B, L, 3, heads_, dh}).permute({2, 0, 3, 1, 4});  // (3, B, H, L, dh)
    auto scores = torch::matmul(parts[0], parts[1].transpose(-2, -1)) / std::sqrt(double(dh));
    scores = scores.masked_fill(allowed.logical_not(), -std::numeric_limits<float>::infinity());
    auto weights = torch::dropout(torch::softmax(scores, -1), dropout_, tr);
    auto att = torch::matmul(weights, parts[2]).permute({0, 2, 1, 3}).reshape({B, L, d});
    x = x + torch::dropout(proj(att), dropout_, tr);
    auto f = ff2(torch::dropout(torch::relu(ff1(ln2(x))), dropout_, tr));
    return x + torch::dropout(f, dropout_, tr);
  }

  torch::nn::LayerNorm ln1;
  torch::nn::Linear qkv, proj;
  torch::nn::LayerNorm ln2;
  torch::nn::Linear ff1, ff2;
  int64_t heads_;
  double dropout_;
};
TORCH_MODULE(block);

struct netImpl : torch::nn::Module {
  netImpl(int64_t n_items, const sasrec_options& o)
      : d_(o.d_model),
        dropout_(o.dropout),
        item_emb(register_module(
            "item_emb", torch::nn::Embedding(torch::nn::EmbeddingOptions(n_items + 1, o.d_model).padding_idx(0)))),
        pos_emb(register_module("pos_emb", torch::nn::Embedding(o.max_history, o.d_model))),
        final_ln(register_module("final_ln", torch::nn::LayerNorm(torch::nn::LayerNormOptions({o.d_model})))) {
    for (int64_t i = 0; i < o.layers; ++i) blocks.push_back(register_module("block" + std::to_string(i), block(o.d_model, o.heads, o.dropout)));
    // Xavier-normal weights, zero biases (the reference implementation's choice). The default
    // N(0, 1) embedding would make the shared output logits ~sqrt(d) times too large at the start.
    torch::NoGradGuard ng;
    for (auto& p : named_parameters()) {
      if (p.key().find("ln") != std::string::npos) continue;  // layer norms keep (1, 0)
      if (p.value().dim() >= 2)
        torch::nn::init::xavier_normal_(p.value());
      else
        torch::nn::init::zeros_(p.value());
    }
    item_emb->weight[0].zero_();  // padding row: never used (masked), kept at zero for clarity
  }

  // tokens (B, L) int64, left-padded -> hidden states (B, L, d).
  torch::Tensor hidden(const torch::Tensor& tokens) {
    const int64_t L = tokens.size(1);
    const bool tr = is_training();
    const auto keep = tokens.ne(0);  // (B, L)
    auto x = item_emb(tokens) * std::sqrt(double(d_)) + pos_emb->weight.slice(0, 0, L).unsqueeze(0);
    x = torch::dropout(x, dropout_, tr);
    const auto keepf = keep.unsqueeze(-1).to(x.dtype());
    x = x * keepf;
    // Causal and no padded keys. A padded query would then have no key at all and its softmax
    // would be NaN, which leaks through 0 * NaN in the next layer, so every query may always
    // see itself; padded positions are zeroed after each block and never scored.
    const auto opts = torch::TensorOptions().dtype(torch::kBool).device(tokens.device());
    const auto causal = torch::ones({L, L}, opts).tril();
    const auto eye = torch::eye(L, opts);
    const auto allowed = ((causal.unsqueeze(0) & keep.unsqueeze(1)) | eye.unsqueeze(0)).unsqueeze(1);
    for (auto& b : blocks) x = b->forward(x, allowed) * keepf;
    return final_ln(x);
  }

  // h (N, d) -> scores over items (N, n_items), with the input embedding as output layer.
  torch::Tensor scores(const torch::Tensor& h) { return torch::matmul(h, item_emb->weight.slice(0, 1).t()); }

  int64_t d_;
  double dropout_;
  torch::nn::Embedding item_emb, pos_emb;
  std::vector<block> blocks;
  torch::nn::LayerNorm final_ln;
};
TORCH_MODULE(net);

}  // namespace

std::vector<int32_t> most_popular(const dataset& data, const split& sp, int top_n) {
  if (top_n < 0) throw std::invalid_argument("most_popular: top_n < 0");
  const int64_t n_items = int64_t(data.items.size());
  std::vector<int64_t> count(size_t(n_items), 0);
  for (const train_prefix& p : training_prefixes(data.sequences, n_items, sp))
    for (int64_t i = 0; i < p.length; ++i) ++count[size_t(data.sequences[size_t(p.user)][size_t(i)])];
  std::vector<int32_t> order(static_cast<size_t>(n_items));
  std::iota(order.begin(), order.end(), 0);
  // stable_sort on count alone keeps equal counts in index order.
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return count[size_t(a)] > count[size_t(b)]; });
  order.resize(size_t(std::min<int64_t>(top_n, n_items)));
  return order;
}

struct sasrec::impl {
  impl(const dataset& data, const sasrec_options& o, torch::Device dev)
      : opt(o), device(dev), n_items(int64_t(data.items.size())), sequences(data.sequences), model(nullptr) {
    if (opt.d_model <= 0 || opt.layers < 0 || opt.heads <= 0 || opt.d_model % opt.heads != 0)
      throw std::invalid_argument("sasrec: d_model must be a positive multiple of heads");
    if (opt.max_history <= 0 || opt.batch_size <= 0 || opt.epochs < 0)
      throw std::invalid_argument("sasrec: max_history and batch_size must be positive, epochs >= 0");
    if (n_items == 0) throw std::invalid_argument("sasrec: the dataset has no items");
    torch::manual_seed(opt.seed);
    model = net(n_items, opt);
    model->to(device);
  }

  sasrec_options opt;
  torch::Device device;
  int64_t n_items;
  std::vector<std::vector<int32_t>> sequences;
  net model;
};

sasrec::sasrec(const dataset& data, const sasrec_options& opt, torch::Device device)
    : impl_(std::make_unique<impl>(data, opt, device)) {}
sasrec::~sasrec() = default;
sasrec::sasrec(sasrec&&) noexcept = default;
sasrec& sasrec::operator=(sasrec&&) noexcept = default;

double sasrec::train(const split& sp) {
  impl& m = *impl_;
  const int64_t L = m.opt.max_history;

  // Windows, cut from the end of each training sequence s[0 .. len): the last one predicts
  // s[len-L .. len) from s[len-L-1 .. len-1), the one before it ends where this one starts,
  // and so on; the first is left-padded. Consecutive windows share one item (input of the
  // later, target of the earlier), so each target appears once, with full context at the
  // end of a user's sequence, which is what recommend() sees.
  std::vector<int64_t> in_rows, tg_rows;
  int64_t n_windows = 0;
  for (const train_prefix& p : training_prefixes(m.sequences, m.n_items, sp)) {
    const auto& s = m.sequences[size_t(p.user)];
    for (int64_t end = p.length - 1; end >= 1; end -= L) {  // end: index of the window's last target
      const int64_t start = std::max<int64_t>(0, end - L);  // index of its first input
      const int64_t n = end - start;                         // inputs = targets in this window
      for (int64_t j = 0; j < L - n; ++j) {
        in_rows.push_back(0);
        tg_rows.push_back(-1);
      }
      for (int64_t j = 0; j < n; ++j) {
        in_rows.push_back(int64_t(s[size_t(start + j)]) + 1);
        tg_rows.push_back(int64_t(s[size_t(start + j + 1)]));
      }
      ++n_windows;
    }
  }
  if (n_windows == 0) throw std::invalid_argument("sasrec::train: the split has no training examples");
  const auto inputs = torch::tensor(in_rows, torch::kLong).view({n_windows, L});
  const auto targets = torch::tensor(tg_rows, torch::kLong).view({n_windows, L});

  // Reseed here too, so the shuffles and dropout masks do not depend on what else drew from
  // the global generator between construction and training.
  torch::manual_seed(m.opt.seed);
  m.model->train();
  torch::optim::Adam adam(m.model->parameters(), torch::optim::AdamOptions(m.opt.lr).betas({0.9, 0.98}));
  const int64_t bs = m.opt.batch_size;
  const int64_t n_batches = (n_windows + bs - 1) / bs;
  double last = 0;
  for (int epoch = 0; epoch < m.opt.epochs; ++epoch) {
    const auto perm = torch::randperm(n_windows, torch::kLong);
    progress_bar bar("sasrec " + std::to_string(epoch + 1) + "/" + std::to_string(m.opt.epochs), n_batches, "batch",
                     m.opt.progress);
    double sum = 0;
    int64_t count = 0;
    for (int64_t b = 0; b < n_batches; ++b) {
      const auto idx = perm.slice(0, b * bs, std::min(n_windows, (b + 1) * bs));
      const auto x = inputs.index_select(0, idx).to(m.device);
      const auto y = targets.index_select(0, idx).to(m.device);
      const auto mask = y.ge(0);
      const auto h = m.model->hidden(x).index({mask});  // (targets in batch, d)
      const auto yt = y.index({mask});
      const auto loss = torch::nn::functional::cross_entropy(m.model->scores(h), yt);
      adam.zero_grad();
      loss.backward();
      adam.step();
      const double l = loss.item<double>();
      sum += l * double(yt.size(0));
      count += yt.size(0);
      char status[48];
      std::snprintf(status, sizeof status, "loss %.4f", sum / double(count));
      bar.advance(1, status);
    }
    last = sum / double(count);
  }
  return last;
}

std::vector<std::vector<int32_t>> sasrec::recommend(const std::vector<std::vector<int32_t>>& histories, int top_n) {
  impl& m = *impl_;
  if (top_n < 0) throw std::invalid_argument("sasrec::recommend: top_n < 0");
  const int64_t L = m.opt.max_history, k = std::min<int64_t>(top_n, m.n_items);
  std::vector<std::vector<int32_t>> out(histories.size());
  if (k == 0 || histories.empty()) return out;
  torch::NoGradGuard ng;
  m.model->eval();
  constexpr int64_t chunk = 512;  // bounds the (chunk, items) score matrix
  for (int64_t b0 = 0; b0 < int64_t(histories.size()); b0 += chunk) {
    const int64_t nb = std::min<int64_t>(chunk, int64_t(histories.size()) - b0);
    std::vector<int64_t> tok(size_t(nb * L), 0);
    for (int64_t r = 0; r < nb; ++r) {
      const auto& h = histories[size_t(b0 + r)];
      const int64_t n = std::min<int64_t>(L, int64_t(h.size()));
      for (int64_t j = 0; j < n; ++j) {
        const int32_t it = h[h.size() - size_t(n) + size_t(j)];
        if (it < 0 || it >= m.n_items)
          throw std::out_of_range("sasrec::recommend: item " + std::to_string(it) + " outside the dataset's " +
                                  std::to_string(m.n_items) + " items");
        tok[size_t(r * L + (L - n) + j)] = int64_t(it) + 1;  // left-padded: the newest item is last
      }
    }
    const auto x = torch::tensor(tok, torch::kLong).view({nb, L}).to(m.device);
    const auto h = m.model->hidden(x).select(1, L - 1);
    const auto top = std::get<1>(m.model->scores(h).topk(k, 1)).to(torch::kCPU).contiguous();
    const int64_t* p = top.data_ptr<int64_t>();
    for (int64_t r = 0; r < nb; ++r) out[size_t(b0 + r)].assign(p + r * k, p + (r + 1) * k);
  }
  return out;
}

}  // namespace rec
