// An outside project: uses the installed headers through find_package(sapo).
#include <sapo/sapo.hpp>

#include <cstdio>

int main() {
  // Two responses of one group, one step each: rewards 1 and 0 -> advantages +a and -a.
  const double rewards[2] = {1.0, 0.0};
  double adv[2] = {0, 0};
  sapo::outcome_advantages(sapo::vec_view<const double>(rewards, 2), sapo::group_layout::contiguous(2),
                           sapo::advantage_options{}, sapo::vec_view<double>(adv, 2));
  std::printf("advantages %.6f %.6f\n", adv[0], adv[1]);
  return (adv[0] > 0.7 && adv[1] < -0.7) ? 0 : 1;
}
