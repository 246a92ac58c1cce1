// MovieLens as the recommender sees it: items with their attributes, each user's
// interactions in time order, and the leave-last-two split of generative-recommendation
// papers (last item = test target, the one before it = validation target, the rest train).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace rec {

struct item {
  int64_t movie_id = 0;       // MovieLens movieId
  std::string title;          // may be empty in the real data
  int year = 0;               // 0 = unknown (NA in the real data)
  std::vector<int> genres;    // indices into dataset::genre_names; empty = "(no genres listed)"
};

struct dataset {
  std::vector<item> items;                    // dense item index = position, sorted by movie_id
  std::vector<std::string> genre_names;       // sorted by name
  std::vector<int64_t> user_ids;              // dense user index = position, sorted by userId
  std::vector<std::vector<int32_t>> sequences;  // per user: item indices in time order,
                                                // equal timestamps ordered by movie_id
  int64_t n_ratings = 0;
  int64_t n_timestamp_ties = 0;    // ratings sharing (user, timestamp) with an earlier one
  int64_t n_missing_title = 0;     // items with an empty title
  int64_t n_missing_year = 0;      // items with an unknown year
};

// Reads the CSV written by scripts/fetch_movielens (header: movieId,title,year,genres,
// userId,rating,timestamp; RFC 4180 quoting; NA for missing values; genres joined by '|').
// A bare NA title (R's missing value) and an empty one both load as "" and count as
// missing; a quoted "NA" is a title. "(no genres listed)" loads as no genres.
// Throws std::runtime_error naming the file, line and column (1-based field number) on
// malformed input, and on a movie whose attributes differ between its rows.
dataset load_movielens_csv(const std::string& path);

struct example {
  int32_t user = 0;
  std::vector<int32_t> history;   // up to max_history previous items, oldest first
  int32_t target = 0;
};

// Every list is in user order, and train within a user in position order (deterministic).
struct split {
  std::vector<example> train;   // one per training target (positions 1 .. n-3 of each user)
  std::vector<example> valid;   // one per user with >= 3 interactions: target = second to last
  std::vector<example> test;    // one per user with >= 3 interactions: target = last
};

// For a user sequence s of length n >= 3: test = (up to max_history items before s[n-1],
// s[n-1]), valid = (items before s[n-2], s[n-2]), train = one example per position
// 1 .. n-3. A user with n < 3 cannot spare two held-out targets: positions 1 .. n-1 all go
// to train and the user has no valid or test example (real MovieLens has none such: every
// user there has at least 20 ratings). Throws std::invalid_argument if max_history < 1.
split leave_last_two(const dataset& data, int max_history = 20);

}  // namespace rec
