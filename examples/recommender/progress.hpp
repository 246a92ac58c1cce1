// A one-line progress bar on stderr with rate and ETA, for every long loop.
#pragma once
#include <chrono>
#include <cstdint>
#include <string>

namespace rec {

class progress_bar {
 public:
  // total = number of units; unit = what one unit is ("step", "user"); enabled = false prints nothing.
  progress_bar(std::string label, int64_t total, std::string unit, bool enabled = true);
  ~progress_bar();   // finishes the line
  void advance(int64_t n = 1, const std::string& status = "");   // status: e.g. "loss 2.31"
  void finish();

 private:
  void draw(bool final);
  std::string label_, unit_, status_;
  int64_t total_, done_ = 0;
  bool enabled_, finished_ = false;
  std::chrono::steady_clock::time_point start_, last_draw_;
  double next_log_line_ = 60.0;  // seconds since start of the next line in a log (not a terminal)
};

}  // namespace rec
