"""A complete SAPO training loop in plain PyTorch (docs/guides/plain_pytorch.md walks through it).

The "recommender" is a tiny autoregressive policy: for each user (prompt) it writes K = 3
reasoning steps, each one thought token followed by one semantic-ID token of that level
(interleaved layout). The reward is SAPO's default prefix reward against the user's target
item: step k is right only if SID levels 0..k all match. Per step, the advantage is
group-relative over the G responses to the same user; the loss uses the step-level ratio and
the step_mean aggregation, so every step is one PPO "action".

Run:  PYTHONPATH=<build>/python /usr/bin/python3 adapters/python/examples/plain_loop.py
"""
import argparse

import torch

import sapo_torch

K = 3  # steps = SID levels
CODES = 4  # codes per level
THOUGHTS = 8  # thought token ids 0..7
SID_BASE = THOUGHTS  # level k's SID tokens: SID_BASE + CODES*k + code
VOCAB = SID_BASE + CODES * K
T = 2 * K  # thought, SID, thought, SID, ...
SID_RANGES = [(SID_BASE + CODES * k, SID_BASE + CODES * (k + 1)) for k in range(K)]


class TinyPolicy(torch.nn.Module):
    """logits[t] = user embedding + position embedding + previous-token embedding, with
    constrained decoding: even positions may only emit thought tokens, odd position 2k+1 only
    a level-k SID token (so every response is well-formed)."""

    def __init__(self, n_users):
        super().__init__()
        self.user = torch.nn.Embedding(n_users, VOCAB)
        self.pos = torch.nn.Embedding(T, VOCAB)
        self.prev = torch.nn.Embedding(VOCAB + 1, VOCAB)  # VOCAB = "no previous token"
        for emb in (self.user, self.pos, self.prev):
            torch.nn.init.zeros_(emb.weight)
        allowed = torch.zeros(T, VOCAB, dtype=torch.bool)
        for t in range(T):
            if t % 2 == 0:
                allowed[t, :THOUGHTS] = True
            else:
                lo, hi = SID_RANGES[t // 2]
                allowed[t, lo:hi] = True
        self.register_buffer("allowed", allowed)

    def logits(self, users, prev_tokens):
        pos = torch.arange(T)
        z = self.user(users)[:, None, :] + self.pos(pos)[None] + self.prev(prev_tokens)
        return z.masked_fill(~self.allowed[None], float("-inf"))

    def log_probs(self, users, tokens):
        """Teacher-forced per-token log-probabilities (B, T) of the given responses."""
        prev = torch.cat([torch.full_like(tokens[:, :1], VOCAB), tokens[:, :-1]], dim=1)
        logp = torch.log_softmax(self.logits(users, prev), dim=-1)
        return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)

    @torch.no_grad()
    def sample(self, users, generator):
        tokens = torch.zeros(len(users), T, dtype=torch.int64)
        prev = torch.full((len(users),), VOCAB, dtype=torch.int64)
        for t in range(T):
            z = self.user(users) + self.pos.weight[t] + self.prev(prev)
            z = z.masked_fill(~self.allowed[t], float("-inf"))
            tokens[:, t] = torch.multinomial(torch.softmax(z, -1), 1, generator=generator).squeeze(-1)
            prev = tokens[:, t]
        return tokens


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=40)
    ap.add_argument("--users", type=int, default=6)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--ppo-epochs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    G, U = args.group_size, args.users
    targets = torch.randint(0, CODES, (U, K), generator=gen)  # each user's target item (its SID)
    policy = TinyPolicy(U)
    opt = torch.optim.Adam(policy.parameters(), lr=0.1)

    users = torch.arange(U).repeat_interleave(G)  # B = U * G responses, groups contiguous
    history = []
    for it in range(args.iterations):
        # 1. rollout with the current policy (it is the "old" policy of this iteration)
        tokens = policy.sample(users, gen)
        mask = torch.ones_like(tokens, dtype=torch.float32)
        with torch.no_grad():
            old_logp = policy.log_probs(users, tokens)

        # 2. SAPO: steps, step rewards, per-step group advantages
        seg = sapo_torch.segment_steps(tokens, mask, K, SID_RANGES)
        rewards = sapo_torch.step_rewards(seg.codes, seg.malformed, targets[users])  # prefix rewards (B, K)
        adv = sapo_torch.group_advantages(rewards, group_size=G)

        # 3. a few PPO epochs on the batch
        for _ in range(args.ppo_epochs):
            logp = policy.log_probs(users, tokens)
            out = sapo_torch.policy_loss(logp, old_logp, mask, step_advantages=adv.adv, step=seg.step,
                                         ratio="step", agg="step_mean", clip_low=0.2, clip_high=0.28)
            opt.zero_grad()
            out.loss.backward()
            opt.step()

        d = out.as_dict()
        stats = adv.statistics()
        mean_r = rewards.mean(0).tolist()
        history.append(mean_r)
        print(f"iter {it:3d}  reward per step {' '.join(f'{x:.2f}' for x in mean_r)}  "
              f"zero-var groups {' '.join(f'{x:.2f}' for x in stats['zero_variance_fraction'])}  "
              f"loss {d['loss']:+.4f}  clip {d['clip_frac_low'] + d['clip_frac_high']:.2f}")

    first = sum(history[0]) / K
    last = sum(sum(h) / K for h in history[-5:]) / 5
    print(f"mean step reward: first iteration {first:.3f}, last 5 iterations {last:.3f}")
    return first, last


if __name__ == "__main__":
    main()
