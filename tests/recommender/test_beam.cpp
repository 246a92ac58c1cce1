// The transformer's cache, SFT and constrained beam search on a tiny catalogue: extend()
// against forward(), beam hypotheses against an independent grammar and an independent
// rescoring with forward(), exhaustive search against brute force, and a model trained by
// train_sft that must recommend the memorized next item first.
//
// LibTorch (through glog) defines a one-argument CHECK macro; Catch2 is included after it so
// that CHECK is Catch's counted, non-fatal assertion.
#include <torch/torch.h>

#include "beam.hpp"
#include "model.hpp"
#include "sft.hpp"
#include "sid.hpp"
#include "traces.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <set>
#include <vector>

namespace {

// Eight items with 3-level binary SIDs (item i = bits of i, coarse to fine), three genres.
// Eight users; user i watched (i+5)%8, i, then next(i) = (3i+1)%8 -- a bijection, so the
// last history item decides the target.
int32_t next_item(int32_t i) { return (3 * i + 1) % 8; }

struct tiny {
  rec::dataset data;
  rec::split sp;
  rec::sid_table sids;

  tiny() {
    data.genre_names = {"Comedy", "Drama", "Horror"};
    for (int i = 0; i < 8; ++i) {
      rec::item it;
      it.movie_id = i + 1;
      it.year = 1970 + 5 * i;
      it.genres = {i % 3};
      if (i % 4 == 0) it.genres.push_back((i + 1) % 3);
      std::sort(it.genres.begin(), it.genres.end());
      data.items.push_back(it);
      sids.code.insert(sids.code.end(), {(i >> 2) & 1, (i >> 1) & 1, i & 1});
    }
    sids.levels = 3;
    sids.codes = 2;
    for (int32_t i = 0; i < 8; ++i) {
      data.user_ids.push_back(i + 1);
      data.sequences.push_back({(i + 5) % 8, i, next_item(i)});
      // No held-out targets (valid/test empty): every interaction is a training one.
      sp.train.push_back({i, {(i + 5) % 8, i}, next_item(i)});
      sp.train.push_back({i, {i}, next_item(i)});
    }
  }
};

rec::trace_options trace_opts(bool thinking) {
  rec::trace_options o;
  o.thinking = thinking;
  o.max_history = 2;
  o.max_thoughts = 3;
  return o;
}

rec::model_config model_cfg(const rec::trace_builder& tb, double dropout = 0.0) {
  rec::model_config c;
  c.vocab = tb.vocab().size();
  c.d_model = 32;
  c.layers = 2;
  c.heads = 2;
  c.d_ff = 64;
  c.max_len = tb.prompt_length() + tb.max_response_length();
  c.dropout = dropout;
  return c;
}

// The response grammar, written out from the brief independently of beam.cpp: the tokens
// allowed after `so_far` (a response prefix).
std::vector<int32_t> allowed_after(const rec::trace_builder& tb, const rec::sid_trie& trie,
                                   const std::vector<int32_t>& so_far) {
  const rec::vocabulary& v = tb.vocab();
  const bool thinking = tb.options().thinking;
  std::vector<int32_t> codes;
  int thoughts = 0;
  for (int32_t t : so_far) {
    if (v.is_sid(t)) codes.push_back(v.sid_code(t));
    if (t == rec::vocabulary::think) thoughts = 0;
    if (v.is_thought(t)) ++thoughts;
  }
  const int32_t last = so_far.empty() ? rec::vocabulary::sep : so_far.back();
  std::vector<int32_t> out;
  auto sids = [&] {
    for (int32_t c : trie.next(codes)) out.push_back(v.sid_token(int(codes.size()), c));
  };
  auto all_thoughts = [&] {
    for (int32_t t = v.first_thought(); t < v.size(); ++t) out.push_back(t);
  };
  if (v.is_sid(last) && int(codes.size()) == v.levels) {
    out.push_back(rec::vocabulary::eos);
  } else if (last == rec::vocabulary::sep || v.is_sid(last)) {
    if (thinking) out.push_back(rec::vocabulary::think); else sids();
  } else if (last == rec::vocabulary::think) {
    all_thoughts();
  } else if (v.is_thought(last)) {
    if (thoughts < tb.options().max_thoughts) all_thoughts();
    out.push_back(rec::vocabulary::end_think);
  } else if (last == rec::vocabulary::end_think) {
    sids();
  }
  return out;
}

// Sum of log-probabilities of `response` under the model with every step's distribution
// restricted to the grammar, computed from one forward() over prompt + response.
double masked_score(rec::decoder_lm& model, const rec::trace_builder& tb, const rec::sid_trie& trie,
                    const std::vector<int32_t>& history, const std::vector<int32_t>& response) {
  torch::NoGradGuard ng;
  std::vector<int64_t> seq;
  for (int32_t t : tb.prompt(history)) seq.push_back(t);
  for (int32_t t : response) seq.push_back(t);
  const int64_t P = tb.prompt_length();
  const torch::Tensor logits = model->forward(torch::tensor(seq).view({1, -1})).squeeze(0).to(torch::kDouble);
  double total = 0;
  std::vector<int32_t> so_far;
  for (size_t t = 0; t < response.size(); ++t) {
    const std::vector<int32_t> ok = allowed_after(tb, trie, so_far);
    const torch::Tensor row = logits[P - 1 + int64_t(t)];
    double mx = -1e300;
    for (int32_t a : ok) mx = std::max(mx, row[a].item<double>());
    double z = 0;
    for (int32_t a : ok) z += std::exp(row[a].item<double>() - mx);
    total += row[response[t]].item<double>() - mx - std::log(z);
    so_far.push_back(response[t]);
  }
  return total;
}

void check_hypotheses(rec::decoder_lm& model, const rec::trace_builder& tb, const rec::sid_trie& trie,
                      const std::vector<std::vector<int32_t>>& histories,
                      const std::vector<std::vector<int32_t>>& ranked,
                      const std::vector<std::vector<rec::beam_hypothesis>>& hyps, int top_n) {
  REQUIRE(ranked.size() == histories.size());
  REQUIRE(hyps.size() == histories.size());
  const rec::vocabulary& v = tb.vocab();
  for (size_t u = 0; u < histories.size(); ++u) {
    CHECK(!ranked[u].empty());
    CHECK(int(ranked[u].size()) <= top_n);
    CHECK(std::set<int32_t>(ranked[u].begin(), ranked[u].end()).size() == ranked[u].size());
    REQUIRE(hyps[u].size() == ranked[u].size());
    for (size_t j = 0; j < hyps[u].size(); ++j) {
      const rec::beam_hypothesis& h = hyps[u][j];
      CHECK(h.item == ranked[u][j]);
      if (j > 0) CHECK(h.score <= hyps[u][j - 1].score);
      // Every token is one the grammar allows after the ones before it.
      std::vector<int32_t> so_far, codes;
      for (int32_t t : h.tokens) {
        const std::vector<int32_t> ok = allowed_after(tb, trie, so_far);
        CHECK(std::find(ok.begin(), ok.end(), t) != ok.end());
        if (v.is_sid(t)) codes.push_back(v.sid_code(t));
        so_far.push_back(t);
      }
      REQUIRE(!h.tokens.empty());
      CHECK(h.tokens.back() == rec::vocabulary::eos);
      CHECK(int(codes.size()) == v.levels);
      CHECK(trie.item(codes) == h.item);
      CHECK(h.score == Approx(masked_score(model, tb, trie, histories[u], h.tokens)).margin(1e-4));
    }
  }
}

std::vector<std::vector<int32_t>> all_histories(const tiny& t) {
  std::vector<std::vector<int32_t>> hs;
  for (const auto& x : t.sp.train) hs.push_back(x.history);
  return hs;
}

}  // namespace

TEST_CASE("model: extend() gives forward()'s logits, with left padding and a shared prefix",
          "[recommender][model]") {
  torch::manual_seed(3);
  rec::model_config cfg;
  cfg.vocab = 23;
  cfg.d_model = 32;
  cfg.layers = 2;
  cfg.heads = 4;
  cfg.d_ff = 48;
  cfg.max_len = 20;
  cfg.dropout = 0.3;   // eval() must switch it off
  rec::decoder_lm model(cfg);
  model->eval();
  torch::NoGradGuard ng;

  // Four prompts of 7 tokens: a first non-pad token (as <bos>), left padding of 2, 4, 0 and
  // 6 tokens (row 3 is all padding after it), then random non-pad tokens.
  const int64_t U = 4, P = 7, G = 3, N = 5;
  torch::Tensor prompts = torch::randint(1, cfg.vocab, {U, P}, torch::kLong);
  prompts.index_put_({0, torch::indexing::Slice(1, 3)}, 0);
  prompts.index_put_({1, torch::indexing::Slice(1, 5)}, 0);
  prompts.index_put_({3, torch::indexing::Slice(1, P)}, 0);
  const torch::Tensor own = torch::randint(1, cfg.vocab, {U * G, N}, torch::kLong);

  SECTION("the whole prompt at once, then one token at a time") {
    const torch::Tensor full = model->forward(prompts);
    CHECK(torch::isfinite(full).all().item<bool>());
    rec::kv_cache cache;
    const torch::Tensor a = model->extend(prompts.narrow(1, 0, 4), cache);
    CHECK(cache.length() == 4);
    CHECK(torch::allclose(a, full.narrow(1, 0, 4), 1e-5, 1e-5));
    for (int64_t t = 4; t < P; ++t) {
      const torch::Tensor b = model->extend(prompts.narrow(1, t, 1), cache);
      CHECK(torch::allclose(b, full.narrow(1, t, 1), 1e-5, 1e-5));
    }
    // forward(tokens, first) is the tail of forward(tokens).
    CHECK(torch::allclose(model->forward(prompts, 5), full.narrow(1, 5, 2)));
  }

  SECTION("a shared prefix, beam reordering, against forward() on the spelled-out rows") {
    // Row r continues prompt r / G with own[r]; after two tokens the rows of each group
    // are permuted (as a beam step would), and the rest continues from the permuted rows.
    const torch::Tensor perm = torch::tensor({2, 2, 0, 3, 5, 4, 6, 8, 7, 11, 9, 9}, torch::kLong);
    torch::Tensor own_after = own.clone();
    own_after.narrow(1, 0, 2).copy_(own.index_select(0, perm).narrow(1, 0, 2));
    const torch::Tensor spelled = torch::cat({prompts.repeat_interleave(G, 0), own_after}, 1);
    const torch::Tensor full = model->forward(spelled);

    rec::kv_cache cache;
    model->extend(prompts, cache);
    cache.share_prefix(G);
    CHECK(cache.length() == P);
    const torch::Tensor first = model->extend(own.narrow(1, 0, 2), cache);
    // Before the permutation the rows are own[r]; check against forward on those.
    const torch::Tensor before = model->forward(torch::cat({prompts.repeat_interleave(G, 0), own.narrow(1, 0, 2)}, 1));
    CHECK(torch::allclose(first, before.narrow(1, P, 2), 1e-5, 1e-5));
    cache.select(perm);
    for (int64_t t = 2; t < N; ++t) {
      const torch::Tensor step = model->extend(own_after.narrow(1, t, 1), cache);
      CHECK(torch::allclose(step, full.narrow(1, P + t, 1), 1e-5, 1e-5));
    }
    CHECK(cache.length() == P + N);
    // A row may not take a row of another user's group.
    CHECK_THROWS(cache.select(torch::tensor({3, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11}, torch::kLong)));
  }

  SECTION("<pad> keys are ignored") {
    // Changing the <pad> embedding changes nothing at real positions, except the logit of
    // <pad> itself (the output projection is tied to the embedding).
    const torch::Tensor a = model->forward(prompts);
    torch::Tensor w;
    for (auto& p : model->named_parameters())
      if (p.key() == "tok.weight") w = p.value();
    REQUIRE(w.defined());
    const torch::Tensor saved = w[0].clone();
    w[0].normal_();
    const torch::Tensor b = model->forward(prompts);
    w[0].copy_(saved);
    const torch::Tensor real = prompts.ne(0);
    const torch::Tensor rest = torch::arange(1, cfg.vocab);
    CHECK(torch::allclose(a.index({real}).index_select(1, rest), b.index({real}).index_select(1, rest), 1e-5, 1e-5));
    CHECK_FALSE(torch::allclose(a.index({real.logical_not()}), b.index({real.logical_not()})));
  }

  SECTION("a row of <pad> only gives finite logits") {
    const torch::Tensor out = model->forward(torch::zeros({2, 5}, torch::kLong));
    CHECK(torch::isfinite(out).all().item<bool>());
  }
}

TEST_CASE("beam search: hypotheses obey the grammar and their scores are the model's", "[recommender][beam]") {
  tiny t;
  const rec::sid_trie trie(t.sids);
  for (bool thinking : {true, false}) {
    rec::trace_builder tb(t.data, t.sp, t.sids, trace_opts(thinking));
    torch::manual_seed(11);
    rec::decoder_lm model(model_cfg(tb, 0.1));   // untrained: any path may be likely
    rec::beam_options bo;
    bo.beam_width = 3;
    bo.top_n = 5;
    bo.batch_users = 5;   // 16 histories: batches of 5, 5, 5, 1
    bo.progress = false;
    const auto histories = all_histories(t);
    std::vector<std::vector<rec::beam_hypothesis>> hyps;
    const auto ranked = rec::recommend(model, tb, trie, histories, bo, torch::kCPU, &hyps);
    check_hypotheses(model, tb, trie, histories, ranked, hyps, bo.top_n);

    // Batching does not change the answer.
    bo.batch_users = 16;
    std::vector<std::vector<rec::beam_hypothesis>> hyps_one_batch;
    CHECK(rec::recommend(model, tb, trie, histories, bo, torch::kCPU, &hyps_one_batch) == ranked);
  }
}

TEST_CASE("beam search: a beam as wide as the catalogue finds the exact ranking", "[recommender][beam]") {
  // Without thinking and with 2 codes per level, width 8 keeps every prefix: the search is
  // exhaustive and must rank all 8 items by their exact masked score.
  tiny t;
  const rec::sid_trie trie(t.sids);
  rec::trace_builder tb(t.data, t.sp, t.sids, trace_opts(false));
  torch::manual_seed(5);
  rec::decoder_lm model(model_cfg(tb));
  model->eval();
  rec::beam_options bo;
  bo.beam_width = 8;
  bo.top_n = 8;
  bo.progress = false;
  const std::vector<std::vector<int32_t>> histories = {{3, 6}, {1}};
  const auto ranked = rec::recommend(model, tb, trie, histories, bo, torch::kCPU);
  for (size_t u = 0; u < histories.size(); ++u) {
    std::vector<std::pair<double, int32_t>> exact;
    for (int32_t i = 0; i < 8; ++i) exact.push_back({-masked_score(model, tb, trie, histories[u], tb.response(i)), i});
    std::sort(exact.begin(), exact.end());
    std::vector<int32_t> expect;
    for (auto& e : exact) expect.push_back(e.second);
    CHECK(ranked[u] == expect);
  }
}

TEST_CASE("sft + beam search: a memorized next item comes first", "[recommender][sft][beam]") {
  tiny t;
  const rec::sid_trie trie(t.sids);
  rec::trace_builder tb(t.data, t.sp, t.sids, trace_opts(true));
  torch::manual_seed(7);
  rec::decoder_lm model(model_cfg(tb));
  rec::sft_options so;
  so.epochs = 300;
  so.batch_size = 16;   // the 16 examples: one full batch per epoch
  so.lr = 5e-3;
  so.weight_decay = 0.0;
  so.progress = false;
  so.seed = 2;
  const rec::sft_report rep = rec::train_sft(model, tb, t.sp, so, torch::kCPU);
  CHECK(rep.steps == 300);
  CHECK(rep.final_loss < 0.02);
  CHECK_FALSE(model->is_training());

  rec::beam_options bo;
  bo.beam_width = 4;
  bo.top_n = 3;
  bo.progress = false;
  const auto histories = all_histories(t);
  std::vector<std::vector<rec::beam_hypothesis>> hyps;
  const auto ranked = rec::recommend(model, tb, trie, histories, bo, torch::kCPU, &hyps);
  for (size_t u = 0; u < histories.size(); ++u) {
    REQUIRE(!ranked[u].empty());
    CHECK(ranked[u][0] == t.sp.train[u].target);
    // The trained model also writes the target's own thoughts.
    CHECK(hyps[u][0].tokens == tb.response(t.sp.train[u].target));
  }
  check_hypotheses(model, tb, trie, histories, ranked, hyps, bo.top_n);
}

TEST_CASE("sft: max_examples, checkpoints, and a caller's NoGradGuard", "[recommender][sft]") {
  tiny t;
  rec::trace_builder tb(t.data, t.sp, t.sids, trace_opts(true));
  torch::manual_seed(7);
  rec::decoder_lm model(model_cfg(tb, 0.1));
  rec::sft_options so;
  so.epochs = 2;
  so.batch_size = 2;
  so.max_examples = 5;   // 5 of 16 examples at batch 2: 3 steps per epoch
  so.progress = false;
  const std::filesystem::path dir = std::filesystem::temp_directory_path() / "sapo_test_sft_ckpt";
  std::filesystem::remove_all(dir);
  so.checkpoint_dir = dir.string();
  so.name = "tiny";
  torch::NoGradGuard ng;   // training must still get gradients
  const rec::sft_report rep = rec::train_sft(model, tb, t.sp, so, torch::kCPU);
  CHECK(rep.steps == 6);
  CHECK(std::isfinite(rep.final_loss));
  CHECK(std::filesystem::exists(dir / "tiny-epoch1.pt"));
  REQUIRE(std::filesystem::exists(dir / "tiny-epoch2.pt"));

  // The last checkpoint is the trained model (and differs from a fresh one).
  rec::decoder_lm loaded(model_cfg(tb, 0.1));
  loaded->eval();
  const torch::Tensor x = torch::tensor(std::vector<int64_t>{1, 0, 0, 0, 6, 8, 10, 3}).view({1, -1});
  const torch::Tensor fresh = loaded->forward(x);
  torch::load(loaded, (dir / "tiny-epoch2.pt").string());
  loaded->eval();
  CHECK(torch::allclose(loaded->forward(x), model->forward(x)));
  CHECK_FALSE(torch::allclose(fresh, model->forward(x)));
  std::filesystem::remove_all(dir);
}

TEST_CASE("sft: the history loss trains next-token prediction on the prompt", "[recommender][sft]") {
  // In the tiny catalogue the second history item is a function of the first, so a model
  // trained on the prompt's next tokens predicts them far better than one trained on the
  // response alone. The cross-entropy is measured here with the alignment written out
  // (logits at t against token t + 1), so a shifted target in train_sft would fail.
  tiny t;
  rec::trace_builder tb(t.data, t.sp, t.sids, trace_opts(true));
  auto prompt_cross_entropy = [&](rec::decoder_lm& m) {
    torch::NoGradGuard ng;
    m->eval();
    double sum = 0;
    int64_t n = 0;
    for (const auto& x : t.sp.train) {
      const std::vector<int32_t> p = tb.prompt(x.history);
      const torch::Tensor seq = torch::tensor(std::vector<int64_t>(p.begin(), p.end())).view({1, -1});
      const torch::Tensor logp = torch::log_softmax(m->forward(seq), -1);
      for (size_t i = 0; i + 1 < p.size(); ++i) {
        if (p[i + 1] == rec::vocabulary::pad) continue;
        sum -= logp[0][int64_t(i)][p[i + 1]].item<double>();
        ++n;
      }
    }
    return sum / double(n);
  };
  double ce[2];
  for (int w = 0; w < 2; ++w) {
    torch::manual_seed(7);
    rec::decoder_lm model(model_cfg(tb));
    rec::sft_options so;
    so.epochs = 100;
    so.batch_size = 16;
    so.lr = 5e-3;
    so.weight_decay = 0.0;
    so.progress = false;
    so.history_loss_weight = w;
    const rec::sft_report rep = rec::train_sft(model, tb, t.sp, so, torch::kCPU);
    CHECK(rep.final_loss < 0.5);  // the response is learnt either way
    ce[w] = prompt_cross_entropy(model);
  }
  CAPTURE(ce[0], ce[1]);
  CHECK(ce[1] < 0.5 * ce[0]);
  CHECK(ce[1] < 0.7);
}
