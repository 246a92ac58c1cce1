#include "progress.hpp"

#include <algorithm>
#include <cstdio>
#include <unistd.h>

namespace rec {

progress_bar::progress_bar(std::string label, int64_t total, std::string unit, bool enabled)
    : label_(std::move(label)), unit_(std::move(unit)), total_(std::max<int64_t>(total, 1)), enabled_(enabled),
      start_(std::chrono::steady_clock::now()), last_draw_(start_) {}

progress_bar::~progress_bar() { finish(); }

void progress_bar::advance(int64_t n, const std::string& status) {
  done_ = std::min(total_, done_ + n);
  if (!status.empty()) status_ = status;
  const auto now = std::chrono::steady_clock::now();
  // Redraw at most 10 times a second: a bar must not cost what it measures.
  if (done_ == total_ || now - last_draw_ > std::chrono::milliseconds(100)) {
    last_draw_ = now;
    draw(false);
  }
}

void progress_bar::finish() {
  if (finished_) return;
  finished_ = true;
  draw(true);
}

void progress_bar::draw(bool final) {
  if (!enabled_) return;
  const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  const double rate = elapsed > 0 ? double(done_) / elapsed : 0.0;
  const double eta = rate > 0 ? double(total_ - done_) / rate : 0.0;
  constexpr int width = 28;
  const int filled = int(width * double(done_) / double(total_));
  std::string bar(size_t(filled), '#');
  bar.resize(width, '.');
  // On a terminal the line redraws in place; in a log every redraw would be a new line, so
  // there a line is written once a minute (long runs stay observable) and at the end.
  const bool tty = isatty(fileno(stderr));
  if (!tty && !final) {
    if (elapsed < next_log_line_) return;
    next_log_line_ = elapsed + 60.0;
  }
  std::fprintf(stderr, "%s%-22s [%s] %lld/%lld %s  %.1f %s/s  %s %.0fs  %s%s", tty ? "\r\033[K" : "",
               label_.c_str(), bar.c_str(), (long long)done_, (long long)total_, unit_.c_str(), rate,
               unit_.c_str(), final ? "took" : "eta", final ? elapsed : eta, status_.c_str(),
               final || !tty ? "\n" : "");
  std::fflush(stderr);
}

}  // namespace rec
