// Baselines on the same split: most-popular items and SASRec (self-attentive sequential
// recommendation over item ids, LibTorch).
//
// Both learn from the same interactions: for every user the split has an example of, the
// user's sequence without its held-out targets (one item per valid and per test example of
// that user, taken from the end). For leave_last_two that is positions 0 .. n-3 of every user
// with n >= 3: the items the split's train examples and their histories cover, plus the one
// item of a user with n = 3 (which has no train example). Users the split left out entirely
// (n < 3) and the valid/test targets are not counted or trained on.
#pragma once
#include <torch/torch.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "data.hpp"

namespace rec {

// The top_n items by number of training interactions (ties: lower item index first).
// Items never seen in training follow, by index, so the list has min(top_n, items) entries.
// Throws std::invalid_argument when the split does not fit the dataset (see sasrec::train).
std::vector<int32_t> most_popular(const dataset& data, const split& sp, int top_n = 10);

// Defaults are the "quick" size. Cost is dominated by the full softmax (three matmuls of
// targets x d x items plus the softmax itself): on MovieLens latest-small (97,991 train
// targets, 9,066 items) one epoch is ~24-28 CPU-seconds on one core, so 3 epochs take about
// 60-90 s. Measured there (seed 1): 3 epochs test HR@10 0.034, 10 epochs 0.057, 20 epochs
// 0.076 (most popular: 0.024); 20 epochs is the fuller setting.
struct sasrec_options {
  int64_t d_model = 64;      // also the feed-forward width, as in the paper
  int64_t layers = 2;
  int64_t heads = 2;         // must divide d_model
  int64_t max_history = 20;  // window length: items a prediction can see
  double dropout = 0.2;
  int epochs = 3;
  int batch_size = 128;      // windows of up to max_history targets each (~2,400 targets)
  double lr = 2e-3;
  uint64_t seed = 1;
  bool progress = true;
};

// SASRec (Kang & McAuley 2018): item + learned position embeddings, `layers` pre-LN causal
// self-attention blocks, score(item) = <last hidden state, item embedding>.
//
// Training is the paper's shifted-sequence objective, with full softmax cross-entropy over
// all items in place of its one-negative binary cross-entropy: each user's training sequence
// is cut, from its end, into windows of max_history + 1 items; every position of a window
// predicts the next item, so every training target is predicted exactly once per epoch (with
// 1 .. max_history items of context). The transformer thus runs once per window rather than
// once per train example with only its last position scored. Adam, seeded by opt.seed
// (torch::manual_seed, i.e. the global generator).
class sasrec {
 public:
  // Items are data.items' indices; the dataset's sequences are copied.
  sasrec(const dataset& data, const sasrec_options& opt, torch::Device device);
  ~sasrec();
  sasrec(sasrec&&) noexcept;
  sasrec& operator=(sasrec&&) noexcept;

  // Returns the final epoch's mean loss per target (nats). Throws std::invalid_argument when
  // the split does not fit the dataset (a user's train-example count is not the length of
  // their training sequence minus one, or an index is out of range).
  double train(const split& sp);

  // For each history (oldest first; only the last max_history items are used), the top_n
  // distinct items by score, best first (min(top_n, items) of them). History items are not
  // excluded. Throws std::out_of_range for an item index outside the dataset.
  std::vector<std::vector<int32_t>> recommend(const std::vector<std::vector<int32_t>>& histories, int top_n = 10);

 private:
  struct impl;
  std::unique_ptr<impl> impl_;
};

}  // namespace rec
