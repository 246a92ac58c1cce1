// Beam search over the whole response: thought tokens follow the trace grammar, SID tokens
// are constrained to the trie, scores are summed log-probabilities; returns the best
// distinct items.
#pragma once
#include <cstdint>
#include <vector>

#include "model.hpp"
#include "sid.hpp"
#include "traces.hpp"

namespace rec {

struct beam_options {
  int beam_width = 20;
  int top_n = 10;
  int batch_users = 64;     // prompts decoded together
  bool progress = true;
};

struct beam_hypothesis {
  std::vector<int32_t> tokens;   // the response, ending with <eos>
  double score = 0;              // sum of log-probabilities
  int32_t item = -1;
};

// For each history, up to top_n distinct items, best first (and the hypotheses behind them:
// (*hypotheses)[u][j] is the best-scoring response that names ranked[u][j]).
//
// Batched: batch_users prompts run once through the model, then beam_width rows per user
// share the prompt's key/value cache (kv_cache::share_prefix). Every step masks the logits
// to the response grammar (traces.hpp; SID tokens limited to trie.next(prefix)), takes
// log_softmax and adds it to the hypothesis' score. Hypotheses about to write their last SID
// token finish with every code the trie allows (the forced <eos> then has log-probability 0):
// each such item enters the user's pool, which keeps the best hypothesis per item. The best
// beam_width extensions of the other hypotheses form the next beam. The search ends when no
// hypothesis is live; the pool sorted by score (ties: lower item index) gives the ranking.
std::vector<std::vector<int32_t>> recommend(decoder_lm& model, const trace_builder& traces,
                                            const sid_trie& trie,
                                            const std::vector<std::vector<int32_t>>& histories,
                                            const beam_options& opt, torch::Device device,
                                            std::vector<std::vector<beam_hypothesis>>* hypotheses = nullptr);

}  // namespace rec
