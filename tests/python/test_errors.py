"""Bad input: every case raises RuntimeError whose message names the argument and gives both
the expected and the actual shape / value (SPEC §7), and nothing is returned."""
import math

import pytest
import torch

import sapo_torch as st

B, T = 4, 6
LP = torch.randn(B, T, dtype=torch.float64)
M = torch.ones(B, T)
A = torch.randn(B, T, dtype=torch.float64)
S = torch.zeros(B, T, dtype=torch.int32)
I64 = torch.int64

# (id, call, substrings that must all appear in the message)
CASES = [
    ("old_logp shape", lambda: st.policy_loss(LP, LP[:, :5], M, A), ["old_logp", "(4, 6)", "(4, 5)"]),
    ("mask shape", lambda: st.policy_loss(LP, LP, M[:3], A), ["mask", "(4, 6)", "(3, 6)"]),
    ("token_advantages shape", lambda: st.policy_loss(LP, LP, M, A.t()), ["token_advantages", "(4, 6)", "(6, 4)"]),
    ("ref_logp shape", lambda: st.policy_loss(LP, LP, M, A, ref_logp=LP[:2], kl_coef=0.1), ["ref_logp", "(4, 6)", "(2, 6)"]),
    ("step shape", lambda: st.policy_loss(LP, LP, M, A, step=S[:, :2], ratio="step"), ["step", "(4, 6)", "(4, 2)"]),
    ("step_advantages rows", lambda: st.policy_loss(LP, LP, M, step_advantages=torch.zeros(3, 2), step=S),
     ["step_advantages", "B = 4", "(3, 2)"]),
    ("logp 1-D", lambda: st.policy_loss(LP[0], LP, M, A), ["logp", "2-D", "(6)"]),
    ("logp dtype", lambda: st.policy_loss(LP.long(), LP, M, A), ["logp", "floating", "int64"]),
    ("both advantages", lambda: st.policy_loss(LP, LP, M, A, step_advantages=torch.zeros(B, 2), step=S),
     ["token_advantages", "step_advantages", "both"]),
    ("no advantages", lambda: st.policy_loss(LP, LP, M), ["token_advantages", "step_advantages", "neither"]),
    ("mask value", lambda: st.policy_loss(LP, LP, M * 2, A), ["mask", "0 or 1", "got 2"]),
    ("step id", lambda: st.policy_loss(LP, LP, M, step_advantages=torch.zeros(B, 3), step=S + 3),
     ["step", "[-1, 3)", "got 3"]),
    ("clip_low", lambda: st.policy_loss(LP, LP, M, A, clip_low=1.5), ["clip_low", "(0, 1)", "1.5"]),
    ("clip_high", lambda: st.policy_loss(LP, LP, M, A, clip_high=-1.0), ["clip_high", "(0, inf)", "-1"]),
    ("dual_clip_c", lambda: st.policy_loss(LP, LP, M, A, dual_clip=True, dual_clip_c=0.5),
     ["dual_clip_c", "> 1", "0.5"]),
    ("kl without ref", lambda: st.policy_loss(LP, LP, M, A, kl_coef=0.1), ["ref_logp", "kl_coef > 0", "none"]),
    ("step ratio without step", lambda: st.policy_loss(LP, LP, M, A, ratio="step"), ["step", "step ids", "none"]),
    ("step_mean without step", lambda: st.policy_loss(LP, LP, M, A, agg="step_mean"), ["step", "step_mean", "none"]),
    ("NaN old_logp", lambda: st.policy_loss(LP, LP * math.nan, M, A), ["old_logp", "finite", "nan"]),
    ("unknown ratio", lambda: st.policy_loss(LP, LP, M, A, ratio="x"), ["ratio", "'token', 'step', 'sequence'", "'x'"]),
    ("unknown agg", lambda: st.policy_loss(LP, LP, M, A, agg="mean"), ["agg", "'token_mean'", "'mean'"]),
    ("unknown kl", lambda: st.policy_loss(LP, LP, M, A, kl="k4"), ["kl", "'k3'", "'k4'"]),
    ("unknown nonfinite", lambda: st.policy_loss(LP, LP, M, A, nonfinite="skip"), ["nonfinite", "'mask'", "'skip'"]),
    ("negative normalizer", lambda: st.policy_loss(LP, LP, M, A, global_tokens=-1.0), ["global_tokens", ">= 0", "-1"]),
    ("negative threads", lambda: st.policy_loss(LP, LP, M, A, num_threads=-1), ["num_threads", ">= 0", "-1"]),
    ("group size", lambda: st.group_advantages(torch.zeros(5, 3), group_size=2), ["group_size", "B = 5", "got 2"]),
    ("group id", lambda: st.group_advantages(torch.zeros(5, 3), group_ids=torch.tensor([0, 1, 2, 0, 1]), n_groups=2),
     ["group_ids", "[0, 2)", "got 2"]),
    ("group ids shape", lambda: st.group_advantages(torch.zeros(5, 3), group_ids=torch.tensor([0, 1]), n_groups=2),
     ["group_ids", "(5)", "(2)"]),
    ("eps", lambda: st.group_advantages(torch.zeros(4, 3), group_size=2, eps=0.0), ["eps", "> 0", "got 0"]),
    ("inf reward", lambda: st.group_advantages(torch.tensor([[1.0], [math.inf]]), group_size=2),
     ["rewards", "finite", "inf"]),
    ("unknown norm", lambda: st.group_advantages(torch.zeros(4, 3), group_size=2, norm="zscore"),
     ["norm", "'std'", "'zscore'"]),
    ("outcome rewards 2-D", lambda: st.outcome_advantages(torch.zeros(4, 3), group_size=2), ["rewards", "1-D", "(4, 3)"]),
    ("num_steps", lambda: st.segment_steps(torch.zeros(2, 3, dtype=I64), M[:2, :3], 65, [(1, 2)]),
     ["num_steps", "[1, 64]", "65"]),
    ("sid range count", lambda: st.segment_steps(torch.zeros(2, 3, dtype=I64), M[:2, :3], 2, [(1, 2), (3, 4), (5, 6)]),
     ["sid_ranges", "K = 2", "3 ranges"]),
    ("segment mask shape", lambda: st.segment_steps(torch.zeros(2, 3, dtype=I64), M, 2, [(1, 2)]),
     ["mask", "(2, 3)", "(4, 6)"]),
    ("targets shape", lambda: st.step_rewards(torch.zeros(2, 3, dtype=I64), torch.zeros(2, dtype=torch.bool),
                                              torch.zeros(2, 2, dtype=I64)), ["targets", "(2, 3)", "(2, 2)"]),
    ("level weights", lambda: st.step_rewards(torch.zeros(2, 3, dtype=I64), torch.zeros(2, dtype=torch.bool),
                                              torch.zeros(2, 3, dtype=I64), kind="weighted_prefix",
                                              level_weights=[1.0, 2.0]), ["level_weights", "K = 3", "2 weights"]),
    ("mix shapes", lambda: st.mix_advantages(torch.zeros(3), torch.zeros(2, 3)), ["outcome_adv", "(2)", "(3)"]),
    ("broadcast step adv rows", lambda: st.broadcast_step_advantages(torch.zeros(3, 2), S, M), ["adv", "B = 4", "(3, 2)"]),
    ("broadcast outcome adv", lambda: st.broadcast_outcome_advantages(torch.zeros(3), M), ["adv", "(4)", "(3)"]),
]


@pytest.mark.parametrize("call,needles", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_runtime_error_naming_argument_and_values(call, needles):
    with pytest.raises(RuntimeError) as info:
        call()
    msg = str(info.value)
    for n in needles:
        assert n in msg, f"{n!r} not in message: {msg}"


def test_sid_ranges_must_be_pairs():
    with pytest.raises(ValueError, match="pairs"):
        st.segment_steps(torch.zeros(2, 3, dtype=I64), M[:2, :3], 1, [(1, 2, 3)])


def test_rejected_call_leaves_inputs_and_grad_untouched():
    logp = LP.clone().requires_grad_(True)
    before = LP.clone()
    with pytest.raises(RuntimeError):
        st.policy_loss(logp, LP, M * 2, A)
    assert logp.grad is None and torch.equal(logp.detach(), before)
