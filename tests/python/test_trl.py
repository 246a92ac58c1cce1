"""sapo_torch.trl.make_sapo_grpo_trainer on a stand-in for TRL's GRPOTrainer (TRL is not
installed here). The stand-in has the members the subclass uses, with TRL 0.17-0.19's names and
shapes: _generate_and_score_completions returning the inputs dict, _get_per_token_logps,
num_generations, beta, epsilon_low / epsilon_high, loss_type, max_completion_length,
accelerator (gather, process_index) and _metrics[mode][key]. The test checks the glue: that
the loss the subclass returns is SAPO's loss on the reference pipeline (sapo_reference.py)."""
import random
from collections import defaultdict

import pytest
import torch

import sapo_reference as ref
from sapo_torch.trl import make_sapo_grpo_trainer

K, G, P_LEN, C_LEN = 3, 4, 3, 16
RANGES = ref.per_level_ranges(K)


class FakeAccelerator:
    """Two-process gather: this process is `process_index`, the other rank's tensor is given."""

    def __init__(self, process_index=0, other=None):
        self.process_index = process_index
        self.other = other

    def gather(self, t):
        if self.other is None:
            return t
        parts = [self.other, t] if self.process_index == 1 else [t, self.other]
        return torch.cat(parts)


class TinyLM(torch.nn.Module):
    """Per-token log-probabilities from a position-and-token table (enough to have a gradient)."""

    def __init__(self, vocab=200, length=P_LEN + C_LEN):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(length, vocab, generator=torch.Generator().manual_seed(0)))

    def forward(self, input_ids):
        logp = torch.log_softmax(self.w[: input_ids.size(1)], dim=-1)  # (L, V)
        return logp.gather(1, input_ids.t()).t()  # (B, L)


class FakeGRPOTrainer:
    def __init__(self, model, completions, masks, num_generations=G, beta=0.0, loss_type="grpo",
                 accelerator=None, old_logps=None, ref_logps=None):
        self.model = model
        self.num_generations = num_generations
        self.beta = beta
        self.epsilon_low, self.epsilon_high = 0.2, 0.28
        self.loss_type = loss_type
        self.max_completion_length = C_LEN
        self.scale_rewards = True
        self.accelerator = accelerator or FakeAccelerator()
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._completions, self._masks = completions, masks
        self._old, self._ref = old_logps, ref_logps

    def _get_per_token_logps(self, model, input_ids, attention_mask, logits_to_keep):
        return model(input_ids)[:, -logits_to_keep:]

    def _generate_and_score_completions(self, inputs):
        B = len(inputs)
        return {
            "prompt_ids": torch.ones(B, P_LEN, dtype=torch.int64),
            "prompt_mask": torch.ones(B, P_LEN, dtype=torch.int64),
            "completion_ids": self._completions,
            "completion_mask": self._masks,
            "advantages": torch.zeros(B),  # TRL's outcome advantages, unused by SAPO
            "old_per_token_logps": self._old,
            "ref_per_token_logps": self._ref,
        }


def _batch(seed, B):
    rng = random.Random(seed)
    tokens, mask = ref.random_tokens(rng, K, B, C_LEN, defect_rate=0.2)
    step, _, codes, malformed = ref.segment(tokens, mask, K, RANGES)
    targets = []
    for g in range(B // G):
        # the target is one member's code (so some responses match), or random
        member = codes[g * G]
        y = [c if c >= 0 else rng.randrange(10) for c in member]
        targets += [y] * G
    inputs = [{"prompt": f"user {i // G}", "target_sid": targets[i]} for i in range(B)]
    return tokens, mask, step, codes, malformed, targets, inputs


def _reference_loss(model, tokens, mask, step, codes, malformed, targets, agg_kw, old=None, ref_logp=None, beta=0.0):
    r = ref.step_rewards(codes, malformed, targets, "prefix")
    A, _ = ref.group_advantages(r, [i // G for i in range(len(r))], len(r) // G)
    ids = torch.cat([torch.ones(len(tokens), P_LEN, dtype=torch.int64), torch.tensor(tokens)], 1)
    logp = model(ids)[:, -C_LEN:].double()
    old = logp.detach() if old is None else old.double()
    tok_adv = torch.tensor(ref.broadcast(A, step, mask), dtype=torch.float64)
    loss, diag = ref.policy_loss(logp, old, torch.tensor(mask, dtype=torch.float64), tok_adv,
                                 step=torch.tensor(step), ref_logp=None if ref_logp is None else ref_logp.double(),
                                 clip_low=0.2, clip_high=0.28, kl_coef=beta, kl="k3", **agg_kw)
    return loss, diag


@pytest.mark.parametrize("loss_type,agg_kw", [
    ("grpo", dict(agg="seq_mean_token_mean", global_sequences=12.0)),
    ("bnpo", dict(agg="token_mean")),
    ("dr_grpo", dict(agg="seq_mean_token_sum_norm", max_response_length=float(C_LEN))),
])
def test_sapo_trainer_loss_is_the_reference_sapo_loss(loss_type, agg_kw):
    B = 12
    tokens, mask, step, codes, malformed, targets, inputs = _batch(5, B)
    model = TinyLM()
    Trainer = make_sapo_grpo_trainer(FakeGRPOTrainer)
    assert Trainer.__name__ == "SAPOFakeGRPOTrainer"
    tr = Trainer(model, torch.tensor(tokens), torch.tensor(mask), loss_type=loss_type,
                 sapo_num_steps=K, sapo_sid_ranges=RANGES)
    batch = tr._generate_and_score_completions(inputs)
    assert batch["sapo_step"].tolist() == step
    loss = tr.compute_loss(model, batch)
    want, _ = _reference_loss(model, tokens, mask, step, codes, malformed, targets, agg_kw)
    assert abs(float(loss) - float(want)) < 1e-6
    loss.backward()
    assert model.w.grad is not None and model.w.grad.abs().sum() > 0
    assert "clip_ratio" in tr._metrics["train"] and "sapo/malformed_frac" in tr._metrics["train"]


def test_old_and_reference_logps_and_kl_are_used():
    B = 8
    tokens, mask, step, codes, malformed, targets, inputs = _batch(6, B)
    model = TinyLM()
    gen = torch.Generator().manual_seed(3)
    old = model(torch.cat([torch.ones(B, P_LEN, dtype=torch.int64), torch.tensor(tokens)], 1))[:, -C_LEN:].detach()
    old = old + 0.3 * torch.randn(B, C_LEN, generator=gen)
    ref_lp = old + 0.2 * torch.randn(B, C_LEN, generator=gen)
    tr = make_sapo_grpo_trainer(FakeGRPOTrainer)(model, torch.tensor(tokens), torch.tensor(mask), beta=0.04,
                                                 old_logps=old, ref_logps=ref_lp, sapo_num_steps=K,
                                                 sapo_sid_ranges=RANGES)
    loss = tr.compute_loss(model, tr._generate_and_score_completions(inputs))
    want, diag = _reference_loss(model, tokens, mask, step, codes, malformed, targets,
                                 dict(agg="seq_mean_token_mean", global_sequences=float(B)), old=old,
                                 ref_logp=ref_lp, beta=0.04)
    assert abs(float(loss) - float(want)) < 1e-6
    assert tr._metrics["train"]["kl"] == [pytest.approx(diag["kl_ref"], rel=1e-5)]


def test_groups_are_normalized_over_the_gathered_batch_and_sliced_per_process():
    B = 8  # per process; the other process holds rows 0..7 of the 16-row generation batch
    tokens, mask, step, codes, malformed, targets, inputs = _batch(7, B)
    rng = random.Random(70)
    other = [[rng.choice([0.0, 1.0]) for _ in range(K)] for _ in range(B)]
    acc = FakeAccelerator(process_index=1, other=torch.tensor(other, dtype=torch.float32))
    model = TinyLM()
    # G = 16 puts every response of both processes in one group: the result depends on the gather.
    tr = make_sapo_grpo_trainer(FakeGRPOTrainer)(model, torch.tensor(tokens), torch.tensor(mask), num_generations=16,
                                                 accelerator=acc, sapo_num_steps=K, sapo_sid_ranges=RANGES)
    batch = tr._generate_and_score_completions(inputs)
    r = ref.step_rewards(codes, malformed, targets, "prefix")
    A_all, _ = ref.group_advantages([[float(x) for x in row] for row in other] + r, [0] * 16, 1)
    got = batch["sapo_step_advantages"].double()
    assert torch.allclose(got, torch.tensor(A_all[8:], dtype=torch.float64), rtol=1e-5, atol=1e-6)
