"""Data-parallel SAPO on top of ``torch.distributed``: group advantages when the responses of
one group sit on different ranks, and the policy loss with global normalizers.

The protocol is the one of the C++ library (``sapo/advantages.hpp``, ``docs/distributed.md``);
each local step is a compiled operator of :mod:`sapo_torch` (the kernels of ``group_advantages``),
and this module adds only the all-reduces between them::

    round 1   group_partials: per (group, step) and for the whole batch, count, sum, min, max
              of the present rewards              -> all_reduce SUM (count, sum), MIN (min, -max)
    round 2   group_deviations: sum of squared deviations from the global mean  -> all_reduce SUM
    finish    finalize_group_advantages: the advantages of the local rows; sum A and sum A^2
              per step -> all_reduce SUM, then finish_advantage_std

Two rounds rather than one (sums of r and r^2) keep the two-pass numerics of the
single-process kernels: the advantages agree with ``sapo_torch.group_advantages`` on the
whole batch to ~1e-12 relative (the ranks add their partial sums in another order).

Usage (every rank, same order, same ``n_groups``, K and options)::

    import sapo_torch.distributed as sd
    adv = sd.group_advantages(rewards, group_ids=ids, n_groups=n_groups)   # ids: global group ids
    out = sd.policy_loss(logp, old_logp, mask, step_advantages=adv.adv, step=step, agg="step_mean")
    out.loss.backward()       # this rank's rows of the gradient of the whole batch's loss

The rank losses add up to the whole batch's loss. DDP *averages* gradients over the W
ranks: multiply the loss by W there to get the whole batch's gradient.

The local steps run on the CPU (their arrays are O(n_groups * K), the rewards O(B * K)), so
they need no CUDA kernels; the reductions are small float64 / int64 tensors on the CPU, or on
the inputs' CUDA device under NCCL. An input rejected on one rank (Inf reward, unknown group
id, bad mask) raises ``RuntimeError`` on every rank: the error travels in the first
all-reduce, so no rank is left waiting.
"""
import math
from typing import Dict, Optional

import torch
import torch.distributed as dist

from . import (NORMALIZATIONS, SINGLETON_POLICIES, AdvantageResult, LossOutput, finalize_group_advantages,
               finish_advantage_std, group_deviations, group_partials, loss_counts as _local_loss_counts,
               policy_loss as _policy_loss, policy_loss_forward as _policy_loss_forward)

__all__ = ["group_advantages", "outcome_advantages", "loss_counts", "loss_normalizers", "policy_loss"]


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    dist.all_reduce(t, op=op, group=group)
    return t


def _comm_device(group, like: torch.Tensor) -> torch.device:
    """Where the reduction buffers live: NCCL reduces CUDA tensors only (the inputs' device,
    else the current one); every other backend gets CPU tensors, which gloo always takes."""
    if dist.get_backend(group) != "nccl":
        return torch.device("cpu")
    return like.device if like.is_cuda else torch.device("cuda", torch.cuda.current_device())


def _raise_if_failed(failed: float, mine: Optional[str], stage: str) -> None:
    if mine:
        raise RuntimeError(f"sapo_torch.distributed.{stage}: this rank's input was rejected: {mine}")
    if failed:
        raise RuntimeError(f"sapo_torch.distributed.{stage}: {int(failed)} other rank(s) rejected their input "
                           f"(see their error)")


def group_advantages(
    rewards: torch.Tensor,
    group_size: int = 0,
    group_ids: Optional[torch.Tensor] = None,
    n_groups: int = 0,
    *,
    first_row: int = 0,
    norm: str = "std",
    unbiased_std: bool = True,
    eps: float = 1e-6,
    singleton: str = "zero",
    group=None,
) -> AdvantageResult:
    """Step advantages of this rank's rows, with group statistics over every rank (SPEC §3).

    Args:
        rewards: (B_local, K) float step rewards of this rank's responses; NaN = absent step.
            B_local may be 0 (the rank still takes part in the all-reduces).
        group_ids: (B_local) *global* group ids in [0, n_groups), or
        group_size: G > 0 for contiguous groups over the global batch, this rank holding the
            global rows [first_row, first_row + B_local) (groups may straddle ranks).
        n_groups: the number of groups over every rank (> 0, required).
        norm, unbiased_std, eps, singleton: as :func:`sapo_torch.group_advantages`.
        group: the ``torch.distributed`` process group (None = the default group).

    Returns:
        AdvantageResult(adv (B_local, K) in the rewards' dtype and device, stats (6, K) float64
        (CPU) of the whole batch, the same on every rank).
    """
    # Raised before any collective, identically on every rank: the size of the reduction
    # buffers depends on K and n_groups, and the options would otherwise fail only in the
    # finish, after two rounds.
    if rewards.dim() != 2:
        raise ValueError(f"rewards must have shape (B, K), got {tuple(rewards.shape)}")
    if n_groups <= 0:
        raise ValueError(f"n_groups must be > 0 (the number of groups over every rank), got {n_groups}")
    if norm not in NORMALIZATIONS:
        raise ValueError(f"norm must be one of {NORMALIZATIONS}, got {norm!r}")
    if singleton not in SINGLETON_POLICIES:
        raise ValueError(f"singleton must be one of {SINGLETON_POLICIES}, got {singleton!r}")
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite value > 0, got {eps}")

    # The local steps run on host copies (see the module docstring).
    r = rewards.detach().cpu()
    ids = None if group_ids is None else group_ids.cpu()
    layout = dict(group_size=group_size, group_ids=ids, n_groups=n_groups, first_row=first_row)
    K = r.shape[1]
    size = (n_groups + 1) * K
    device = _comm_device(group, rewards)

    # Round 1, two all-reduces: [count, sum, error flag] SUM (counts as doubles: exact below
    # 2^53) and [min, -max] MIN (max = -min(-x)), as in the C++ adapter.
    sums = torch.zeros(2 * size + 1, dtype=torch.float64)
    extremes = torch.full((2 * size,), math.inf, dtype=torch.float64)
    error = None
    try:
        p = group_partials(r, **layout)
        sums[:size] = p.count.flatten()
        sums[size:2 * size] = p.sum.flatten()
        extremes[:size] = p.min.flatten()
        extremes[size:] = -p.max.flatten()
    except RuntimeError as e:  # this rank's input was rejected: tell the others instead of raising now
        error = str(e)
        sums.zero_()
        sums[2 * size] = 1
        extremes.fill_(math.inf)
    sums = _all_reduce(sums.to(device), dist.ReduceOp.SUM, group).cpu()
    extremes = _all_reduce(extremes.to(device), dist.ReduceOp.MIN, group).cpu()
    _raise_if_failed(float(sums[2 * size]), error, "group_advantages")
    count = sums[:size].to(torch.int64).view(n_groups + 1, K)
    total = sums[size:2 * size].view(n_groups + 1, K)
    lo = extremes[:size].view(n_groups + 1, K)
    hi = -extremes[size:].view(n_groups + 1, K)

    # Round 2.
    sq_dev = group_deviations(r, **layout, count=count, sum=total)
    sq_dev = _all_reduce(sq_dev.to(device), dist.ReduceOp.SUM, group).cpu()

    # Finish, and advantage_std over every rank.
    out = finalize_group_advantages(r, **layout, count=count, sum=total, min=lo, max=hi, sq_dev=sq_dev, norm=norm,
                                    unbiased_std=unbiased_std, eps=eps, singleton=singleton)
    a_sums = _all_reduce(out.advantage_sums.to(device), dist.ReduceOp.SUM, group).cpu()
    stats = finish_advantage_std(out.stats, a_sums)
    return AdvantageResult(out.adv.to(rewards.device), stats)


def outcome_advantages(rewards: torch.Tensor, group_size: int = 0, group_ids: Optional[torch.Tensor] = None,
                       n_groups: int = 0, **kwargs) -> AdvantageResult:
    """Outcome mode (K = 1): rewards (B_local) -> adv (B_local), stats (6, 1). Arguments as
    :func:`group_advantages`."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must have shape (B), got {tuple(rewards.shape)}")
    res = group_advantages(rewards.unsqueeze(1), group_size, group_ids, n_groups, **kwargs)
    return AdvantageResult(res.adv.squeeze(1), res.stats)


def loss_counts(mask: torch.Tensor, step: Optional[torch.Tensor] = None, *, group=None,
                loss_inputs: Optional[dict] = None) -> Dict[str, int]:
    """The loss counts of every rank added up (one all-reduce): ``tokens`` (masked tokens),
    ``sequences`` (rows with a masked token), ``steps`` ((row, step) pairs with a masked token)
    and ``rows``. With ``loss_inputs`` (the keyword arguments of :func:`sapo_torch.policy_loss`
    including ``nonfinite="mask"``) the local counts come from a forward pass of the loss, which
    alone knows which tokens it drops."""
    error = None
    local = torch.zeros(4, dtype=torch.int64)
    try:
        if loss_inputs is not None and loss_inputs.get("nonfinite", "error") == "mask":
            d = _policy_loss_forward(**loss_inputs).diagnostics
            local = torch.tensor([int(d[9]), int(d[10]), int(d[11]), mask.shape[0]], dtype=torch.int64)
        else:
            local = _local_loss_counts(mask.cpu(), None if step is None else step.cpu())
    except RuntimeError as e:  # this rank's input was rejected: tell the others instead of raising now
        error = str(e)
    buf = torch.cat([local, torch.tensor([0 if error is None else 1])]).to(_comm_device(group, mask))
    _all_reduce(buf, dist.ReduceOp.SUM, group)
    _raise_if_failed(float(buf[4]), error, "loss_counts")
    tokens, sequences, steps, rows = (int(x) for x in buf[:4])
    return {"tokens": tokens, "sequences": sequences, "steps": steps, "rows": rows}


def loss_normalizers(mask: torch.Tensor, step: Optional[torch.Tensor] = None, *, agg: str = "token_mean",
                     group=None, loss_inputs: Optional[dict] = None) -> Dict[str, float]:
    """``global_tokens``, ``global_sequences``, ``global_steps`` for :func:`sapo_torch.policy_loss`
    from the all-reduced counts (``global_sequences`` is the number of rows for
    ``seq_mean_token_sum_norm``, which also needs the same ``max_response_length`` on every rank)."""
    c = loss_counts(mask, step, group=group, loss_inputs=loss_inputs)
    return {
        "global_tokens": float(c["tokens"]),
        "global_sequences": float(c["rows"] if agg == "seq_mean_token_sum_norm" else c["sequences"]),
        "global_steps": float(c["steps"]),
    }


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor,
                token_advantages: Optional[torch.Tensor] = None, step_advantages: Optional[torch.Tensor] = None,
                step: Optional[torch.Tensor] = None, ref_logp: Optional[torch.Tensor] = None, *, group=None,
                **options) -> LossOutput:
    """:func:`sapo_torch.policy_loss` of this rank's rows with the global normalizers (any
    ``global_*`` in ``options`` is replaced). The rank losses add up to the whole batch's loss,
    and ``loss.backward()`` gives this rank's rows of its gradient; the diagnostics are this
    rank's."""
    for name in ("global_tokens", "global_sequences", "global_steps"):
        options.pop(name, None)
    inputs = None
    if options.get("nonfinite", "error") == "mask":
        inputs = dict(logp=logp.detach(), old_logp=old_logp, mask=mask, token_advantages=token_advantages,
                      step_advantages=step_advantages, step=step, ref_logp=ref_logp, **options)
    norms = loss_normalizers(mask, step, agg=options.get("agg", "token_mean"), group=group, loss_inputs=inputs)
    return _policy_loss(logp, old_logp, mask, token_advantages, step_advantages, step, ref_logp, **options, **norms)
