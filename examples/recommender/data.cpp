// MovieLens CSV loading and the leave-last-two split (data.hpp).
#include "data.hpp"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <fstream>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string_view>
#include <unordered_map>

namespace rec {
namespace {

// One CSV field and whether it was quoted: R's write.csv writes a missing string as a bare
// NA and a title that really is "NA" as "NA" in quotes, so the quoting carries meaning.
struct field {
  std::string text;
  bool quoted = false;
};

// An RFC 4180 reader over the whole file: fields separated by ',', records by LF or CRLF,
// quoted fields may hold commas, line breaks and doubled quotes. It counts physical lines
// so that an error can name the line a record starts on even when a quoted field spans
// several lines.
class csv_reader {
 public:
  csv_reader(std::string path, std::string text) : path_(std::move(path)), s_(std::move(text)) {
    // A UTF-8 byte order mark is not part of the first field name.
    if (s_.compare(0, 3, "\xEF\xBB\xBF") == 0) pos_ = 3;
  }

  // Reads the next record into `out`; false at the end of the file. Blank lines (including
  // a missing or doubled final newline) are skipped rather than read as one empty field.
  bool next(std::vector<field>& out) {
    out.clear();
    while (pos_ < s_.size() && (s_[pos_] == '\n' || s_[pos_] == '\r')) {
      if (s_[pos_] == '\n') ++line_;
      ++pos_;
    }
    if (pos_ >= s_.size()) return false;
    record_line_ = line_;
    for (;;) {
      field f;
      const size_t col = out.size() + 1;
      if (pos_ < s_.size() && s_[pos_] == '"') {
        f.quoted = true;
        const int64_t open_line = line_;
        ++pos_;
        for (;;) {
          if (pos_ >= s_.size())
            fail(open_line, col, "unterminated quoted field (the quote opens on line " +
                                     std::to_string(open_line) + ")");
          const char c = s_[pos_++];
          if (c == '"') {
            if (pos_ < s_.size() && s_[pos_] == '"') {
              f.text += '"';
              ++pos_;
            } else {
              break;
            }
          } else {
            if (c == '\n') ++line_;
            f.text += c;
          }
        }
        if (pos_ < s_.size() && s_[pos_] != ',' && s_[pos_] != '\n' && s_[pos_] != '\r')
          fail(line_, col, "unexpected character after a closing quote");
      } else {
        while (pos_ < s_.size() && s_[pos_] != ',' && s_[pos_] != '\n' && s_[pos_] != '\r') {
          if (s_[pos_] == '"') fail(line_, col, "quote inside an unquoted field");
          f.text += s_[pos_++];
        }
      }
      out.push_back(std::move(f));
      if (pos_ >= s_.size()) return true;
      if (s_[pos_] == ',') {
        ++pos_;
        continue;
      }
      // End of record: LF or CRLF (a lone CR is accepted as well).
      if (s_[pos_] == '\r') ++pos_;
      if (pos_ < s_.size() && s_[pos_] == '\n') ++pos_;
      ++line_;
      return true;
    }
  }

  int64_t record_line() const { return record_line_; }

  [[noreturn]] void fail(int64_t line, size_t col, const std::string& what) const {
    throw std::runtime_error(path_ + ": line " + std::to_string(line) + ", column " +
                             std::to_string(col) + ": " + what);
  }

 private:
  std::string path_;
  std::string s_;
  size_t pos_ = 0;
  int64_t line_ = 1;
  int64_t record_line_ = 1;
};

const char* const kColumns[] = {"movieId", "title", "year", "genres", "userId", "rating", "timestamp"};
constexpr size_t kNumColumns = 7;
enum column { c_movie = 0, c_title, c_year, c_genres, c_user, c_rating, c_timestamp };

bool is_na(const field& f) { return !f.quoted && f.text == "NA"; }

struct rating_row {
  int64_t user = 0;
  int64_t movie = 0;
  int64_t timestamp = 0;
};

}  // namespace

dataset load_movielens_csv(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path + ": cannot open (run scripts/fetch_movielens to download MovieLens)");
  std::stringstream buf;
  buf << in.rdbuf();
  csv_reader csv(path, buf.str());

  std::vector<field> rec;
  if (!csv.next(rec)) csv.fail(1, 1, "empty file, expected a header");
  if (rec.size() != kNumColumns)
    csv.fail(csv.record_line(), std::min(rec.size(), kNumColumns) + 1,
             "header has " + std::to_string(rec.size()) + " columns, expected " + std::to_string(kNumColumns));
  for (size_t c = 0; c < kNumColumns; ++c)
    if (rec[c].text != kColumns[c])
      csv.fail(csv.record_line(), c + 1, "header names '" + rec[c].text + "', expected '" + kColumns[c] + "'");

  auto parse_int = [&](const field& f, size_t c) -> int64_t {
    int64_t v = 0;
    const char* b = f.text.data();
    const char* e = b + f.text.size();
    auto r = std::from_chars(b, e, v);
    if (f.text.empty() || r.ec != std::errc() || r.ptr != e)
      csv.fail(csv.record_line(), c + 1,
               std::string("expected an integer ") + kColumns[c] + ", got '" + f.text + "'");
    return v;
  };

  // Attributes of a movie as first seen; every later row of that movie must agree, since a
  // disagreement means the file is not what fetch_movielens wrote.
  struct raw_item {
    std::string title;
    bool missing_title = false;
    int year = 0;
    std::vector<std::string> genres;
    std::string genres_text;
  };
  std::map<int64_t, raw_item> raw_items;  // ordered by movieId: the dense item order
  std::vector<rating_row> ratings;

  while (csv.next(rec)) {
    if (rec.size() != kNumColumns)
      csv.fail(csv.record_line(), std::min(rec.size(), kNumColumns) + 1,
               "record has " + std::to_string(rec.size()) + " columns, expected " + std::to_string(kNumColumns));
    for (size_t c : {size_t(c_movie), size_t(c_user), size_t(c_rating), size_t(c_timestamp)})
      if (is_na(rec[c])) csv.fail(csv.record_line(), c + 1, std::string(kColumns[c]) + " is NA");

    rating_row r;
    r.movie = parse_int(rec[c_movie], c_movie);
    r.user = parse_int(rec[c_user], c_user);
    r.timestamp = parse_int(rec[c_timestamp], c_timestamp);
    {
      // The rating is not used downstream (implicit feedback), but a file whose ratings do
      // not parse is malformed all the same. strtod would accept "nan" and hex; keep to
      // plain decimals.
      const std::string& t = rec[c_rating].text;
      double v = 0;
      auto res = std::from_chars(t.data(), t.data() + t.size(), v);
      if (t.empty() || res.ec != std::errc() || res.ptr != t.data() + t.size() || !std::isfinite(v))
        csv.fail(csv.record_line(), c_rating + 1, "expected a number rating, got '" + t + "'");
    }

    raw_item it;
    it.missing_title = is_na(rec[c_title]) || rec[c_title].text.empty();
    if (!is_na(rec[c_title])) it.title = rec[c_title].text;
    if (!is_na(rec[c_year])) {
      const int64_t y = parse_int(rec[c_year], c_year);
      // 0 is the "unknown" marker of item::year, so a real year must not collide with it.
      if (y <= 0 || y > 9999) csv.fail(csv.record_line(), c_year + 1, "year out of range: " + rec[c_year].text);
      it.year = int(y);
    }
    it.genres_text = is_na(rec[c_genres]) ? std::string() : rec[c_genres].text;

    auto found = raw_items.find(r.movie);
    if (found == raw_items.end()) {
      const std::string& g = it.genres_text;
      if (g != "(no genres listed)" && !g.empty()) {
        size_t start = 0;
        for (;;) {
          const size_t bar = g.find('|', start);
          std::string name = g.substr(start, bar == std::string::npos ? std::string::npos : bar - start);
          if (name.empty()) csv.fail(csv.record_line(), c_genres + 1, "empty genre name in '" + g + "'");
          it.genres.push_back(std::move(name));
          if (bar == std::string::npos) break;
          start = bar + 1;
        }
      }
      raw_items.emplace(r.movie, std::move(it));
    } else {
      const raw_item& first = found->second;
      size_t bad = 0;
      if (first.title != it.title || first.missing_title != it.missing_title) bad = c_title + 1;
      else if (first.year != it.year) bad = c_year + 1;
      else if (first.genres_text != it.genres_text) bad = c_genres + 1;
      if (bad)
        csv.fail(csv.record_line(), bad,
                 "movie " + std::to_string(r.movie) + " has different attributes than on an earlier line");
    }
    ratings.push_back(r);
  }

  dataset d;
  d.n_ratings = int64_t(ratings.size());

  // Genres: sorted names, each item's genre indices ascending and without repeats.
  std::map<std::string, int> genre_index;
  for (const auto& kv : raw_items)
    for (const auto& g : kv.second.genres) genre_index.emplace(g, 0);
  for (auto& kv : genre_index) {
    kv.second = int(d.genre_names.size());
    d.genre_names.push_back(kv.first);
  }

  std::unordered_map<int64_t, int32_t> item_of_movie;
  d.items.reserve(raw_items.size());
  for (auto& kv : raw_items) {
    item it;
    it.movie_id = kv.first;
    it.title = std::move(kv.second.title);
    it.year = kv.second.year;
    for (const auto& g : kv.second.genres) it.genres.push_back(genre_index.at(g));
    std::sort(it.genres.begin(), it.genres.end());
    it.genres.erase(std::unique(it.genres.begin(), it.genres.end()), it.genres.end());
    d.n_missing_title += kv.second.missing_title ? 1 : 0;
    d.n_missing_year += it.year == 0 ? 1 : 0;
    item_of_movie.emplace(it.movie_id, int32_t(d.items.size()));
    d.items.push_back(std::move(it));
  }

  // Users sorted by userId; each sequence ordered by (timestamp, movieId). Items are dense
  // in movieId order, so comparing item indices is comparing movieIds.
  for (const auto& r : ratings) d.user_ids.push_back(r.user);
  std::sort(d.user_ids.begin(), d.user_ids.end());
  d.user_ids.erase(std::unique(d.user_ids.begin(), d.user_ids.end()), d.user_ids.end());
  std::unordered_map<int64_t, int32_t> user_index;
  for (size_t u = 0; u < d.user_ids.size(); ++u) user_index.emplace(d.user_ids[u], int32_t(u));

  std::vector<std::vector<std::pair<int64_t, int32_t>>> timed(d.user_ids.size());
  for (const auto& r : ratings) timed[size_t(user_index.at(r.user))].emplace_back(r.timestamp, item_of_movie.at(r.movie));
  d.sequences.resize(d.user_ids.size());
  for (size_t u = 0; u < timed.size(); ++u) {
    auto& t = timed[u];
    std::sort(t.begin(), t.end());
    for (size_t i = 0; i < t.size(); ++i) {
      if (i > 0 && t[i].first == t[i - 1].first) ++d.n_timestamp_ties;
      d.sequences[u].push_back(t[i].second);
    }
  }
  return d;
}

split leave_last_two(const dataset& data, int max_history) {
  if (max_history < 1) throw std::invalid_argument("leave_last_two: max_history must be >= 1, got " + std::to_string(max_history));
  split sp;
  auto make = [&](int32_t user, const std::vector<int32_t>& s, size_t pos) {
    example ex;
    ex.user = user;
    const size_t begin = pos > size_t(max_history) ? pos - size_t(max_history) : 0;
    ex.history.assign(s.begin() + std::ptrdiff_t(begin), s.begin() + std::ptrdiff_t(pos));
    ex.target = s[pos];
    return ex;
  };
  for (size_t u = 0; u < data.sequences.size(); ++u) {
    const auto& s = data.sequences[u];
    const size_t n = s.size();
    // Short users (n < 3) cannot spare a validation and a test target; all they have goes
    // to training (position 0 has no history, so it is never a target).
    const size_t train_end = n >= 3 ? n - 2 : n;
    for (size_t i = 1; i < train_end; ++i) sp.train.push_back(make(int32_t(u), s, i));
    if (n >= 3) {
      sp.valid.push_back(make(int32_t(u), s, n - 2));
      sp.test.push_back(make(int32_t(u), s, n - 1));
    }
  }
  return sp;
}

}  // namespace rec
