// The MovieLens loader and the leave-last-two split on fixture/movielens_small.csv, a file
// in exactly the format scripts/fetch_movielens writes, with every value below worked out
// by hand from it. Malformed files are written to a temporary directory by the tests.
//
// The fixture, sorted (item = dense index, user = dense index):
//   item movieId title             year  genres
//   0    1       Toy Story         1995  Adventure Animation Children Comedy Fantasy
//   1    2       Jumanji           1995  Adventure Children Fantasy
//   2    3       Heat              NA    Action Crime Thriller
//   3    5       NA (missing)      NA    (no genres listed)
//   4    7       "" (empty)        1980  Drama
//   5    10      Hello, "World"    2001  Comedy Drama
//   6    20      "NA" (a title)    1999  Drama
//   user userId  sequence (timestamp, then movieId)        ties
//   0    2       3 1                                        0   (n = 2 < 3)
//   1    3       6 3 0 1 [2 4] 5    (movies 3, 7 at ...040)  1
//   2    4       1 [0 2 5] 4 6      (movies 1, 3, 10 at ...200, in the file as 10, 1, 3)  2
//   3    7       0 1 2                                      0   (n = 3)
//   4    9       6                                          0   (n = 1)
#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "data.hpp"

namespace {

const std::string kFixture = std::string(SAPO_REC_FIXTURE_DIR) + "/movielens_small.csv";
const std::string kHeader = "\"movieId\",\"title\",\"year\",\"genres\",\"userId\",\"rating\",\"timestamp\"\n";

// Writes `text` to a fresh file under the temporary directory and returns its path.
std::string write_temp(const std::string& name, const std::string& text) {
  const auto dir = std::filesystem::temp_directory_path() / "sapo_rec_test_data";
  std::filesystem::create_directories(dir);
  const auto path = dir / name;
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
  return path.string();
}

// The loader's error message for `text`, or "" if it loaded.
std::string load_error(const std::string& name, const std::string& text) {
  const std::string path = write_temp(name, text);
  try {
    rec::load_movielens_csv(path);
  } catch (const std::runtime_error& e) {
    return e.what();
  }
  return "";
}

using ids = std::vector<int32_t>;

}  // namespace

TEST_CASE("data: the fixture loads with hand-checked items, genres and users", "[recommender][data]") {
  const rec::dataset d = rec::load_movielens_csv(kFixture);

  CHECK(d.n_ratings == 19);
  REQUIRE(d.items.size() == 7);
  const std::vector<int64_t> movie_ids = {1, 2, 3, 5, 7, 10, 20};
  for (size_t i = 0; i < 7; ++i) CHECK(d.items[i].movie_id == movie_ids[i]);

  CHECK(d.items[0].title == "Toy Story");
  CHECK(d.items[3].title.empty());               // bare NA: missing
  CHECK(d.items[4].title.empty());               // "": missing
  CHECK(d.items[5].title == "Hello, \"World\"");  // comma and doubled quotes inside quotes
  CHECK(d.items[6].title == "NA");               // quoted NA is a real title
  CHECK(d.n_missing_title == 2);

  const std::vector<int> years = {1995, 1995, 0, 0, 1980, 2001, 1999};
  for (size_t i = 0; i < 7; ++i) CHECK(d.items[i].year == years[i]);
  CHECK(d.n_missing_year == 2);

  const std::vector<std::string> genres = {"Action", "Adventure", "Animation", "Children", "Comedy",
                                           "Crime",  "Drama",     "Fantasy",   "Thriller"};
  CHECK(d.genre_names == genres);  // sorted, "(no genres listed)" is not a genre
  CHECK(d.items[0].genres == std::vector<int>{1, 2, 3, 4, 7});
  CHECK(d.items[1].genres == std::vector<int>{1, 3, 7});
  CHECK(d.items[2].genres == std::vector<int>{0, 5, 8});
  CHECK(d.items[3].genres.empty());
  CHECK(d.items[4].genres == std::vector<int>{6});
  CHECK(d.items[5].genres == std::vector<int>{4, 6});
  CHECK(d.items[6].genres == std::vector<int>{6});

  CHECK(d.user_ids == std::vector<int64_t>{2, 3, 4, 7, 9});
  REQUIRE(d.sequences.size() == 5);
  CHECK(d.sequences[0] == ids{3, 1});
  CHECK(d.sequences[1] == ids{6, 3, 0, 1, 2, 4, 5});
  CHECK(d.sequences[2] == ids{1, 0, 2, 5, 4, 6});
  CHECK(d.sequences[3] == ids{0, 1, 2});
  CHECK(d.sequences[4] == ids{6});
  CHECK(d.n_timestamp_ties == 3);
}

TEST_CASE("data: CRLF line endings, a BOM and no final newline load the same", "[recommender][data]") {
  std::ifstream in(kFixture, std::ios::binary);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::string crlf = "\xEF\xBB\xBF";
  for (char c : text) {
    if (c == '\n') crlf += "\r\n";
    else crlf += c;
  }
  crlf.resize(crlf.size() - 2);  // drop the final line break
  const rec::dataset a = rec::load_movielens_csv(kFixture);
  const rec::dataset b = rec::load_movielens_csv(write_temp("crlf.csv", crlf));
  CHECK(b.n_ratings == a.n_ratings);
  CHECK(b.sequences == a.sequences);
  CHECK(b.user_ids == a.user_ids);
  REQUIRE(b.items.size() == a.items.size());
  for (size_t i = 0; i < a.items.size(); ++i) {
    CHECK(b.items[i].title == a.items[i].title);
    CHECK(b.items[i].year == a.items[i].year);
    CHECK(b.items[i].genres == a.items[i].genres);
  }
}

TEST_CASE("data: a quoted line break stays in the title and the line count goes on", "[recommender][data]") {
  // Record 1 spans lines 2-3; the record on line 4 has a bad year, and the error must say
  // line 4, not 3 (the record count).
  const std::string text = kHeader + "1,\"Two\nLines\",1995,\"Drama\",1,4,10\n" + "2,\"B\",19x5,\"Drama\",1,4,11\n";
  const std::string err = load_error("multiline_bad.csv", text);
  CHECK_THAT(err, Catch::Contains("line 4, column 3"));
  const rec::dataset d = rec::load_movielens_csv(write_temp("multiline.csv", kHeader + "1,\"Two\nLines\",1995,\"Drama\",1,4,10\n"));
  REQUIRE(d.items.size() == 1);
  CHECK(d.items[0].title == "Two\nLines");
}

TEST_CASE("data: malformed files fail naming the file, line and column", "[recommender][data]") {
  SECTION("unterminated quote: the line where the quote opens") {
    const std::string err =
        load_error("unterminated.csv", kHeader + "1,\"A\",1995,\"Drama\",1,4,10\n2,\"Oops,1995,\"Drama\",1,4,11\n");
    CHECK_THAT(err, Catch::Contains("unterminated.csv"));
    CHECK_THAT(err, Catch::Contains("line 3, column 2"));
    CHECK_THAT(err, Catch::Contains("unterminated"));
  }
  SECTION("too few columns") {
    const std::string err = load_error("short.csv", kHeader + "1,\"A\",1995,\"Drama\",1,4,10\n2,\"B\",1995,\"Drama\",1,4\n");
    CHECK_THAT(err, Catch::Contains("short.csv"));
    CHECK_THAT(err, Catch::Contains("line 3"));
    CHECK_THAT(err, Catch::Contains("6 columns, expected 7"));
  }
  SECTION("too many columns") {
    const std::string err = load_error("long.csv", kHeader + "1,\"A\",1995,\"Drama\",1,4,10,99\n");
    CHECK_THAT(err, Catch::Contains("line 2"));
    CHECK_THAT(err, Catch::Contains("8 columns, expected 7"));
  }
  SECTION("bad numbers, each in its column") {
    CHECK_THAT(load_error("bad_movie.csv", kHeader + "x1,\"A\",1995,\"Drama\",1,4,10\n"),
               Catch::Contains("line 2, column 1") && Catch::Contains("movieId"));
    CHECK_THAT(load_error("bad_year.csv", kHeader + "1,\"A\",19x5,\"Drama\",1,4,10\n"),
               Catch::Contains("bad_year.csv: line 2, column 3") && Catch::Contains("19x5"));
    CHECK_THAT(load_error("bad_user.csv", kHeader + "1,\"A\",1995,\"Drama\",,4,10\n"), Catch::Contains("line 2, column 5"));
    CHECK_THAT(load_error("bad_rating.csv", kHeader + "1,\"A\",1995,\"Drama\",1,four,10\n"),
               Catch::Contains("line 2, column 6"));
    CHECK_THAT(load_error("nan_rating.csv", kHeader + "1,\"A\",1995,\"Drama\",1,nan,10\n"),
               Catch::Contains("line 2, column 6"));
    CHECK_THAT(load_error("bad_time.csv", kHeader + "1,\"A\",1995,\"Drama\",1,4,12.5\n"),
               Catch::Contains("line 2, column 7"));
    CHECK_THAT(load_error("na_user.csv", kHeader + "1,\"A\",1995,\"Drama\",NA,4,10\n"), Catch::Contains("line 2, column 5"));
  }
  SECTION("text after a closing quote, a quote inside a bare field") {
    CHECK_THAT(load_error("after_quote.csv", kHeader + "1,\"A\"x,1995,\"Drama\",1,4,10\n"), Catch::Contains("line 2, column 2"));
    CHECK_THAT(load_error("bare_quote.csv", kHeader + "1,A\"B,1995,\"Drama\",1,4,10\n"), Catch::Contains("line 2, column 2"));
  }
  SECTION("wrong header, empty file, empty genre name, disagreeing rows, missing file") {
    CHECK_THAT(load_error("header.csv", "\"movieId\",\"name\",\"year\",\"genres\",\"userId\",\"rating\",\"timestamp\"\n"),
               Catch::Contains("line 1, column 2"));
    CHECK_THAT(load_error("empty.csv", ""), Catch::Contains("empty file"));
    CHECK_THAT(load_error("genre.csv", kHeader + "1,\"A\",1995,\"Drama||War\",1,4,10\n"), Catch::Contains("line 2, column 4"));
    CHECK_THAT(load_error("disagree.csv", kHeader + "1,\"A\",1995,\"Drama\",1,4,10\n1,\"A\",1996,\"Drama\",2,4,10\n"),
               Catch::Contains("line 3, column 3"));
    CHECK_THROWS_WITH(rec::load_movielens_csv("/nonexistent/movielens.csv"), Catch::Contains("/nonexistent/movielens.csv"));
  }
}

TEST_CASE("data: leave-last-two on the fixture, histories truncated to 3", "[recommender][data]") {
  const rec::dataset d = rec::load_movielens_csv(kFixture);
  const rec::split sp = rec::leave_last_two(d, 3);

  // (user, history, target), worked out from the sequences in the header comment.
  struct want {
    int32_t user;
    ids history;
    int32_t target;
  };
  auto check = [](const std::vector<rec::example>& got, const std::vector<want>& expected) {
    REQUIRE(got.size() == expected.size());
    for (size_t i = 0; i < got.size(); ++i) {
      INFO("example " << i);
      CHECK(got[i].user == expected[i].user);
      CHECK(got[i].history == expected[i].history);
      CHECK(got[i].target == expected[i].target);
    }
  };
  check(sp.train, {
                      {0, {3}, 1},           // n = 2: its one position goes to train
                      {1, {6}, 3},           //
                      {1, {6, 3}, 0},        //
                      {1, {6, 3, 0}, 1},     //
                      {1, {3, 0, 1}, 2},     // 4 items before: the oldest is cut
                      {2, {1}, 0},           //
                      {2, {1, 0}, 2},        //
                      {2, {1, 0, 2}, 5},     // user 3 (n = 3) has no train example,
                  });                        // user 4 (n = 1) none at all
  check(sp.valid, {{1, {0, 1, 2}, 4}, {2, {0, 2, 5}, 4}, {3, {0}, 1}});
  check(sp.test, {{1, {1, 2, 4}, 5}, {2, {2, 5, 4}, 6}, {3, {0, 1}, 2}});
}

TEST_CASE("data: leave-last-two with the default history keeps everything before the target", "[recommender][data]") {
  const rec::dataset d = rec::load_movielens_csv(kFixture);
  const rec::split sp = rec::leave_last_two(d);
  REQUIRE(sp.test.size() == 3);
  CHECK(sp.test[0].history == ids{6, 3, 0, 1, 2, 4});
  CHECK(sp.test[0].target == 5);
  CHECK(sp.train.size() == 8);
  // max_history = 1: each history is exactly the previous item.
  const rec::split one = rec::leave_last_two(d, 1);
  REQUIRE(one.train.size() == 8);
  CHECK(one.train[3].history == ids{0});
  CHECK(one.valid[0].history == ids{2});
  CHECK_THROWS_AS(rec::leave_last_two(d, 0), std::invalid_argument);
}
