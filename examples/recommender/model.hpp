// A small decoder-only transformer over the recommender's vocabulary (LibTorch), with a
// key/value cache so beam search extends each hypothesis by one token at a time.
#pragma once
#include <torch/torch.h>

#include <cstdint>
#include <string>
#include <vector>

namespace rec {

struct model_config {
  int64_t vocab = 0;
  int64_t d_model = 128;
  int64_t layers = 2;
  int64_t heads = 4;
  int64_t d_ff = 512;
  int64_t max_len = 96;
  double dropout = 0.1;
  int64_t pad_token = 0;   // keys holding it are ignored (vocabulary::pad)
};

// Per-layer cached keys and values, (batch, heads, length, d_head) each.
//
// Beam search runs the prompt once per user and then holds `group` = beam_width rows per
// user. Copying the prompt's keys into every beam row would make each step move the whole
// prompt cache (and reorder it) for nothing, so share_prefix() keeps the cached part once per
// user as a shared prefix that rows r, r + 1, ... of one group all attend to; only the
// tokens appended afterwards are stored per row.
struct kv_cache {
  std::vector<torch::Tensor> keys, values;   // per-row part, (batch, heads, own length, d_head)
  torch::Tensor key_padding;                 // (batch, own length) bool, true = <pad> (ignored by attention)
  // Shared prefix: row r attends to prefix row r / group before its own keys.
  std::vector<torch::Tensor> prefix_keys, prefix_values;   // (batch / group, heads, prefix length, d_head)
  torch::Tensor prefix_padding;                              // (batch / group, prefix length) bool
  int64_t group = 1;

  int64_t prefix_length() const { return prefix_keys.empty() ? 0 : prefix_keys[0].size(2); }
  int64_t own_length() const { return keys.empty() || !keys[0].defined() ? 0 : keys[0].size(2); }
  // Tokens seen so far: the next token's position.
  int64_t length() const { return prefix_length() + own_length(); }
  // Keep rows `index` (beam reordering / expansion), in place. With a shared prefix a row
  // may only take a row of its own group (index[r] / group == r / group).
  void select(const torch::Tensor& index);
  // Makes everything cached so far the shared prefix of `group_size` consecutive rows per
  // current row: the batch grows from n to n * group_size rows with no own tokens yet.
  void share_prefix(int64_t group_size);
};

class decoder_lmImpl : public torch::nn::Module {
 public:
  explicit decoder_lmImpl(const model_config& cfg);
  // tokens (batch, length) int64 -> logits (batch, length - first_logit, vocab) of positions
  // first_logit.. (the default: all); causal, <pad> keys masked. Training asks only for the
  // response positions and so skips the output projection of the prompt.
  torch::Tensor forward(const torch::Tensor& tokens, int64_t first_logit = 0);
  // Appends `tokens` (batch, new_length) to `cache` and returns their logits (batch, new, vocab).
  torch::Tensor extend(const torch::Tensor& tokens, kv_cache& cache);
  const model_config& config() const { return cfg_; }

 private:
  // Final hidden states (batch, new_length, d_model) of `tokens` appended to `cache`.
  torch::Tensor hidden(const torch::Tensor& tokens, kv_cache& cache);
  torch::Tensor project(const torch::Tensor& h);   // tied output projection

  model_config cfg_;
  torch::nn::Embedding tok_{nullptr}, pos_{nullptr};
  torch::nn::ModuleList blocks_;
  torch::nn::LayerNorm ln_f_{nullptr};
  torch::nn::Dropout drop_{nullptr};
};
TORCH_MODULE(decoder_lm);

}  // namespace rec
