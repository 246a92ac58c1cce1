// Token vocabulary and reasoning traces. A prompt is the user's history as SID tokens; a
// response is K steps, step k = <think> t1 [t2 [t3]] </think> sid_k (SPEC's interleaved
// layout), then <eos>. Without thinking (the TIGER-style baseline) it is sid_0 .. sid_{K-1} <eos>.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "data.hpp"
#include "sid.hpp"

namespace rec {

// Token ids: specials, then one block of `codes` SID tokens per level (level-specific, as in
// TIGER), then thought tokens (item attributes).
struct vocabulary {
  static constexpr int32_t pad = 0, bos = 1, eos = 2, sep = 3, think = 4, end_think = 5;
  static constexpr int32_t first_sid = 6;
  int levels = 0;
  int codes = 0;
  std::vector<std::string> thought_names;   // e.g. "genre:Comedy", "decade:1990s", "pop:head"

  int32_t sid_token(int level, int32_t code) const { return first_sid + level * codes + code; }
  int32_t first_thought() const { return first_sid + levels * codes; }
  int32_t size() const { return first_thought() + int32_t(thought_names.size()); }
  bool is_sid(int32_t tok) const { return tok >= first_sid && tok < first_thought(); }
  int sid_level(int32_t tok) const { return (tok - first_sid) / codes; }
  int32_t sid_code(int32_t tok) const { return (tok - first_sid) % codes; }
  bool is_thought(int32_t tok) const { return tok >= first_thought() && tok < size(); }
  std::string name(int32_t tok) const;   // readable token, for docs and debugging
  int32_t thought(const std::string& name) const;   // token of a thought name, or -1
};

struct trace_options {
  bool thinking = true;     // false: SID tokens only (TIGER-style baseline)
  int max_thoughts = 3;     // 1 .. 3 thought tokens per step
  int max_history = 20;     // prompt length is fixed: histories are left-padded with <pad>
};

// Builds the thought vocabulary and, per SID prefix, the thoughts that describe it.
//
// Thought vocabulary: "genre:<name>" for every dataset genre and "genre:none"; "decade:<d>s"
// for every decade that occurs and "decade:unknown"; "pop:head", "pop:torso", "pop:tail".
//
// Popularity tiers use training interactions only: every user's sequence without its
// held-out valid/test targets (the last one or two items, per `sp`). Items sorted by that
// count (ties: lower item index) are head while fewer than 1/3 of all training interactions
// lie before them, torso while fewer than 2/3 do, tail after (and every never-seen item).
// Each tier so covers about a third of what users watch, which makes the tier as
// informative as a three-way token can be about the target.
//
// Step k describes C_k, the items under the target's SID prefix of length k + 1: the cluster
// the next SID token chooses. Rules, coarse to fine (K = levels):
//   * step 0 when K > 1: the (up to) two genres carried by most items of C_0 (ties: lower
//     genre index), most frequent first;
//   * steps 0 < k < K-1: the genre carried by most items of C_k among those not named at a
//     coarser step (if all were named: the most frequent one), then the decade most items of
//     C_k fall in (ties: earlier decade; unknown last);
//   * the last step k = K-1 (C_k is the item itself): the item's most specific genre (the one
//     fewest catalogue items carry, ties: lower index) not named before (if all were named:
//     the most specific one), its decade, its popularity tier.
// A cluster or item without genres gives "genre:none". Each step keeps its first
// max_thoughts tokens. The thoughts of a step are a function of the cluster the next SID
// token picks, so writing them first narrows that choice (a plan: genres, then era, then the
// item's niche and popularity), and the last step tells apart items of one fine cluster.
class trace_builder {
 public:
  trace_builder(const dataset& data, const split& sp, const sid_table& sids, const trace_options& opt);
  const vocabulary& vocab() const { return vocab_; }
  const trace_options& options() const { return opt_; }
  // <bos> (pad ...) sid tokens of each history item <sep>: always 2 + levels * max_history tokens.
  std::vector<int32_t> prompt(const std::vector<int32_t>& history) const;
  // The response for `target` (see the header comment), ending with <eos>.
  std::vector<int32_t> response(int32_t target) const;
  // The thought tokens of step `level` for an item under the SID prefix of length level + 1.
  const std::vector<int32_t>& thoughts(int32_t item, int level) const;
  int prompt_length() const { return 2 + vocab_.levels * opt_.max_history; }
  int max_response_length() const;

 private:
  vocabulary vocab_;
  trace_options opt_;
  const sid_table* sids_;
  std::vector<std::vector<int32_t>> thoughts_;   // [item * levels + level]
};

}  // namespace rec
