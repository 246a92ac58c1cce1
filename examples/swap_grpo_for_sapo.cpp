// One batch, two losses: GRPO (one reward per answer) next to SAPO (one reward per step).
// A recommender answers in K = 3 steps, each some thinking tokens closed by one semantic-ID
// (SID) token, coarse to fine. The target item is SID (3, 1, 4); we sampled G = 4 answers
// that get 0, 1, 2 and 3 levels right. All arrays are plain row-major buffers.
#include <sapo/sapo.hpp>

#include <cstdio>
#include <vector>

constexpr int G = 4, K = 3, T = 12;  // answers, steps, padded length
using Buf = std::vector<double>;
sapo::mat_view<double> mat(Buf& b, int cols) { return {b.data(), static_cast<int64_t>(b.size()) / cols, cols}; }
sapo::vec_view<double> vec(Buf& b) { return {b.data(), static_cast<int64_t>(b.size())}; }

int main() {
  const int target[K] = {3, 1, 4}, answers[G][K] = {{5, 2, 7}, {3, 2, 7}, {3, 1, 0}, {3, 1, 4}};
  const int thinking[G] = {2, 3, 1, 1};  // thinking tokens before each SID token
  std::vector<int64_t> tokens(G * T, 0), targets(G * K), codes(G * K);
  std::vector<uint8_t> mask(G * T, 0), malformed(G);
  for (int i = 0; i < G; ++i)
    for (int k = 0, t = 0; k < K; ++k) {
      for (int j = 0; j < thinking[i]; ++j) mask[i * T + t] = 1, tokens[i * T + t++] = 7;  // a thinking token: id 7
      mask[i * T + t] = 1, tokens[i * T + t++] = 1000 + 10 * k + answers[i][k];  // SID: level k uses 1000 + 10k + code
      targets[i * K + k] = target[k];  // the target of the answer's prompt
    }
  const sapo::mat_view<const uint8_t> mask_v(mask.data(), G, T);

  // 1. Split every answer into its K steps and read the SID it generated.
  sapo::segment_options seg;
  seg.num_steps = K;
  seg.sid_ranges = {{1000, 1010}, {1010, 1020}, {1020, 1030}};
  std::vector<int32_t> step(G * T), n_steps(G);
  sapo::segment_steps(sapo::mat_view<const int64_t>(tokens.data(), G, T), mask_v, seg,
                      {{step.data(), G, T}, {n_steps.data(), G}, {codes.data(), G, K}, {malformed.data(), G}});
  const sapo::mat_view<const int64_t> codes_v(codes.data(), G, K), targets_v(targets.data(), G, K);
  const sapo::vec_view<const uint8_t> malformed_v(malformed.data(), G);
  const auto group = sapo::group_layout::contiguous(G);
  const sapo::advantage_options norm;  // (r - mean) / (std + 1e-6) within the group

  // 2. GRPO: exact match gives one reward per answer (every step holds it: read column 0,
  //    stride K), one advantage per answer, copied onto all of its tokens.
  Buf exact(G * K), a_grpo(G), tok_grpo(G * T);
  sapo::reward_options exact_match;
  exact_match.kind = sapo::reward_kind::exact;
  sapo::step_rewards(codes_v, malformed_v, targets_v, exact_match, mat(exact, K));
  sapo::outcome_advantages(sapo::vec_view<const double>(exact.data(), G, K), group, norm, vec(a_grpo));
  sapo::broadcast_outcome_advantages(vec(a_grpo), mask_v, mat(tok_grpo, T));

  // 3. SAPO: prefix match per step, normalized per step, applied to that step's tokens only.
  Buf prefix(G * K), a_sapo(G * K), tok_sapo(G * T);
  sapo::step_rewards(codes_v, malformed_v, targets_v, sapo::reward_options{}, mat(prefix, K));  // prefix: the default
  sapo::group_advantages(mat(prefix, K), group, norm, mat(a_sapo, K));
  sapo::broadcast_step_advantages(mat(a_sapo, K), sapo::mat_view<const int32_t>(step.data(), G, T), mask_v,
                                  mat(tok_sapo, T));

  // 4. The same clipped policy loss for both, on made-up log-probs; grad = d loss / d logp.
  Buf logp(G * T), old_logp(G * T), grad(G * T);
  for (int n = 0; n < G * T; ++n) old_logp[n] = -1.0 - 0.1 * (n % 4), logp[n] = old_logp[n] + 0.05 * (n % 3 - 1);
  auto loss = [&](Buf& token_adv) {
    sapo::policy_inputs<double, uint8_t> in;
    in.logp = mat(logp, T), in.old_logp = mat(old_logp, T), in.token_advantages = mat(token_adv, T);
    in.mask = mask_v;
    return sapo::policy_loss(in, sapo::loss_options{}, mat(grad, T)).loss;
  };

  std::printf("answer SID      | GRPO reward   A     | SAPO step rewards   step advantages\n");
  for (int i = 0; i < G; ++i) {
    const double *r = &prefix[i * K], *a = &a_sapo[i * K];
    std::printf("%d      (%d,%d,%d)  |     %.0f     %6.3f  |      %.0f  %.0f  %.0f        %6.3f %6.3f %6.3f\n", i,
                answers[i][0], answers[i][1], answers[i][2], exact[i * K], a_grpo[i], r[0], r[1], r[2], a[0], a[1],
                a[2]);
  }
  std::printf("\ntoken advantages (-- = padding)\n");
  for (int i = 0; i < G; ++i)
    for (Buf* tok : {&tok_grpo, &tok_sapo}) {
      std::printf("answer %d %s:", i, tok == &tok_grpo ? "GRPO" : "SAPO");
      for (int t = 0; t < T; ++t)
        if (mask[i * T + t]) std::printf(" %6.2f", (*tok)[i * T + t]); else std::printf("     --");
      std::printf("\n");
    }
  std::printf("\nloss: GRPO %.6f   SAPO %.6f\nright, yet punished by GRPO:", loss(tok_grpo), loss(tok_sapo));
  for (int i = 0; i < G; ++i)
    for (int k = 0, t = 0, first = 0; k < K; ++k, first = t) {
      while (t < T && step[i * T + t] == k) ++t;
      if (prefix[i * K + k] == 1 && a_grpo[i] < 0)
        std::printf(" answer %d tokens %d-%d (step %d);", i, first, t - 1, k);
    }

  // 5. With exact-match rewards every step of an answer has the same reward, so SAPO's step
  //    advantages are GRPO's, bit for bit: SAPO differs from GRPO only through step rewards.
  Buf a_exact(G * K);
  sapo::group_advantages(mat(exact, K), group, norm, mat(a_exact, K));
  bool same = true;
  for (int n = 0; n < G * K; ++n) same = same && a_exact[n] == a_grpo[n / K];
  std::printf("\nSAPO with exact rewards == GRPO: %s\n", same ? "yes" : "NO");
  return same ? 0 : 1;
}
