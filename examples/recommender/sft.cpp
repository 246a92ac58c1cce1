#include "sft.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <random>
#include <stdexcept>

#include "progress.hpp"

namespace rec {

namespace {

// The examples to train on. With max_examples set, each user's training targets are taken
// latest first, round by round (every user's latest, then every user's second latest, ...),
// so every user is represented and the most recent behaviour, closest to the held-out
// targets, is kept; the last round is cut at random (seeded). Assumes sp.train lists each
// user's examples oldest first, as leave_last_two writes them.
std::vector<size_t> choose_examples(const split& sp, int64_t max_examples, uint64_t seed) {
  const size_t n = sp.train.size();
  std::vector<size_t> all(n);
  for (size_t i = 0; i < n; ++i) all[i] = i;
  if (max_examples <= 0 || size_t(max_examples) >= n) return all;
  std::vector<int64_t> round(n, 0);
  std::map<int32_t, int64_t> seen;   // examples met so far per user, walking newest first
  for (size_t i = n; i-- > 0;) round[i] = seen[sp.train[i].user]++;
  std::mt19937_64 rng(seed ^ 0x5f3759dfULL);
  std::vector<uint64_t> tie(n);
  for (auto& t : tie) t = rng();
  std::sort(all.begin(), all.end(),
            [&](size_t a, size_t b) { return round[a] != round[b] ? round[a] < round[b] : tie[a] < tie[b]; });
  all.resize(size_t(max_examples));
  std::sort(all.begin(), all.end());
  return all;
}

}  // namespace

sft_report train_sft(decoder_lm& model, const trace_builder& traces, const split& sp, const sft_options& opt,
                     torch::Device device) {
  if (opt.epochs < 1 || opt.batch_size < 1)
    throw std::invalid_argument("train_sft: epochs and batch_size must be >= 1, got " + std::to_string(opt.epochs) +
                                " and " + std::to_string(opt.batch_size));
  if (sp.train.empty()) throw std::invalid_argument("train_sft: the split has no training examples");
  const auto t_start = std::chrono::steady_clock::now();
  torch::manual_seed(opt.seed);
  torch::AutoGradMode grad_on(true);   // also when the caller holds a NoGradGuard

  // Every example tokenized once into one right-padded table: prompt (fixed length P) then
  // response then <pad>.
  const std::vector<size_t> chosen = choose_examples(sp, opt.max_examples, opt.seed);
  const int64_t N = int64_t(chosen.size());
  const int64_t P = traces.prompt_length(), R = traces.max_response_length();
  if (P + R - 1 > model->config().max_len)
    throw std::invalid_argument("train_sft: prompt + response need " + std::to_string(P + R - 1) +
                                " positions, the model's max_len is " + std::to_string(model->config().max_len));
  if (traces.vocab().size() > model->config().vocab)
    throw std::invalid_argument("train_sft: the vocabulary has " + std::to_string(traces.vocab().size()) +
                                " tokens, the model " + std::to_string(model->config().vocab));
  torch::Tensor table = torch::full({N, P + R}, int64_t(vocabulary::pad), torch::kLong);
  std::vector<int64_t> length(static_cast<size_t>(N));
  {
    auto acc = table.accessor<int64_t, 2>();
    for (int64_t i = 0; i < N; ++i) {
      const example& x = sp.train[chosen[size_t(i)]];
      std::vector<int32_t> seq = traces.prompt(x.history);
      const std::vector<int32_t> r = traces.response(x.target);
      seq.insert(seq.end(), r.begin(), r.end());
      for (size_t t = 0; t < seq.size(); ++t) acc[i][int64_t(t)] = seq[t];
      length[size_t(i)] = int64_t(seq.size());
    }
  }

  model->to(device);
  model->train();

  // Weight decay on the matrices of the linear layers only (as GPT-2/minGPT): decaying
  // LayerNorm gains, biases or the (tied) embeddings pulls them toward 0 for no benefit.
  std::vector<torch::Tensor> decay, no_decay;
  for (auto& p : model->named_parameters()) {
    const std::string& nm = p.key();
    const bool embedding = nm.rfind("tok.", 0) == 0 || nm.rfind("pos.", 0) == 0;
    (p.value().dim() == 2 && !embedding ? decay : no_decay).push_back(p.value());
  }
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(decay, std::make_unique<torch::optim::AdamWOptions>(
                                 torch::optim::AdamWOptions(opt.lr).weight_decay(opt.weight_decay)));
  groups.emplace_back(no_decay,
                      std::make_unique<torch::optim::AdamWOptions>(torch::optim::AdamWOptions(opt.lr).weight_decay(0)));
  torch::optim::AdamW optimizer(std::move(groups), torch::optim::AdamWOptions(opt.lr));
  const std::vector<torch::Tensor> params = model->parameters();

  const int64_t steps_per_epoch = (N + opt.batch_size - 1) / opt.batch_size;
  const int64_t total = steps_per_epoch * opt.epochs;
  const int64_t warmup = opt.warmup_fraction > 0 ? std::max<int64_t>(1, int64_t(std::ceil(opt.warmup_fraction * double(total)))) : 0;
  auto lr_at = [&](int64_t step) {
    if (step < warmup) return opt.lr * double(step + 1) / double(warmup);
    const double progress = double(step - warmup) / double(std::max<int64_t>(1, total - warmup));
    return opt.lr * (0.1 + 0.9 * 0.5 * (1.0 + std::cos(M_PI * std::min(1.0, progress))));
  };

  std::mt19937_64 rng(opt.seed);
  std::vector<int64_t> order(static_cast<size_t>(N));
  for (int64_t i = 0; i < N; ++i) order[size_t(i)] = i;
  sft_report rep;
  for (int epoch = 1; epoch <= opt.epochs; ++epoch) {
    std::shuffle(order.begin(), order.end(), rng);
    progress_bar bar("sft " + opt.name + " " + std::to_string(epoch) + "/" + std::to_string(opt.epochs),
                     steps_per_epoch, "step", opt.progress);
    double loss_sum = 0;
    int64_t token_count = 0;
    for (int64_t s = 0; s < steps_per_epoch; ++s, ++rep.steps) {
      const int64_t b0 = s * opt.batch_size, b1 = std::min(N, b0 + opt.batch_size);
      int64_t T = 0;
      for (int64_t i = b0; i < b1; ++i) T = std::max(T, length[size_t(order[size_t(i)])]);
      const torch::Tensor idx = torch::from_blob(order.data() + b0, {b1 - b0}, torch::kLong);
      const torch::Tensor seq = table.index_select(0, idx).narrow(1, 0, T).to(device);
      // Positions P-1 .. T-2 predict the response tokens P .. T-1; <pad> targets are ignored.
      torch::Tensor target = seq.narrow(1, P, T - P);
      target = target.masked_fill(target.eq(vocabulary::pad), -100);
      const auto ce = [](const torch::Tensor& logits, const torch::Tensor& labels) {
        return torch::nn::functional::cross_entropy(logits.reshape({-1, logits.size(-1)}), labels.reshape({-1}),
                                                    torch::nn::functional::CrossEntropyFuncOptions().ignore_index(-100));
      };
      const bool with_history = opt.history_loss_weight > 0;
      const torch::Tensor logits_all = model->forward(seq.narrow(1, 0, T - 1), with_history ? 0 : P - 1);
      const torch::Tensor logits = with_history ? logits_all.narrow(1, P - 1, T - P) : logits_all;
      const torch::Tensor response_loss = ce(logits, target);
      torch::Tensor loss = response_loss;
      if (with_history) {
        // Positions 0 .. P-2 predict prompt tokens 1 .. P-1 (the left padding is ignored).
        torch::Tensor history_target = seq.narrow(1, 1, P - 1);
        history_target = history_target.masked_fill(history_target.eq(vocabulary::pad), -100);
        loss = loss + opt.history_loss_weight * ce(logits_all.narrow(1, 0, P - 1), history_target);
      }
      for (auto& g : optimizer.param_groups())
        static_cast<torch::optim::AdamWOptions&>(g.options()).lr(lr_at(rep.steps));
      optimizer.zero_grad();
      loss.backward();
      torch::nn::utils::clip_grad_norm_(params, 1.0);
      optimizer.step();

      const int64_t n_tok = target.ne(-100).sum().item<int64_t>();
      loss_sum += response_loss.item<double>() * double(n_tok);
      token_count += n_tok;
      char status[48];
      std::snprintf(status, sizeof status, "loss %.4f", loss_sum / double(std::max<int64_t>(1, token_count)));
      bar.advance(1, status);
    }
    bar.finish();
    rep.final_loss = loss_sum / double(std::max<int64_t>(1, token_count));
    if (!opt.checkpoint_dir.empty()) {
      std::filesystem::create_directories(opt.checkpoint_dir);
      torch::save(model, opt.checkpoint_dir + "/" + opt.name + "-epoch" + std::to_string(epoch) + ".pt");
    }
  }
  model->eval();
  rep.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
  return rep;
}

}  // namespace rec
