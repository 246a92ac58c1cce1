// The generative recommender on MovieLens, end to end: data -> split -> semantic IDs ->
// reasoning traces -> SFT of a decoder-only transformer -> constrained beam search ->
// HR / NDCG, next to three baselines on the same split (most popular, SASRec, and the same
// generative model without thinking blocks, TIGER-style). scripts/demo runs it.
#include <CLI/CLI.hpp>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "baselines.hpp"
#include "beam.hpp"
#include "data.hpp"
#include "metrics.hpp"
#include "model.hpp"
#include "sft.hpp"
#include "sid.hpp"
#include "traces.hpp"

namespace {

// Everything a preset decides. quick: the README's demo, minutes on 2 cores; full: the
// numbers in docs/recommender.md.
struct preset {
  std::string name;
  rec::sid_options sid;
  rec::model_config model;
  rec::sft_options sft;
  rec::sasrec_options sasrec;
  rec::beam_options beam;
};

preset make_preset(const std::string& name) {
  preset p;
  p.name = name;
  p.sid.codes = 32;
  p.model.d_model = 128;
  p.model.layers = 2;
  p.model.heads = 4;
  p.model.d_ff = 512;
  p.beam.beam_width = 20;
  p.beam.top_n = 10;
  // The next-item loss on the prompt's history beside the response's loss (sft.hpp).
  p.sft.history_loss_weight = 1.0;
  if (name == "quick") {
    // About 8 minutes of compute on 2 idle cores (docs/recommender.md): one pass over the
    // latest 32,000 training targets (every user's latest first), SASRec's 3 epochs.
    p.sft.epochs = 1;
    p.sft.max_examples = 32000;
    p.sasrec.epochs = 3;
  } else if (name == "full") {
    // Every training target, 2 epochs (docs/recommender.md has the run times).
    p.sid.codes = 64;
    p.sft.epochs = 2;
    p.sft.max_examples = 0;
    p.sasrec.epochs = 20;
  } else {
    throw std::invalid_argument("--preset: expected quick or full, got " + name);
  }
  return p;
}

struct timer {
  std::chrono::steady_clock::time_point start = std::chrono::steady_clock::now();
  double seconds() const { return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(); }
};

struct model_result {
  std::string name;
  rec::ranking_metrics valid, test;
  double train_seconds = 0, eval_seconds = 0;
};

std::vector<std::vector<int32_t>> histories(const std::vector<rec::example>& xs) {
  std::vector<std::vector<int32_t>> h;
  h.reserve(xs.size());
  for (const auto& x : xs) h.push_back(x.history);
  return h;
}

std::vector<int32_t> targets(const std::vector<rec::example>& xs) {
  std::vector<int32_t> t;
  t.reserve(xs.size());
  for (const auto& x : xs) t.push_back(x.target);
  return t;
}

std::string metrics_json(const rec::ranking_metrics& m) {
  std::ostringstream o;
  o.precision(6);
  o << "\"hr@1\": " << m.hr1 << ", \"hr@5\": " << m.hr5 << ", \"hr@10\": " << m.hr10 << ", \"ndcg@5\": " << m.ndcg5
    << ", \"ndcg@10\": " << m.ndcg10 << ", \"users\": " << m.users;
  return o.str();
}

std::string json_escape(const std::string& s) {
  std::string o;
  for (char c : s) {
    if (c == '"' || c == '\\') o += '\\';
    o += c;
  }
  return o;
}

template <class V>
std::string json_array(const V& v) {
  std::ostringstream o;
  o.precision(6);
  o << "[";
  for (size_t i = 0; i < v.size(); ++i) o << (i ? ", " : "") << v[i];
  o << "]";
  return o.str();
}

struct context {
  const rec::dataset& data;
  const rec::split& sp;
  const rec::sid_table& sids;
  const rec::sid_trie& trie;
  torch::Device device;
  std::string out;
  uint64_t seed;
  bool progress;
};

// The generative model, with thinking (SAPO's setting) or without (TIGER-style): SFT, then
// beam search on both held-out splits. Prints `show` example responses of test users.
model_result run_generative(const std::string& name, bool thinking, const preset& p, const context& c, int show) {
  model_result r;
  r.name = name;
  rec::trace_options to;
  to.thinking = thinking;
  const rec::trace_builder traces(c.data, c.sp, c.sids, to);
  rec::model_config cfg = p.model;
  cfg.vocab = traces.vocab().size();
  cfg.max_len = traces.prompt_length() + traces.max_response_length();
  torch::manual_seed(c.seed);
  rec::decoder_lm model(cfg);
  model->to(c.device);

  rec::sft_options so = p.sft;
  so.seed = c.seed;
  so.name = name;
  so.progress = c.progress;
  so.checkpoint_dir = c.out + "/checkpoints";
  std::cerr << "== " << name << ": SFT on " << (so.max_examples ? std::min<int64_t>(so.max_examples, int64_t(c.sp.train.size())) : int64_t(c.sp.train.size()))
            << " examples, vocabulary " << cfg.vocab << ", sequence length " << cfg.max_len << "\n";
  timer t;
  const rec::sft_report rep = rec::train_sft(model, traces, c.sp, so, c.device);
  r.train_seconds = t.seconds();
  std::cerr << "   final loss " << rep.final_loss << " after " << rep.steps << " steps, " << r.train_seconds << " s\n";

  rec::beam_options bo = p.beam;
  bo.progress = c.progress;
  timer e;
  r.valid = rec::evaluate_rankings(rec::recommend(model, traces, c.trie, histories(c.sp.valid), bo, c.device),
                                   targets(c.sp.valid));
  std::vector<std::vector<rec::beam_hypothesis>> hyps;
  r.test = rec::evaluate_rankings(rec::recommend(model, traces, c.trie, histories(c.sp.test), bo, c.device, &hyps),
                                  targets(c.sp.test));
  r.eval_seconds = e.seconds();

  // A few real responses, so the reasoning can be read next to the numbers.
  for (int u = 0; u < show && u < int(hyps.size()); ++u) {
    if (hyps[size_t(u)].empty()) continue;
    const auto& h = hyps[size_t(u)].front();
    const auto& target = c.data.items[size_t(c.sp.test[size_t(u)].target)];
    std::cout << "  user " << c.data.user_ids[size_t(c.sp.test[size_t(u)].user)] << ", target \"" << target.title
              << "\"\n    its SFT trace:";
    for (int32_t tok : traces.response(c.sp.test[size_t(u)].target)) std::cout << ' ' << traces.vocab().name(tok);
    std::cout << "\n    best response:";
    for (int32_t tok : h.tokens) std::cout << ' ' << traces.vocab().name(tok);
    std::cout << "\n    -> \"" << (h.item >= 0 ? c.data.items[size_t(h.item)].title : std::string("?")) << "\""
              << (h.item == c.sp.test[size_t(u)].target ? "  (hit)" : "") << "\n";
  }
  return r;
}

void print_table(const std::vector<model_result>& rs) {
  std::printf("\n| model | split | HR@1 | HR@5 | HR@10 | NDCG@5 | NDCG@10 | train s | eval s |\n");
  std::printf("|---|---|---:|---:|---:|---:|---:|---:|---:|\n");
  for (const auto& r : rs)
    for (int s = 0; s < 2; ++s) {
      const auto& m = s ? r.test : r.valid;
      std::printf("| %s | %s | %.4f | %.4f | %.4f | %.4f | %.4f | %.0f | %.0f |\n", r.name.c_str(),
                  s ? "test" : "valid", m.hr1, m.hr5, m.hr10, m.ndcg5, m.ndcg10, r.train_seconds, r.eval_seconds);
    }
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Generative recommender on MovieLens: SFT with reasoning traces, beam search, baselines"};
  std::string preset_name = "quick", out = "out/recommender", data_path, device_name = "cpu";
  uint64_t seed = 1;
  int threads = 0, show = 3;
  bool no_progress = false, skip_baselines = false;
  // Overrides of the preset (0 / -1 = keep the preset's value).
  int sft_epochs = 0, sasrec_epochs = 0, d_model = 0, layers = 0, codes = 0, beam_width = 0;
  int64_t sft_examples = -1;
  double history_loss = -1, sft_lr = 0;
  app.add_option("--preset", preset_name, "quick (minutes on 2 cores) or full (docs/recommender.md)")
      ->check(CLI::IsMember({"quick", "full"}));
  app.add_option("--seed", seed, "seed of the SIDs' k-means, the models and the data order");
  app.add_option("--out", out, "where results.json and checkpoints go");
  app.add_option("--data", data_path, "movielens.csv written by scripts/fetch_movielens")->required()->check(CLI::ExistingFile);
  app.add_option("--device", device_name, "cpu or cuda (cuda needs a libtorch built with CUDA)")
      ->check(CLI::IsMember({"cpu", "cuda"}));
  app.add_option("--threads", threads, "intra-op threads (0 = libtorch's default)");
  app.add_option("--show", show, "example responses to print per generative model");
  app.add_flag("--no-progress", no_progress, "no progress bars");
  app.add_flag("--skip-baselines", skip_baselines, "only the generative model with thinking");
  app.add_option("--sft-epochs", sft_epochs, "SFT epochs (default: the preset's)");
  app.add_option("--sft-examples", sft_examples, "SFT examples per epoch, latest per user first (0 = all)");
  app.add_option("--history-loss", history_loss, "weight of the next-item loss on the prompt's history (default: the preset's)");
  app.add_option("--sft-lr", sft_lr, "SFT peak learning rate (default: the preset's)");
  app.add_option("--d-model", d_model, "transformer width (heads of 32 dimensions)");
  app.add_option("--layers", layers, "transformer layers");
  app.add_option("--codes", codes, "SID codes per level (32..64)")->check(CLI::Range(2, 256));
  app.add_option("--beam-width", beam_width, "beam width of the evaluation");
  app.add_option("--sasrec-epochs", sasrec_epochs, "SASRec epochs");
  CLI11_PARSE(app, argc, argv);

  try {
    preset p = make_preset(preset_name);
    if (sft_epochs > 0) p.sft.epochs = sft_epochs;
    if (sft_examples >= 0) p.sft.max_examples = sft_examples;
    if (history_loss >= 0) p.sft.history_loss_weight = history_loss;
    if (sft_lr > 0) p.sft.lr = sft_lr;
    if (d_model > 0) {
      p.model.d_model = d_model;
      p.model.heads = std::max(1, d_model / 32);
      p.model.d_ff = 4 * d_model;
    }
    if (layers > 0) p.model.layers = layers;
    if (codes > 0) p.sid.codes = codes;
    if (beam_width > 0) p.beam.beam_width = beam_width;
    if (sasrec_epochs > 0) p.sasrec.epochs = sasrec_epochs;
    if (device_name == "cuda" && !torch::cuda::is_available())
      throw std::runtime_error("--device cuda: this libtorch has no CUDA device (Debian's libtorch is CPU-only)");
    const torch::Device device(device_name == "cuda" ? torch::kCUDA : torch::kCPU);
    if (threads > 0) at::set_num_threads(threads);
    std::filesystem::create_directories(out + "/checkpoints");
    timer total;

    std::cerr << "== loading " << data_path << "\n";
    const rec::dataset data = rec::load_movielens_csv(data_path);
    const rec::split sp = rec::leave_last_two(data);
    std::cerr << "   " << data.n_ratings << " ratings, " << data.sequences.size() << " users, " << data.items.size()
              << " items; split: " << sp.train.size() << " train / " << sp.valid.size() << " valid / "
              << sp.test.size() << " test examples\n";

    rec::sid_options so = p.sid;
    so.seed = seed;
    timer ts;
    const rec::sid_table sids = rec::build_sids(data, sp, so);
    const rec::sid_trie trie(sids);
    const double sid_seconds = ts.seconds();
    std::cerr << "== semantic IDs: " << so.levels << " levels x " << so.codes << " codes, collision rate "
              << sids.stats.collision_rate << ", " << sids.stats.reassigned << " items reassigned, " << sid_seconds
              << " s\n";

    const context c{data, sp, sids, trie, device, out, seed, !no_progress};
    std::vector<model_result> results;
    std::cout << "Example responses of the model with thinking (test users):\n";
    results.push_back(run_generative("sft-thinking", true, p, c, show));
    if (!skip_baselines) {
      std::cout << "Example responses of the model without thinking (test users):\n";
      results.push_back(run_generative("sft-sid-only", false, p, c, std::min(show, 1)));

      model_result pop;
      pop.name = "most-popular";
      const std::vector<int32_t> top = rec::most_popular(data, sp, p.beam.top_n);
      pop.valid = rec::evaluate_rankings(std::vector<std::vector<int32_t>>(sp.valid.size(), top), targets(sp.valid));
      pop.test = rec::evaluate_rankings(std::vector<std::vector<int32_t>>(sp.test.size(), top), targets(sp.test));
      results.push_back(pop);

      model_result sr;
      sr.name = "sasrec";
      rec::sasrec_options sa = p.sasrec;
      sa.seed = seed;
      sa.progress = !no_progress;
      std::cerr << "== sasrec\n";
      torch::manual_seed(seed);
      rec::sasrec model(data, sa, device);
      timer tt;
      model.train(sp);
      sr.train_seconds = tt.seconds();
      timer te;
      sr.valid = rec::evaluate_rankings(model.recommend(histories(sp.valid), p.beam.top_n), targets(sp.valid));
      sr.test = rec::evaluate_rankings(model.recommend(histories(sp.test), p.beam.top_n), targets(sp.test));
      sr.eval_seconds = te.seconds();
      results.push_back(sr);
    }

    // results.json: one object per model (test metrics at the top level, validation under
    // "valid"), plus the data and SID statistics the numbers depend on.
    std::ofstream js(out + "/results.json");
    js.precision(6);
    js << "{\n  \"preset\": \"" << p.name << "\", \"seed\": " << seed << ", \"seconds\": " << total.seconds() << ",\n";
    js << "  \"data\": {\"ratings\": " << data.n_ratings << ", \"users\": " << data.sequences.size()
       << ", \"items\": " << data.items.size() << ", \"timestamp_ties\": " << data.n_timestamp_ties
       << ", \"missing_title\": " << data.n_missing_title << ", \"missing_year\": " << data.n_missing_year
       << ", \"train_examples\": " << sp.train.size() << ", \"valid_examples\": " << sp.valid.size()
       << ", \"test_examples\": " << sp.test.size() << "},\n";
    js << "  \"sid\": {\"levels\": " << sids.levels << ", \"codes\": " << sids.codes
       << ", \"collision_rate\": " << sids.stats.collision_rate << ", \"reassigned\": " << sids.stats.reassigned
       << ", \"codebook_usage\": " << json_array(sids.stats.codebook_usage)
       << ", \"quantization_error\": " << json_array(sids.stats.quantization_error) << ", \"seconds\": " << sid_seconds
       << "},\n  \"models\": [\n";
    for (size_t i = 0; i < results.size(); ++i) {
      const auto& r = results[i];
      js << "    {\"name\": \"" << json_escape(r.name) << "\", " << metrics_json(r.test) << ", \"valid\": {"
         << metrics_json(r.valid) << "}, \"train_seconds\": " << r.train_seconds
         << ", \"eval_seconds\": " << r.eval_seconds << "}" << (i + 1 < results.size() ? "," : "") << "\n";
    }
    js << "  ]\n}\n";
    js.close();

    print_table(results);
    std::printf("\nwrote %s/results.json (%.0f s in all)\n", out.c_str(), total.seconds());
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
