#include "beam.hpp"

#include <algorithm>
#include <limits>
#include <unordered_map>
#include <stdexcept>
#include <string>

#include "progress.hpp"

namespace rec {

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Where a hypothesis stands in the response grammar (see the header of traces.hpp):
//   <sep> -> <think> | sid_0 (no thinking)
//   <think> -> thought;  thought -> thought (fewer than max_thoughts so far) | </think>
//   </think> -> sid_level (restricted to trie.next(prefix))
//   sid_level (level < K-1) -> <think> | sid_{level+1} (no thinking);  sid_{K-1} -> <eos>
struct row_state {
  enum phase_t : uint8_t { open, after_think, after_thought, after_end_think, dead };
  phase_t phase = dead;
  int thoughts = 0;                 // thought tokens in the current block
  std::vector<int32_t> tokens;      // the response so far
  std::vector<int32_t> prefix;      // SID codes so far
};

struct grammar {
  const vocabulary& v;
  const sid_trie& trie;
  bool thinking;
  int max_thoughts;

  // Sets the allowed tokens of `s` to 0 in `row` (which holds -inf elsewhere).
  void allow(const row_state& s, float* row) const {
    auto allow_sid = [&] {
      const int level = int(s.prefix.size());
      for (int32_t c : trie.next(s.prefix)) row[v.sid_token(level, c)] = 0;
    };
    switch (s.phase) {
      case row_state::open:
        if (thinking) row[vocabulary::think] = 0; else allow_sid();
        break;
      case row_state::after_think:
        for (int32_t t = v.first_thought(); t < v.size(); ++t) row[t] = 0;
        break;
      case row_state::after_thought:
        if (s.thoughts < max_thoughts)
          for (int32_t t = v.first_thought(); t < v.size(); ++t) row[t] = 0;
        row[vocabulary::end_think] = 0;
        break;
      case row_state::after_end_think:
        allow_sid();
        break;
      case row_state::dead:
        // Any one token keeps log_softmax finite; the row's score is -inf anyway.
        row[vocabulary::pad] = 0;
        break;
    }
  }

  // The next token is the last SID token.
  bool finishes(const row_state& s) const {
    return int(s.prefix.size()) == v.levels - 1 &&
           (s.phase == row_state::after_end_think || (!thinking && s.phase == row_state::open));
  }

  row_state advance(const row_state& s, int32_t tok) const {
    row_state n = s;
    n.tokens.push_back(tok);
    if (tok == vocabulary::think) {
      n.phase = row_state::after_think;
      n.thoughts = 0;
    } else if (v.is_thought(tok)) {
      n.phase = row_state::after_thought;
      ++n.thoughts;
    } else if (tok == vocabulary::end_think) {
      n.phase = row_state::after_end_think;
    } else {   // a SID token: the mask allowed nothing else
      n.prefix.push_back(v.sid_code(tok));
      n.phase = row_state::open;
    }
    return n;
  }
};

}  // namespace

std::vector<std::vector<int32_t>> recommend(decoder_lm& model, const trace_builder& traces, const sid_trie& trie,
                                            const std::vector<std::vector<int32_t>>& histories,
                                            const beam_options& opt, torch::Device device,
                                            std::vector<std::vector<beam_hypothesis>>* hypotheses) {
  if (opt.beam_width < 1 || opt.top_n < 1 || opt.batch_users < 1)
    throw std::invalid_argument("recommend: beam_width, top_n and batch_users must be >= 1, got " +
                                std::to_string(opt.beam_width) + ", " + std::to_string(opt.top_n) + ", " +
                                std::to_string(opt.batch_users));
  const vocabulary& v = traces.vocab();
  const int K = v.levels;
  if (trie.levels() != K)
    throw std::invalid_argument("recommend: the trie has " + std::to_string(trie.levels()) +
                                " levels, the vocabulary " + std::to_string(K));
  const int64_t Vm = model->config().vocab;
  if (v.size() > Vm)
    throw std::invalid_argument("recommend: the vocabulary has " + std::to_string(v.size()) + " tokens, the model " +
                                std::to_string(Vm));
  const int64_t P = traces.prompt_length();
  const int64_t W = opt.beam_width;
  const grammar gram{v, trie, traces.options().thinking, traces.options().max_thoughts};

  torch::NoGradGuard no_grad;
  model->to(device);
  model->eval();

  const size_t n_users = histories.size();
  std::vector<std::vector<int32_t>> ranked(n_users);
  if (hypotheses) hypotheses->assign(n_users, {});
  progress_bar bar("beam search", int64_t(n_users), "user", opt.progress);
  for (size_t u0 = 0; u0 < n_users; u0 += size_t(opt.batch_users)) {
    const int64_t U = int64_t(std::min(n_users - u0, size_t(opt.batch_users)));
    const int64_t R = U * W;

    // The prompts once per user, then W rows per user sharing the prompt's cache.
    torch::Tensor prompts = torch::empty({U, P}, torch::kLong);
    {
      auto acc = prompts.accessor<int64_t, 2>();
      for (int64_t u = 0; u < U; ++u) {
        const std::vector<int32_t> p = traces.prompt(histories[u0 + size_t(u)]);
        for (int64_t t = 0; t < P; ++t) acc[u][t] = p[size_t(t)];
      }
    }
    kv_cache cache;
    torch::Tensor logits =
        model->extend(prompts.to(device), cache).select(1, P - 1).repeat_interleave(W, 0);   // (R, Vm)
    cache.share_prefix(W);

    // Only the first row of each user is live at the start: W copies of one empty
    // hypothesis would fill the beam with duplicates.
    std::vector<row_state> state(static_cast<size_t>(R));
    std::vector<float> score(size_t(R), kNegInf);
    for (int64_t u = 0; u < U; ++u) {
      state[size_t(u * W)].phase = row_state::open;
      score[size_t(u * W)] = 0;
    }
    // Per user, the best finished hypothesis of every item reached so far.
    std::vector<std::unordered_map<int32_t, beam_hypothesis>> done(static_cast<size_t>(U));

    for (int step = 0;; ++step) {
      if (step > traces.max_response_length())
        throw std::logic_error("recommend: a hypothesis outgrew the response grammar");
      torch::Tensor mask = torch::full({R, Vm}, kNegInf);
      float* m = mask.data_ptr<float>();
      for (int64_t r = 0; r < R; ++r) gram.allow(state[size_t(r)], m + r * Vm);
      const torch::Tensor logp = torch::log_softmax(logits.to(torch::kCPU) + mask, 1);
      // Every live hypothesis about to write its last SID token finishes here with each code
      // the trie allows: all of them go to the user's pool (the only token left, <eos>, has
      // log-probability 0 under the grammar mask). Taking them all, not only those among the
      // best candidates, costs nothing and keeps items reached through few beams.
      const auto lp = logp.accessor<float, 2>();
      for (int64_t r = 0; r < R; ++r) {
        const row_state& s = state[size_t(r)];
        if (score[size_t(r)] == kNegInf || !gram.finishes(s)) continue;
        std::vector<int32_t> code = s.prefix;
        code.push_back(0);
        auto& best = done[size_t(r / W)];
        for (int32_t c : trie.next(s.prefix)) {
          const int32_t tok = v.sid_token(K - 1, c);
          const double sc = double(score[size_t(r)] + lp[r][tok]);
          code.back() = c;
          const int32_t item = trie.item(code);
          auto [it, fresh] = best.try_emplace(item);
          beam_hypothesis& h = it->second;
          if (!fresh && h.score >= sc) continue;
          h.item = item;
          h.score = sc;
          h.tokens = s.tokens;
          h.tokens.push_back(tok);
          h.tokens.push_back(vocabulary::eos);
        }
      }
      // Per user: the best extensions of the hypotheses that do not finish become the next beam.
      std::vector<float> cont_score = score;
      for (int64_t r = 0; r < R; ++r)
        if (gram.finishes(state[size_t(r)])) cont_score[size_t(r)] = kNegInf;
      const torch::Tensor cand =
          (torch::from_blob(cont_score.data(), {R, 1}, torch::kFloat) + logp).view({U, W * Vm});
      const auto top = cand.topk(W, 1);
      const auto vals = std::get<0>(top).accessor<float, 2>();
      const auto idx = std::get<1>(top).accessor<int64_t, 2>();
      std::vector<row_state> next(static_cast<size_t>(R));
      std::vector<float> next_score(size_t(R), kNegInf);
      std::vector<int64_t> parent(static_cast<size_t>(R)), next_tok(size_t(R), vocabulary::pad);
      bool any_live = false;
      for (int64_t u = 0; u < U; ++u) {
        int64_t live = 0;
        for (int64_t c = 0; c < W; ++c) {
          const float s = vals[u][c];
          if (s == kNegInf) break;
          const int64_t row = u * W + idx[u][c] / Vm;
          const size_t slot = size_t(u * W + live++);
          next[slot] = gram.advance(state[size_t(row)], int32_t(idx[u][c] % Vm));
          next_score[slot] = s;
          parent[slot] = row;
          next_tok[slot] = idx[u][c] % Vm;
        }
        for (int64_t j = live; j < W; ++j) parent[size_t(u * W + j)] = u * W;   // dead slots
        any_live = any_live || live > 0;
      }
      if (!any_live) break;
      state = std::move(next);
      score = std::move(next_score);
      cache.select(torch::tensor(parent, torch::kLong).to(device));
      logits = model->extend(torch::tensor(next_tok, torch::kLong).view({R, 1}).to(device), cache).squeeze(1);
    }

    for (int64_t u = 0; u < U; ++u) {
      std::vector<beam_hypothesis> pool;
      pool.reserve(done[size_t(u)].size());
      for (auto& kv : done[size_t(u)]) pool.push_back(std::move(kv.second));
      std::sort(pool.begin(), pool.end(), [](const beam_hypothesis& a, const beam_hypothesis& b) {
        return a.score != b.score ? a.score > b.score : a.item < b.item;
      });
      if (pool.size() > size_t(opt.top_n)) pool.resize(size_t(opt.top_n));
      auto& out = ranked[u0 + size_t(u)];
      for (const auto& h : pool) out.push_back(h.item);
      if (hypotheses) (*hypotheses)[u0 + size_t(u)] = std::move(pool);
    }
    bar.advance(U);
  }
  bar.finish();
  return ranked;
}

}  // namespace rec
