// Semantic IDs: every item gets a unique K-level code (coarse to fine) from residual
// k-means over item vectors built from what the data has (genres, year, and a truncated SVD
// of the item co-occurrence matrix), plus the prefix trie used for constrained decoding.
#pragma once
#include <cstdint>
#include <map>
#include <vector>

#include "data.hpp"

namespace rec {

struct sid_options {
  int levels = 3;            // K
  int codes = 32;            // codes per level (32 .. 64); codes^levels must be >= the item count
  int svd_dim = 32;          // collaborative embedding size (0 = no collaborative block)
  int kmeans_iters = 30;     // Lloyd iterations per level at most (stops early when stable)
  uint64_t seed = 1;         // same seed, same data, same SIDs
  // Share of the item vectors' mean squared norm each block gets (each block is rescaled so
  // that its mean squared norm over the items equals its weight). Year is one number, so it
  // gets less than the 19 genres and the SVD block, or the first level would only cut years.
  double genre_weight = 1.0;
  double year_weight = 0.5;
  double cf_weight = 1.0;
};

struct sid_stats {
  double collision_rate = 0;               // share of items whose raw RQ-KMeans code was taken
  int64_t reassigned = 0;                  // items moved to resolve collisions
  int64_t left_prefix = 0;                 // of those, items whose (levels-1)-prefix was full,
                                           // so they left their raw coarse prefix
  std::vector<double> codebook_usage;      // per level: distinct codes used / codes (final SIDs)
  std::vector<double> quantization_error;  // per level: mean squared residual after the level,
                                           // for the final SIDs
  double input_energy = 0;                 // mean squared norm of the item vectors (the error
                                           // before level 0, to read quantization_error against)
};

struct sid_table {
  int levels = 0;
  int codes = 0;
  std::vector<int32_t> code;   // n_items x levels, row major: code[item * levels + level]
  sid_stats stats;

  int32_t at(int32_t item, int level) const { return code[size_t(item) * size_t(levels) + size_t(level)]; }
  int64_t n_items() const { return levels ? int64_t(code.size()) / levels : 0; }
};

// The vectors residual k-means quantizes, one row per item: [genres | year, year missing |
// collaborative], each block rescaled to its weight (sid_options). Exposed for tests and
// diagnostics; build_sids computes them itself.
struct item_features {
  int64_t n = 0;
  int dim = 0;
  int genre_cols = 0, year_cols = 0, cf_cols = 0;  // block widths, in this order
  std::vector<double> v;                           // n x dim, row major
};
item_features make_item_features(const dataset& data, const split& sp, const sid_options& opt);

// Item vectors from genres, year and the training interactions only (sp.train's histories
// and targets: valid/test targets never leak into the codes), then residual k-means, then
// collisions resolved so that every item has a distinct code of exactly opt.levels levels
// (rule in sid.cpp). Throws std::invalid_argument on bad options or too few codes.
sid_table build_sids(const dataset& data, const split& sp, const sid_options& opt);

// The valid SIDs as a prefix tree: which codes may follow a prefix, and which item a full
// code names.
class sid_trie {
 public:
  // Throws std::invalid_argument if two items share a code or a code is out of range.
  explicit sid_trie(const sid_table& sids);
  // Codes allowed after `prefix` (prefix.size() < levels), sorted; empty if the prefix is invalid.
  const std::vector<int32_t>& next(const std::vector<int32_t>& prefix) const;
  // The item a full code names, or -1.
  int32_t item(const std::vector<int32_t>& code) const;
  // Items under a prefix (any length 0..levels), ascending; empty if the prefix is invalid.
  const std::vector<int32_t>& items_under(const std::vector<int32_t>& prefix) const;
  int levels() const { return levels_; }

 private:
  int levels_ = 0;
  std::map<std::vector<int32_t>, std::vector<int32_t>> next_, under_;
  std::map<std::vector<int32_t>, int32_t> item_;
  std::vector<int32_t> empty_;
};

}  // namespace rec
