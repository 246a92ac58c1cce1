#include "traces.hpp"

#include <algorithm>
#include <map>
#include <set>
#include <stdexcept>
#include <string>

namespace rec {

std::string vocabulary::name(int32_t tok) const {
  switch (tok) {
    case pad: return "<pad>";
    case bos: return "<bos>";
    case eos: return "<eos>";
    case sep: return "<sep>";
    case think: return "<think>";
    case end_think: return "</think>";
    default: break;
  }
  if (is_sid(tok)) return "<s" + std::to_string(sid_level(tok)) + "_" + std::to_string(sid_code(tok)) + ">";
  if (is_thought(tok)) return thought_names[size_t(tok - first_thought())];
  return "<unk" + std::to_string(tok) + ">";
}

int32_t vocabulary::thought(const std::string& nm) const {
  for (size_t i = 0; i < thought_names.size(); ++i)
    if (thought_names[i] == nm) return first_thought() + int32_t(i);
  return -1;
}

namespace {

constexpr int kUnknownDecade = 1 << 30;   // sorts after every real decade

int decade_of(const item& it) { return it.year > 0 ? it.year / 10 * 10 : kUnknownDecade; }

// Training interactions per item: each user's sequence without the held-out targets, which
// the leave-last-two split takes from the end (valid = second to last, test = last).
std::vector<int64_t> training_counts(const dataset& data, const split& sp) {
  const size_t n_users = data.sequences.size();
  std::vector<int> held(n_users, 0);
  auto hold = [&](const std::vector<example>& xs, int from_end, const char* what) {
    for (const example& x : xs) {
      if (x.user < 0 || size_t(x.user) >= n_users)
        throw std::invalid_argument(std::string("trace_builder: ") + what + " example names user " +
                                    std::to_string(x.user) + ", outside the dataset");
      const auto& seq = data.sequences[size_t(x.user)];
      if (int(seq.size()) < from_end || seq[seq.size() - size_t(from_end)] != x.target)
        throw std::invalid_argument(std::string("trace_builder: the ") + what + " target of user " +
                                    std::to_string(x.user) + " is not where the leave-last-two split puts it");
      held[size_t(x.user)] = std::max(held[size_t(x.user)], from_end);
    }
  };
  hold(sp.test, 1, "test");
  hold(sp.valid, 2, "valid");
  std::vector<int64_t> count(data.items.size(), 0);
  for (size_t u = 0; u < n_users; ++u) {
    const auto& seq = data.sequences[u];
    const size_t keep = seq.size() - size_t(held[u]);
    for (size_t i = 0; i < keep; ++i) ++count[size_t(seq[i])];
  }
  return count;
}

}  // namespace

trace_builder::trace_builder(const dataset& data, const split& sp, const sid_table& sids, const trace_options& opt)
    : opt_(opt), sids_(&sids) {
  if (sids.levels < 1 || sids.codes < 1)
    throw std::invalid_argument("trace_builder: sid_table needs levels >= 1 and codes >= 1, got " +
                                std::to_string(sids.levels) + " and " + std::to_string(sids.codes));
  if (sids.n_items() != int64_t(data.items.size()))
    throw std::invalid_argument("trace_builder: sid_table has " + std::to_string(sids.n_items()) +
                                " items, the dataset " + std::to_string(data.items.size()));
  if (opt.max_thoughts < 1 || opt.max_thoughts > 3)
    throw std::invalid_argument("trace_builder: max_thoughts must be 1..3, got " + std::to_string(opt.max_thoughts));
  if (opt.max_history < 1)
    throw std::invalid_argument("trace_builder: max_history must be >= 1, got " + std::to_string(opt.max_history));
  const int K = sids.levels;
  const int32_t n_items = int32_t(data.items.size());
  const int n_genres = int(data.genre_names.size());
  vocab_.levels = K;
  vocab_.codes = sids.codes;

  // Thought vocabulary, in a fixed order: genres, decades, popularity tiers.
  for (const auto& g : data.genre_names) vocab_.thought_names.push_back("genre:" + g);
  vocab_.thought_names.push_back("genre:none");
  std::set<int> decades;
  for (const item& it : data.items)
    if (it.year > 0) decades.insert(decade_of(it));
  for (int d : decades) vocab_.thought_names.push_back("decade:" + std::to_string(d) + "s");
  vocab_.thought_names.push_back("decade:unknown");
  for (const char* t : {"pop:head", "pop:torso", "pop:tail"}) vocab_.thought_names.push_back(t);

  const int32_t t0 = vocab_.first_thought();
  const int32_t genre_none = t0 + n_genres;
  std::map<int, int32_t> decade_token;
  {
    int32_t t = genre_none + 1;
    for (int d : decades) decade_token[d] = t++;
    decade_token[kUnknownDecade] = t;
  }
  const int32_t pop_head = vocab_.thought("pop:head");

  // Popularity tiers (see the header).
  const std::vector<int64_t> count = training_counts(data, sp);
  std::vector<int> tier(size_t(n_items), 2);
  {
    std::vector<int32_t> order(static_cast<size_t>(n_items));
    for (int32_t i = 0; i < n_items; ++i) order[size_t(i)] = i;
    std::stable_sort(order.begin(), order.end(),
                     [&](int32_t a, int32_t b) { return count[size_t(a)] > count[size_t(b)]; });
    int64_t total = 0;
    for (int64_t c : count) total += c;
    int64_t before = 0;
    for (int32_t i : order) {
      if (count[size_t(i)] > 0) tier[size_t(i)] = 3 * before < total ? 0 : 3 * before < 2 * total ? 1 : 2;
      before += count[size_t(i)];
    }
  }

  // How many catalogue items carry each genre: the rarer, the more specific.
  std::vector<int64_t> genre_items(size_t(n_genres), 0);
  for (const item& it : data.items)
    for (int g : it.genres) {
      if (g < 0 || g >= n_genres)
        throw std::invalid_argument("trace_builder: item " + std::to_string(it.movie_id) + " has genre index " +
                                    std::to_string(g) + ", outside 0.." + std::to_string(n_genres - 1));
      ++genre_items[size_t(g)];
    }

  // Items under every prefix of length 1 .. K-1 (the clusters the cluster rules describe).
  std::map<std::vector<int32_t>, std::vector<int32_t>> under;
  for (int32_t i = 0; i < n_items; ++i)
    for (int len = 1; len < K; ++len) {
      std::vector<int32_t> prefix(static_cast<size_t>(len));
      for (int l = 0; l < len; ++l) prefix[size_t(l)] = sids.at(i, l);
      under[prefix].push_back(i);
    }

  // Genres of a cluster, most items first (ties: lower genre index).
  auto genres_by_frequency = [&](const std::vector<int32_t>& cluster) {
    std::vector<int64_t> n(size_t(n_genres), 0);
    for (int32_t i : cluster)
      for (int g : data.items[size_t(i)].genres) ++n[size_t(g)];
    std::vector<int> gs;
    for (int g = 0; g < n_genres; ++g)
      if (n[size_t(g)] > 0) gs.push_back(g);
    std::stable_sort(gs.begin(), gs.end(), [&](int a, int b) { return n[size_t(a)] > n[size_t(b)]; });
    return gs;
  };
  auto dominant_decade = [&](const std::vector<int32_t>& cluster) {
    std::map<int, int64_t> n;   // ordered by decade, unknown last: the first maximum wins ties
    for (int32_t i : cluster) ++n[decade_of(data.items[size_t(i)])];
    int best = kUnknownDecade;
    int64_t best_n = -1;
    for (const auto& [d, c] : n)
      if (c > best_n) best = d, best_n = c;
    return best;
  };
  // First of `ranked` not yet named, else the first; "genre:none" when empty.
  auto pick_genre = [&](const std::vector<int>& ranked, const std::set<int32_t>& named) {
    if (ranked.empty()) return genre_none;
    for (int g : ranked)
      if (!named.count(t0 + g)) return t0 + g;
    return t0 + ranked.front();
  };

  thoughts_.assign(size_t(n_items) * size_t(K), {});
  std::map<std::vector<int32_t>, std::vector<int32_t>> memo;   // cluster steps depend on the prefix only
  for (int32_t i = 0; i < n_items; ++i) {
    std::set<int32_t> named;   // genre tokens said at coarser steps of this response
    std::vector<int32_t> prefix;
    for (int k = 0; k < K; ++k) {
      prefix.push_back(sids.at(i, k));
      std::vector<int32_t> t;
      if (k == K - 1) {
        const item& it = data.items[size_t(i)];
        std::vector<int> ranked = it.genres;
        std::sort(ranked.begin(), ranked.end(), [&](int a, int b) {
          return genre_items[size_t(a)] != genre_items[size_t(b)] ? genre_items[size_t(a)] < genre_items[size_t(b)]
                                                                  : a < b;
        });
        t = {pick_genre(ranked, named), decade_token.at(decade_of(it)), int32_t(pop_head + tier[size_t(i)])};
      } else if (auto hit = memo.find(prefix); hit != memo.end()) {
        t = hit->second;
      } else {
        const std::vector<int32_t>& cluster = under.at(prefix);
        const std::vector<int> ranked = genres_by_frequency(cluster);
        if (k == 0) {
          if (ranked.empty()) t = {genre_none};
          for (size_t j = 0; j < ranked.size() && j < 2; ++j) t.push_back(t0 + ranked[j]);
        } else {
          t = {pick_genre(ranked, named), decade_token.at(dominant_decade(cluster))};
        }
        memo[prefix] = t;
      }
      if (t.size() > size_t(opt.max_thoughts)) t.resize(size_t(opt.max_thoughts));
      for (int32_t tok : t)
        if (tok < genre_none) named.insert(tok);
      thoughts_[size_t(i) * size_t(K) + size_t(k)] = std::move(t);
    }
  }
}

std::vector<int32_t> trace_builder::prompt(const std::vector<int32_t>& history) const {
  const int K = vocab_.levels;
  std::vector<int32_t> p;
  p.reserve(size_t(prompt_length()));
  p.push_back(vocabulary::bos);
  // The most recent max_history items; fewer are left-padded so that every prompt has the
  // same length and the last item always sits at the same positions.
  const size_t n = std::min(history.size(), size_t(opt_.max_history));
  p.insert(p.end(), (size_t(opt_.max_history) - n) * size_t(K), vocabulary::pad);
  for (size_t h = history.size() - n; h < history.size(); ++h) {
    const int32_t it = history[h];
    if (it < 0 || it >= sids_->n_items())
      throw std::invalid_argument("trace_builder::prompt: item " + std::to_string(it) + " outside 0.." +
                                  std::to_string(sids_->n_items() - 1));
    for (int l = 0; l < K; ++l) p.push_back(vocab_.sid_token(l, sids_->at(it, l)));
  }
  p.push_back(vocabulary::sep);
  return p;
}

const std::vector<int32_t>& trace_builder::thoughts(int32_t item, int level) const {
  if (item < 0 || item >= sids_->n_items() || level < 0 || level >= vocab_.levels)
    throw std::invalid_argument("trace_builder::thoughts: item " + std::to_string(item) + " level " +
                                std::to_string(level) + " out of range");
  return thoughts_[size_t(item) * size_t(vocab_.levels) + size_t(level)];
}

std::vector<int32_t> trace_builder::response(int32_t target) const {
  if (target < 0 || target >= sids_->n_items())
    throw std::invalid_argument("trace_builder::response: item " + std::to_string(target) + " outside 0.." +
                                std::to_string(sids_->n_items() - 1));
  std::vector<int32_t> r;
  r.reserve(size_t(max_response_length()));
  for (int k = 0; k < vocab_.levels; ++k) {
    if (opt_.thinking) {
      r.push_back(vocabulary::think);
      const auto& t = thoughts(target, k);
      r.insert(r.end(), t.begin(), t.end());
      r.push_back(vocabulary::end_think);
    }
    r.push_back(vocab_.sid_token(k, sids_->at(target, k)));
  }
  r.push_back(vocabulary::eos);
  return r;
}

int trace_builder::max_response_length() const {
  return vocab_.levels * (opt_.thinking ? opt_.max_thoughts + 3 : 1) + 1;
}

}  // namespace rec
