/// \file error.hpp
/// \brief Two tiers of checks: SAPO_CHECK is always on and throws sapo::error naming the
/// argument, the expected and the actual value; SAPO_ASSERT guards internal invariants in
/// debug builds only.
#pragma once

#include <cassert>
#include <sstream>
#include <stdexcept>
#include <string>

namespace sapo {

/// Thrown for every rejected input. Nothing has been written to any output when it is thrown.
class error : public std::invalid_argument {
 public:
  error(std::string argument, std::string expected, std::string actual, const char* file, int line)
      : std::invalid_argument(format(argument, expected, actual, file, line)),
        argument_(std::move(argument)),
        expected_(std::move(expected)),
        actual_(std::move(actual)) {}

  /// Name of the offending argument, e.g. "logp" or "options.clip_low".
  const std::string& argument() const noexcept { return argument_; }
  const std::string& expected() const noexcept { return expected_; }
  const std::string& actual() const noexcept { return actual_; }

 private:
  static std::string format(const std::string& argument, const std::string& expected, const std::string& actual,
                            const char* file, int line) {
    std::ostringstream os;
    os << "sapo: " << argument << ": expected " << expected << ", got " << actual << " (" << file << ":" << line
       << ")";
    return os.str();
  }
  std::string argument_, expected_, actual_;
};

}  // namespace sapo

/// Throws sapo::error unless `cond`. `expected` and `actual` are stream expressions,
/// evaluated only on failure: SAPO_CHECK(n > 0, "G", "> 0", n).
#define SAPO_CHECK(cond, argument, expected, actual)                                                     \
  do {                                                                                                   \
    if (!(cond)) {                                                                                       \
      std::ostringstream sapo_expected_, sapo_actual_;                                                   \
      sapo_expected_ << expected;                                                                        \
      sapo_actual_ << actual;                                                                            \
      throw ::sapo::error((argument), sapo_expected_.str(), sapo_actual_.str(), __FILE__, __LINE__);     \
    }                                                                                                    \
  } while (0)

/// Internal invariant; compiled out with NDEBUG.
#define SAPO_ASSERT(cond) assert(cond)
