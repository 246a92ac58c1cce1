"""Drop-ins for verl (https://github.com/volcengine/verl), with verl's argument names and return
values, computed by sapo's kernels.

* :func:`compute_step_aligned_advantage` - SAPO's per-step group advantages as verl-style
  ``(advantages, returns)`` token tensors, from step rewards (B, K) and verl's ``index`` (the
  ``uid`` of each response's prompt).
* :func:`compute_grpo_outcome_advantage` - the same signature and result as verl's GRPO
  estimator (``token_level_rewards`` summed per response).
* :func:`compute_policy_loss` - verl's clipped PPO loss (``core_algos.compute_policy_loss``:
  dual clip with ``clip_ratio_c`` always on, as in verl) returning
  ``(pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower)``; plus
  :func:`compute_policy_loss_vanilla`, the config-driven form of verl's policy-loss registry.

This module does not import verl; docs/guides/verl.md shows where the functions plug in.

``loss_agg_mode`` mapping (verl -> sapo ``agg``), following verl's current ``agg_loss``
(empty responses are left out of the sequence means; ``global_batch_size`` /
``batch_num_tokens`` / ``dp_size`` / ``loss_scale_factor`` as there):

=========================== ============================ =================================
verl                        sapo                         normalizer passed
=========================== ============================ =================================
``token-mean``              ``token_mean``               ``batch_num_tokens / dp_size``
``seq-mean-token-mean``     ``seq_mean_token_mean``      ``global_batch_size / dp_size``
``seq-mean-token-sum``      ``seq_mean_token_sum``       ``global_batch_size / dp_size``
``seq-mean-token-sum-norm`` ``seq_mean_token_sum_norm``  sequences as above, L =
                                                         ``loss_scale_factor`` or T
``step-mean`` (sapo only)   ``step_mean``                needs ``step_ids``
=========================== ============================ =================================

Not mapped: ``token-mean-unbiased`` and any other mode raise ``ValueError``; verl's per-token
``rollout_is_weights`` (importance-sampling corrections) have no sapo equivalent and raise too.
"""
from typing import Any, Optional, Tuple

import torch

from . import (
    broadcast_outcome_advantages,
    broadcast_step_advantages,
    group_advantages,
    mix_advantages,
    outcome_advantages,
    policy_loss,
)

__all__ = [
    "group_index_to_ids",
    "step_ids_from_think_end_positions",
    "compute_step_aligned_advantage",
    "compute_grpo_outcome_advantage",
    "compute_policy_loss",
    "compute_policy_loss_vanilla",
    "LOSS_AGG_MODES",
]

#: verl loss_agg_mode -> sapo aggregation
LOSS_AGG_MODES = {
    "token-mean": "token_mean",
    "seq-mean-token-mean": "seq_mean_token_mean",
    "seq-mean-token-sum": "seq_mean_token_sum",
    "seq-mean-token-sum-norm": "seq_mean_token_sum_norm",
    "step-mean": "step_mean",
}

_KL_LOSS_TYPES = {"kl": "k1", "k1": "k1", "mse": "k2", "k2": "k2", "low_var_kl": "k3", "k3": "k3"}


def group_index_to_ids(index) -> Tuple[torch.Tensor, int]:
    """verl's ``index`` (one prompt uid per response: a numpy array of strings, a list, or an
    integer tensor) -> dense int64 group ids 0..n-1 in order of first appearance, and n."""
    values = index.tolist() if hasattr(index, "tolist") else list(index)
    dense = {}
    ids = [dense.setdefault(v, len(dense)) for v in values]
    return torch.tensor(ids, dtype=torch.int64), len(dense)


def step_ids_from_think_end_positions(think_end_positions: torch.Tensor, response_length: int) -> torch.Tensor:
    """Per-token step ids (B, T) int32 from the position of the last token of each step.

    ``think_end_positions[i, k]`` is the 0-based index, within the response, of the token that
    closes step k (inclusive: the k-th ``</think>`` or SID token), or -1 when response i has
    no step k. Step k covers the tokens after the end of step k-1 up to and including
    ``think_end_positions[i, k]``; tokens after the last present step get -1 (no step).
    The present positions must come first and increase strictly.
    """
    pos = torch.as_tensor(think_end_positions)
    if pos.dim() != 2:
        raise ValueError(f"think_end_positions must have shape (B, K), got {tuple(pos.shape)}")
    pos = pos.to(torch.int64)
    T = int(response_length)
    present = pos >= 0
    n_present = present.sum(1)
    # Present positions first: a present entry after an absent one is an error.
    if bool((present[:, 1:] & ~present[:, :-1]).any()):
        raise ValueError("think_end_positions: the present positions (>= 0) must come before the absent ones (-1)")
    if bool((pos >= T).any()):
        raise ValueError(f"think_end_positions must lie in [0, T) = [0, {T}), got max {int(pos.max())}")
    both = present[:, 1:] & present[:, :-1]
    if bool((both & (pos[:, 1:] <= pos[:, :-1])).any()):
        raise ValueError("think_end_positions must increase strictly along each row")
    t = torch.arange(T, dtype=torch.int64).view(1, T, 1)
    closed_before = ((pos.unsqueeze(1) < t) & present.unsqueeze(1)).sum(-1)  # steps ended before t
    step = torch.where(closed_before < n_present.unsqueeze(1), closed_before, torch.full_like(closed_before, -1))
    return step.to(torch.int32)


def _cfg(config: Any, name: str, default):
    """config.name or config[name] (omegaconf DictConfig, dataclass or dict), else default."""
    if config is None:
        return default
    if hasattr(config, "get"):
        try:
            v = config.get(name, default)
            return default if v is None else v
        except TypeError:
            pass
    v = getattr(config, name, default)
    return default if v is None else v


def compute_step_aligned_advantage(
    step_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index,
    step_ids: Optional[torch.Tensor] = None,
    think_end_positions: Optional[torch.Tensor] = None,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool = True,
    config: Any = None,
    *,
    unbiased_std: bool = True,
    singleton: str = "raw",
    outcome_rewards: Optional[torch.Tensor] = None,
    outcome_weight: float = 1.0,
    step_weight: float = 1.0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """SAPO advantages in verl's shape: ``(advantages, returns)``, both (B, T).

    For every prompt group (``index``) and step k, ``A[i, k] = (r[i, k] - mean) / (std + epsilon)``
    over the group's responses whose step k is present (NaN in ``step_rewards`` = absent), or
    ``r - mean`` when ``norm_adv_by_std_in_grpo`` is False (Dr. GRPO), exactly like verl's GRPO
    estimator but per step; token t of response i then gets ``A[i, step_ids[i, t]]``.

    Args:
        step_rewards: (B, K) float rewards per step (e.g. :func:`sapo_torch.step_rewards`).
        response_mask: (B, T) 0/1.
        index: (B) prompt uid per response (verl's ``data.non_tensor_batch["uid"]``: any
            hashable values; mapped to dense group ids).
        step_ids: (B, T) integer step id per response token (-1 = no step), e.g.
            ``sapo_torch.segment_steps(...).step``; or
        think_end_positions: (B, K) position of the last token of each step (see
            :func:`step_ids_from_think_end_positions`).
        epsilon: added to the std (verl's ``epsilon``).
        norm_adv_by_std_in_grpo: divide by the std (``norm="std"``) or not (``norm="none"``).
            A ``config`` with ``norm_adv_by_std_in_grpo`` overrides it.
        unbiased_std: std divides by n - 1, as ``torch.std`` in verl.
        singleton: a group with one response at a step: ``"raw"`` (A = r, verl: mean 0, std 1;
            verl's own value is r / (1 + epsilon)) or ``"zero"`` (sapo's default).
        outcome_rewards: optional (B) outcome rewards for the mixed mode:
            ``A = outcome_weight * A_outcome + step_weight * A_step``.

    Zero-variance groups get A = 0 exactly (verl divides rounding noise by epsilon there).
    """
    if (step_ids is None) == (think_end_positions is None):
        raise ValueError("give exactly one of step_ids (B, T) and think_end_positions (B, K)")
    if step_ids is None:
        step_ids = step_ids_from_think_end_positions(think_end_positions, response_mask.shape[-1])
    norm_by_std = bool(_cfg(config, "norm_adv_by_std_in_grpo", norm_adv_by_std_in_grpo))
    norm = "std" if norm_by_std else "none"
    ids, n = group_index_to_ids(index)
    opts = dict(norm=norm, unbiased_std=unbiased_std, eps=float(epsilon), singleton=singleton)
    with torch.no_grad():
        a = group_advantages(step_rewards, group_ids=ids, n_groups=n, **opts).adv
        if outcome_rewards is not None:
            a_out = outcome_advantages(outcome_rewards.to(a.dtype), group_ids=ids, n_groups=n, **opts).adv
            a = mix_advantages(a_out, a, outcome_weight, step_weight)
        adv = broadcast_step_advantages(a, step_ids, response_mask)
    return adv, adv


def compute_grpo_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool = True,
    config: Any = None,
    *,
    singleton: str = "raw",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """verl's GRPO estimator on sapo's kernels: the score of a response is
    ``token_level_rewards.sum(-1)``; returns ``(advantages, returns)`` (B, T), equal tensors.
    With step rewards from ``kind="exact"`` this equals :func:`compute_step_aligned_advantage`
    (the SAPO = GRPO identity)."""
    norm_by_std = bool(_cfg(config, "norm_adv_by_std_in_grpo", norm_adv_by_std_in_grpo))
    ids, n = group_index_to_ids(index)
    with torch.no_grad():
        scores = token_level_rewards.sum(dim=-1)
        a = outcome_advantages(scores, group_ids=ids, n_groups=n, norm="std" if norm_by_std else "none",
                               eps=float(epsilon), singleton=singleton).adv
        adv = broadcast_outcome_advantages(a, response_mask)
    return adv, adv


def _agg_options(loss_agg_mode: str, response_mask: torch.Tensor, dp_size: int, batch_num_tokens,
                 global_batch_size, loss_scale_factor) -> dict:
    try:
        agg = LOSS_AGG_MODES[loss_agg_mode]
    except KeyError:
        raise ValueError(f"loss_agg_mode must be one of {sorted(LOSS_AGG_MODES)}, got {loss_agg_mode!r} "
                         "(sapo has no equivalent of the others)") from None
    opts = {"agg": agg}
    dp = float(dp_size)
    if agg == "token_mean" and batch_num_tokens is not None:
        opts["global_tokens"] = float(batch_num_tokens) / dp
    if agg.startswith("seq_mean"):
        if global_batch_size is not None:
            opts["global_sequences"] = float(global_batch_size) / dp
        elif agg == "seq_mean_token_sum_norm":
            # verl divides by the responses with at least one token; sapo's default for this
            # mode would be all B rows.
            opts["global_sequences"] = float((response_mask.sum(-1) > 0).sum())
        if agg == "seq_mean_token_sum_norm" and loss_scale_factor is not None:
            opts["max_response_length"] = float(loss_scale_factor)
    return opts


def compute_policy_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    cliprange: Optional[float] = 0.2,
    cliprange_low: Optional[float] = None,
    cliprange_high: Optional[float] = None,
    clip_ratio_c: float = 3.0,
    loss_agg_mode: str = "token-mean",
    *,
    step_ids: Optional[torch.Tensor] = None,
    ratio: str = "token",
    ref_log_prob: Optional[torch.Tensor] = None,
    kl_loss_coef: float = 0.0,
    kl_loss_type: str = "low_var_kl",
    dp_size: int = 1,
    batch_num_tokens: Optional[float] = None,
    global_batch_size: Optional[float] = None,
    loss_scale_factor: Optional[float] = None,
    num_threads: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """verl's ``compute_policy_loss`` (same positional arguments) on sapo's fused kernel.

    Returns ``(pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower)``: ``pg_loss`` takes part in
    autograd (gradient for ``log_prob``); the others are 0-dim float64 tensors without grad:
    the fraction of tokens where the clipped branch wins (sapo's clip_frac_low +
    clip_frac_high), the mean of ``old_log_prob - log_prob`` (clamped to +-20), and the
    fraction where the dual clip ``-A * clip_ratio_c`` wins (A < 0).

    Extensions (keyword-only): ``ratio="step"``/``"sequence"`` with ``step_ids`` (B, T) for the
    step / GSPO ratios; ``loss_agg_mode="step-mean"``; a KL penalty to ``ref_log_prob``
    folded into ``pg_loss`` (``kl_loss_type`` ``"low_var_kl"`` = k3, ``"kl"`` = k1, ``"mse"`` = k2;
    do not add verl's separate kl_loss on top then); verl's global normalizers.
    """
    low = cliprange if cliprange_low is None else cliprange_low
    high = cliprange if cliprange_high is None else cliprange_high
    if low is None or high is None:
        raise ValueError("give cliprange, or both cliprange_low and cliprange_high")
    opts = _agg_options(loss_agg_mode, response_mask, dp_size, batch_num_tokens, global_batch_size,
                        loss_scale_factor)
    kl = {}
    if kl_loss_coef:
        if kl_loss_type not in _KL_LOSS_TYPES:
            raise ValueError(f"kl_loss_type must be one of {sorted(_KL_LOSS_TYPES)}, got {kl_loss_type!r}")
        kl = dict(kl_coef=float(kl_loss_coef), kl=_KL_LOSS_TYPES[kl_loss_type])
    out = policy_loss(
        log_prob, old_log_prob, response_mask, advantages, None, step_ids,
        ref_log_prob if kl_loss_coef else None,
        ratio=ratio, clip_low=float(low), clip_high=float(high), dual_clip=True, dual_clip_c=float(clip_ratio_c),
        num_threads=num_threads, **opts, **kl,
    )
    d = out.diagnostics  # loss, clip_frac_low, clip_frac_high, clip_frac_dual, ..., approx_kl_old (6)
    return out.loss, d[1] + d[2], d[6], d[3]


def compute_policy_loss_vanilla(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_log_probs: Optional[torch.Tensor] = None,
    rollout_is_weights: Optional[torch.Tensor] = None,
    *,
    step_ids: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The policy-loss-registry form (``@register_policy_loss``): clip settings from ``config``
    (``clip_ratio``, ``clip_ratio_low``, ``clip_ratio_high``, ``clip_ratio_c``; sapo extras
    ``sapo_ratio`` = ``"token"``/``"step"``/``"sequence"``), and, when the config has it,
    verl's ``global_batch_info`` (``dp_size``, ``batch_num_tokens``, ``global_batch_size``,
    ``loss_scale_factor``). Returns the 4-tuple of :func:`compute_policy_loss`."""
    if rollout_is_weights is not None:
        raise ValueError("rollout_is_weights (per-token importance weights) are not supported by sapo's loss")
    clip = _cfg(config, "clip_ratio", 0.2)
    info = _cfg(config, "global_batch_info", None) or {}
    get = info.get if hasattr(info, "get") else (lambda k, d=None: getattr(info, k, d))
    return compute_policy_loss(
        old_log_prob, log_prob, advantages, response_mask,
        cliprange=clip,
        cliprange_low=_cfg(config, "clip_ratio_low", clip),
        cliprange_high=_cfg(config, "clip_ratio_high", clip),
        clip_ratio_c=_cfg(config, "clip_ratio_c", 3.0),
        loss_agg_mode=loss_agg_mode,
        step_ids=step_ids,
        ratio=_cfg(config, "sapo_ratio", "token"),
        dp_size=get("dp_size", 1) or 1,
        batch_num_tokens=get("batch_num_tokens", None),
        global_batch_size=get("global_batch_size", None),
        loss_scale_factor=get("loss_scale_factor", None),
    )
