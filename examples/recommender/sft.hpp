// Supervised fine-tuning with teacher forcing: prompt -> response, loss on response tokens only.
#pragma once
#include <string>

#include "data.hpp"
#include "model.hpp"
#include "traces.hpp"

namespace rec {

struct sft_options {
  int epochs = 1;
  int batch_size = 256;
  double lr = 1e-3;
  double weight_decay = 0.01;
  double warmup_fraction = 0.05;    // linear warm-up, then cosine decay to 10 %
  int64_t max_examples = 0;         // 0 = all training examples; else the latest per user first
  // Weight of an auxiliary next-token loss on the prompt: every history item's SID tokens
  // predicted from the items before it (SASRec's all-positions objective). It costs no extra
  // forward pass and gives each sequence ~20 targets instead of one; 0 = response only.
  double history_loss_weight = 0;
  uint64_t seed = 1;
  std::string checkpoint_dir;       // empty = no checkpoints; else <dir>/<name>-epoch<N>.pt
  std::string name = "model";
  bool progress = true;             // progress bar with rate and ETA on stderr
};

struct sft_report {
  double final_loss = 0;    // mean token cross-entropy of the last epoch
  double seconds = 0;
  int64_t steps = 0;
};

sft_report train_sft(decoder_lm& model, const trace_builder& traces, const split& sp,
                     const sft_options& opt, torch::Device device);

}  // namespace rec
