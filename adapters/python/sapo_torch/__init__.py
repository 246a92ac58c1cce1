"""sapo_torch: step-aligned policy optimization (SAPO) for PyTorch.

Every function here is a thin keyword-argument wrapper around one operator ``torch.ops.sapo.*``
(registered by the compiled module ``sapo_torch._C``, which is built from the same
``adapters/torch/register_ops.cpp`` as the C++ library ``libsapo_torch.so``), so Python and C++
run the same kernels. Defaults are those of the C++ option structs (``sapo::loss_options``,
``sapo::advantage_options``, ...), and every option that is an enumeration in C++ is a string
spelled like the enumerator (``ratio="step"``, ``agg="step_mean"``, ``norm="std_floor"``).

The pipeline::

    seg = sapo_torch.segment_steps(tokens, mask, num_steps=3, sid_ranges=[(1000, 1256), (1256, 1512), (1512, 1768)])
    rewards = sapo_torch.step_rewards(seg.codes, seg.malformed, targets)            # (B, K), prefix rewards
    adv = sapo_torch.group_advantages(rewards, group_size=8)                         # adv.adv (B, K)
    out = sapo_torch.policy_loss(logp, old_logp, mask, step_advantages=adv.adv, step=seg.step)
    out.loss.backward()                                                               # logp.grad = d loss / d logp
    out.as_dict()["clip_frac_high"]

Errors are ``RuntimeError`` (torch's ``c10::Error``) whose message names the argument and the
expected and actual shape, dtype or value. Tensors must be dense CPU tensors (CUDA tensors
get an error unless the library was built with CUDA kernels).

Drop-ins for trainers: :mod:`sapo_torch.verl` (verl's advantage / policy-loss functions) and
:mod:`sapo_torch.trl` (a GRPOTrainer subclass factory).

Do not also load ``libsapo_torch.so`` with ``torch.ops.load_library`` in a process that imports
this package *first*: both contain the one ``TORCH_LIBRARY(sapo)`` registration, and PyTorch
refuses a second one. (The other order is handled: if the ops are already registered when
this package is imported, it uses them and does not load ``_C``; setting the environment
variable ``SAPO_TORCH_LIBRARY`` to the path of ``libsapo_torch.so`` makes the package load that
library, e.g. a build with CUDA kernels, instead of its own CPU-only ``_C``.)
"""
import os
from typing import Dict, NamedTuple, Optional, Sequence, Tuple

import torch

__version__ = "0.1.0"


def _ops_registered() -> bool:
    try:
        torch.ops.sapo.loss_diagnostic_names  # resolves sapo::loss_diagnostic_names or raises
        return True
    except (RuntimeError, AttributeError):
        return False


# SAPO_TORCH_LIBRARY=/path/to/libsapo_torch.so: use the CMake-built library (e.g. one with CUDA
# kernels) instead of the bundled CPU-only _C.
if os.environ.get("SAPO_TORCH_LIBRARY") and not _ops_registered():
    torch.ops.load_library(os.environ["SAPO_TORCH_LIBRARY"])

# Importing _C runs the static TORCH_LIBRARY(sapo) initializers. A second registration of the
# namespace aborts the process, so only import it when nobody registered the ops before us
# (e.g. a C++ extension or torch.ops.load_library("libsapo_torch.so") in the same process).
if not _ops_registered():
    try:
        from . import _C  # noqa: F401  (imported for its side effect)
    except ImportError as e:
        raise ImportError(
            f"sapo_torch._C (the compiled operators) could not be imported from {os.path.dirname(__file__)}: {e}. "
            "Build the package (cmake --build <build> --target sapo_python, or adapters/python/setup.py build) "
            "and put <build>/python on PYTHONPATH ahead of the source tree adapters/python"
        ) from e

_ops = torch.ops.sapo

#: Names of the 13 entries of the float64 diagnostics tensor of :func:`policy_loss`, in order.
LOSS_DIAGNOSTIC_NAMES: Tuple[str, ...] = tuple(_ops.loss_diagnostic_names())
#: Names of the 6 rows of the (6, K) float64 statistics tensor of the advantage functions.
ADVANTAGE_STAT_NAMES: Tuple[str, ...] = tuple(_ops.advantage_stat_names())

#: Names of the 4 entries of the int64 tensor of :func:`loss_counts`, in order.
LOSS_COUNT_NAMES: Tuple[str, ...] = ("tokens", "sequences", "steps", "rows")

# Allowed values of the string options (the C++ enumerators), for documentation and checks
# in the drop-ins. The kernels validate them too and name the allowed values on error.
RATIO_LEVELS = ("token", "step", "sequence")
KL_ESTIMATORS = ("k1", "k2", "k3")
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm", "step_mean")
NORMALIZATIONS = ("std", "std_floor", "none", "loo", "batch_std")
SINGLETON_POLICIES = ("zero", "raw")
REWARD_KINDS = ("per_level", "prefix", "weighted_prefix", "exact")
LAYOUTS = ("interleaved", "think_then_sid")
TAIL_POLICIES = ("no_step", "last_step")
NONFINITE_POLICIES = ("error", "mask")

__all__ = [
    "dispatch_isa",
    "segment_steps",
    "step_rewards",
    "group_advantages",
    "outcome_advantages",
    "mix_advantages",
    "broadcast_step_advantages",
    "broadcast_outcome_advantages",
    "group_partials",
    "group_deviations",
    "finalize_group_advantages",
    "finish_advantage_std",
    "loss_counts",
    "policy_loss",
    "policy_loss_forward",
    "diagnostics_dict",
    "advantage_stats_dict",
    "SegmentResult",
    "AdvantageResult",
    "LossOutput",
    "LossForwardOutput",
    "GroupPartials",
    "FinalizedAdvantages",
    "LOSS_DIAGNOSTIC_NAMES",
    "LOSS_COUNT_NAMES",
    "ADVANTAGE_STAT_NAMES",
]


def diagnostics_dict(diagnostics: torch.Tensor) -> Dict[str, float]:
    """The (13) diagnostics tensor of :func:`policy_loss` as ``{name: float}``.

    Keys, in order: ``loss`` (in double), ``clip_frac_low``, ``clip_frac_high``,
    ``clip_frac_dual``, ``ratio_mean``, ``ratio_max``, ``approx_kl_old`` (mean of -delta),
    ``approx_kl_old_k3``, ``kl_ref`` (mean KL estimator to the reference, without beta),
    ``n_tokens``, ``n_sequences``, ``n_steps``, ``n_nonfinite_masked`` (counts as floats).
    """
    return dict(zip(LOSS_DIAGNOSTIC_NAMES, diagnostics.tolist()))


def advantage_stats_dict(stats: torch.Tensor) -> Dict[str, list]:
    """The (6, K) statistics tensor of the advantage functions as ``{name: [K floats]}``:
    ``mean_reward``, ``zero_variance_fraction``, ``advantage_std``, ``n_present``,
    ``n_zero_variance``, ``n_pairs`` (per step k)."""
    return dict(zip(ADVANTAGE_STAT_NAMES, stats.tolist()))


class SegmentResult(NamedTuple):
    """Output of :func:`segment_steps`."""

    step: torch.Tensor  #: (B, T) int32, step id per token in -1 .. K-1 (-1: no step, masked, tail)
    n_steps: torch.Tensor  #: (B) int32, number of closed steps
    codes: torch.Tensor  #: (B, K) int64, generated SID code per level, -1 where not found
    malformed: torch.Tensor  #: (B) bool


class AdvantageResult(NamedTuple):
    """Output of :func:`group_advantages` / :func:`outcome_advantages`."""

    adv: torch.Tensor  #: (B, K), or (B) in outcome mode, in the rewards' dtype
    stats: torch.Tensor  #: (6, K) or (6, 1) float64, rows in ADVANTAGE_STAT_NAMES order

    def statistics(self) -> Dict[str, list]:
        """``stats`` as ``{name: [value per step]}``."""
        return advantage_stats_dict(self.stats)


class GroupPartials(NamedTuple):
    """Output of :func:`group_partials`: round 1 of the distributed advantages. Each field is
    (n_groups + 1, K): row g < n_groups is group g, the last row the whole batch."""

    count: torch.Tensor  #: int64, present (non-NaN) rewards; all-reduce with SUM
    sum: torch.Tensor  #: float64, sum of the present rewards; SUM
    min: torch.Tensor  #: float64, smallest present reward (+inf if none); MIN
    max: torch.Tensor  #: float64, largest present reward (-inf if none); MAX


class FinalizedAdvantages(NamedTuple):
    """Output of :func:`finalize_group_advantages`."""

    adv: torch.Tensor  #: (B, K) advantages of the local rows, in the rewards' dtype
    #: (6, K) float64 statistics of the whole batch, ADVANTAGE_STAT_NAMES order; advantage_std
    #: (row 2) covers the local rows only until :func:`finish_advantage_std`
    stats: torch.Tensor
    advantage_sums: torch.Tensor  #: (2, K) float64: sum of A and of A^2 over the present local rows; SUM


class LossOutput(NamedTuple):
    """Output of :func:`policy_loss`."""

    loss: torch.Tensor  #: () in logp's dtype, differentiable with respect to logp
    diagnostics: torch.Tensor  #: (13) float64, LOSS_DIAGNOSTIC_NAMES order; not differentiable

    def as_dict(self) -> Dict[str, float]:
        """The diagnostics as ``{name: float}`` (see :func:`diagnostics_dict`)."""
        return diagnostics_dict(self.diagnostics)


class LossForwardOutput(NamedTuple):
    """Output of :func:`policy_loss_forward` (no autograd)."""

    loss: torch.Tensor  #: () in logp's dtype
    grad: torch.Tensor  #: (B, T) d loss / d logp in logp's dtype (0 where mask = 0)
    diagnostics: torch.Tensor  #: (13) float64

    def as_dict(self) -> Dict[str, float]:
        return diagnostics_dict(self.diagnostics)


def _flat_ranges(sid_ranges) -> list:
    """[(lo, hi), ...] or [lo, hi, lo, hi, ...] -> flat list of ints."""
    flat = []
    for r in sid_ranges:
        if isinstance(r, (tuple, list)):
            if len(r) != 2:
                raise ValueError(f"sid_ranges must hold (lo, hi) pairs, got an entry of length {len(r)}: {r!r}")
            flat.extend(int(x) for x in r)
        else:
            flat.append(int(r))
    return flat


def segment_steps(
    tokens: torch.Tensor,
    mask: torch.Tensor,
    num_steps: int,
    sid_ranges: Sequence,
    *,
    layout: str = "interleaved",
    codes_per_level: Sequence[int] = (),
    think_end_id: int = -1,
    sid_token_in_step: bool = True,
    tail: str = "no_step",
    num_threads: int = 0,
) -> SegmentResult:
    """Splits each response into K reasoning steps (SPEC §1).

    Args:
        tokens: (B, T) integer token ids of the responses (prompt and padding are masked out).
        mask: (B, T) 0/1, 1 on response tokens (bool, integer or floating dtype).
        num_steps: K, the number of steps (= SID levels), 1..64.
        sid_ranges: the SID token ids: one half-open range ``(lo, hi)`` shared by all levels,
            or K ranges, one per level. Pairs or a flat ``[lo0, hi0, lo1, hi1, ...]`` list.
        layout: ``"interleaved"`` (think_1 a_1 think_2 a_2 ...) or ``"think_then_sid"``
            (<think>..</think> x K, then a_1 .. a_K).
        codes_per_level: optional catalogue size per level; a larger code is malformed.
        think_end_id: the token that closes a thinking block (``think_then_sid`` only).
        sid_token_in_step: ``think_then_sid``: whether a_k belongs to step k (else step -1).
        tail: tokens after the K-th step get ``"no_step"`` (-1) or ``"last_step"`` (K-1).
        num_threads: worker threads; 0 = torch's intra-op thread count.

    Returns:
        SegmentResult(step (B, T) int32, n_steps (B) int32, codes (B, K) int64, malformed (B) bool).
    """
    step, n_steps, codes, malformed = _ops.segment_steps(
        tokens,
        mask,
        int(num_steps),
        _flat_ranges(sid_ranges),
        layout=layout,
        codes_per_level=[int(c) for c in codes_per_level],
        think_end_id=int(think_end_id),
        sid_token_in_step=bool(sid_token_in_step),
        tail=tail,
        num_threads=int(num_threads),
    )
    return SegmentResult(step, n_steps, codes, malformed)


def step_rewards(
    codes: torch.Tensor,
    malformed: torch.Tensor,
    targets: torch.Tensor,
    *,
    kind: str = "prefix",
    level_weights: Sequence[float] = (),
    malformed_reward: float = 0.0,
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Step rewards r[i, k] from the generated SID codes and the targets (SPEC §2).

    Args:
        codes: (B, K) integer generated codes (from :func:`segment_steps`).
        malformed: (B) bool / 0-1 integer flags.
        targets: (B, K) integer target codes, the prompt's target repeated for every response.
        kind: ``"per_level"``, ``"prefix"`` (default), ``"weighted_prefix"`` or ``"exact"``.
        level_weights: K weights for ``"weighted_prefix"``.
        malformed_reward: the reward of every step of a malformed response.
        dtype: float dtype of the result (default float32).

    Returns:
        rewards (B, K).
    """
    return _ops.step_rewards(
        codes,
        malformed,
        targets,
        kind=kind,
        level_weights=[float(w) for w in level_weights],
        malformed_reward=float(malformed_reward),
        dtype=dtype,
    )


def _group_args(group_size: int, group_ids: Optional[torch.Tensor], n_groups: int):
    if group_ids is not None and n_groups == 0 and group_ids.numel() > 0:
        # Convenience: dense ids 0..n-1 are the common case, so count them when not given.
        n_groups = int(group_ids.max()) + 1
    return int(group_size), group_ids, int(n_groups)


def group_advantages(
    rewards: torch.Tensor,
    group_size: int = 0,
    group_ids: Optional[torch.Tensor] = None,
    n_groups: int = 0,
    *,
    norm: str = "std",
    unbiased_std: bool = True,
    eps: float = 1e-6,
    singleton: str = "zero",
) -> AdvantageResult:
    """Group-relative advantage per step (SPEC §3).

    Args:
        rewards: (B, K) step rewards; NaN marks an absent step (left out of the statistics,
            A = 0).
        group_size: G > 0 for contiguous groups (responses i*G .. i*G+G-1 answer one prompt).
        group_ids: or (B) integer group ids in [0, n_groups), any order, unequal sizes.
        n_groups: the number of groups with ``group_ids``; 0 = ``group_ids.max() + 1``.
        norm: ``"std"`` (r - mean) / (std + eps), ``"std_floor"`` / max(std, eps), ``"none"``
            (Dr. GRPO), ``"loo"`` (RLOO) or ``"batch_std"``.
        unbiased_std: std divides by n - 1 (else by n).
        eps: epsilon of the normalization (> 0).
        singleton: a group of one at a step gets ``"zero"`` (A = 0) or ``"raw"`` (A = r, verl).

    Returns:
        AdvantageResult(adv (B, K), stats (6, K) float64).
    """
    g, ids, n = _group_args(group_size, group_ids, n_groups)
    adv, stats = _ops.group_advantages(
        rewards, g, ids, n, norm=norm, unbiased_std=bool(unbiased_std), eps=float(eps), singleton=singleton
    )
    return AdvantageResult(adv, stats)


def outcome_advantages(
    rewards: torch.Tensor,
    group_size: int = 0,
    group_ids: Optional[torch.Tensor] = None,
    n_groups: int = 0,
    *,
    norm: str = "std",
    unbiased_std: bool = True,
    eps: float = 1e-6,
    singleton: str = "zero",
) -> AdvantageResult:
    """Outcome mode (GRPO family): one reward per response, rewards (B) -> adv (B), stats (6, 1).
    The arguments are those of :func:`group_advantages`."""
    g, ids, n = _group_args(group_size, group_ids, n_groups)
    adv, stats = _ops.outcome_advantages(
        rewards, g, ids, n, norm=norm, unbiased_std=bool(unbiased_std), eps=float(eps), singleton=singleton
    )
    return AdvantageResult(adv, stats)


def mix_advantages(
    outcome_adv: torch.Tensor, step_adv: torch.Tensor, outcome_weight: float = 1.0, step_weight: float = 1.0
) -> torch.Tensor:
    """Mixed mode: ``outcome_weight * outcome_adv[i] + step_weight * step_adv[i, k]`` -> (B, K)."""
    return _ops.mix_advantages(outcome_adv, step_adv, float(outcome_weight), float(step_weight))


def broadcast_step_advantages(adv: torch.Tensor, step: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token advantages ``adv[i, step[i, t]]`` (0 where mask = 0 or step = -1): (B, K) -> (B, T)."""
    return _ops.broadcast_step_advantages(adv, step, mask)


def broadcast_outcome_advantages(adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token advantages ``adv[i]`` on every masked token (0 elsewhere): (B) -> (B, T)."""
    return _ops.broadcast_outcome_advantages(adv, mask)


# ---------------------------------------------------------------------------------------
# The phases of group_advantages for data-parallel ranks (docs/distributed.md); the
# all-reduces between them are the caller's (sapo_torch.distributed does them with
# torch.distributed). The layout arguments are those of group_advantages with *global* group
# ids: n_groups is the number of groups over every rank (required, > 0), and with group_size
# the local rows are the global rows [first_row, first_row + B).
# ---------------------------------------------------------------------------------------


def group_partials(
    rewards: torch.Tensor,
    group_size: int = 0,
    group_ids: Optional[torch.Tensor] = None,
    n_groups: int = 0,
    *,
    first_row: int = 0,
) -> GroupPartials:
    """Round 1: count, sum, min and max of this rank's present rewards per (group, step) and
    for the whole batch.

    Args:
        rewards: (B, K) step rewards of this rank's rows (B may be 0); NaN = absent step.
        group_size: G > 0 for contiguous groups over the global batch, or
        group_ids: (B) global group ids in [0, n_groups), any order.
        n_groups: the number of groups over every rank (> 0).
        first_row: with ``group_size``: the global index of this rank's first row.

    Returns:
        GroupPartials(count int64, sum, min, max float64), each (n_groups + 1, K), on the
        rewards' device. All-reduce count and sum with SUM, min with MIN, max with MAX.
    """
    count, total, lo, hi = _ops.group_partials(rewards, int(group_size), group_ids, int(n_groups),
                                               first_row=int(first_row))
    return GroupPartials(count, total, lo, hi)


def group_deviations(
    rewards: torch.Tensor,
    group_size: int = 0,
    group_ids: Optional[torch.Tensor] = None,
    n_groups: int = 0,
    *,
    count: torch.Tensor,
    sum: torch.Tensor,  # noqa: A002  (the name of the op argument)
    first_row: int = 0,
) -> torch.Tensor:
    """Round 2: this rank's sums of squared deviations from the global means, (n_groups + 1, K)
    float64; all-reduce with SUM.

    Args:
        rewards, group_size, group_ids, n_groups, first_row: as :func:`group_partials`.
        count: (n_groups + 1, K) integer, the all-reduced ``count`` of round 1.
        sum: (n_groups + 1, K) floating, the all-reduced ``sum`` of round 1.
    """
    return _ops.group_deviations(rewards, int(group_size), group_ids, int(n_groups), count=count, sum=sum,
                                 first_row=int(first_row))


def finalize_group_advantages(
    rewards: torch.Tensor,
    group_size: int = 0,
    group_ids: Optional[torch.Tensor] = None,
    n_groups: int = 0,
    *,
    count: torch.Tensor,
    sum: torch.Tensor,  # noqa: A002
    min: torch.Tensor,  # noqa: A002
    max: torch.Tensor,  # noqa: A002
    sq_dev: torch.Tensor,
    first_row: int = 0,
    norm: str = "std",
    unbiased_std: bool = True,
    eps: float = 1e-6,
    singleton: str = "zero",
) -> FinalizedAdvantages:
    """Finish: the advantages of this rank's rows from the fully reduced arrays (SPEC §3).

    Args:
        rewards, group_size, group_ids, n_groups, first_row: as :func:`group_partials`.
        count, sum, min, max: the all-reduced arrays of round 1; sq_dev: of round 2.
        norm, unbiased_std, eps, singleton: as :func:`group_advantages`.

    Returns:
        FinalizedAdvantages(adv (B, K) in the rewards' dtype, stats (6, K) float64 of the whole
        batch, advantage_sums (2, K) float64). ``stats`` is the same on every rank except
        advantage_std, which covers the local rows: all-reduce ``advantage_sums`` with SUM and
        pass it to :func:`finish_advantage_std`.
    """
    adv, stats, sums = _ops.finalize_group_advantages(
        rewards, int(group_size), group_ids, int(n_groups), count=count, sum=sum, min=min, max=max, sq_dev=sq_dev,
        first_row=int(first_row), norm=norm, unbiased_std=bool(unbiased_std), eps=float(eps), singleton=singleton)
    return FinalizedAdvantages(adv, stats, sums)


def finish_advantage_std(stats: torch.Tensor, advantage_sums: torch.Tensor) -> torch.Tensor:
    """``stats`` (6, K) with advantage_std recomputed from the all-reduced ``advantage_sums``
    (2, K) of :func:`finalize_group_advantages` (the population std of A over the n_present
    responses); a new tensor, the other rows unchanged."""
    return _ops.finish_advantage_std(stats, advantage_sums)


def dispatch_isa() -> str:
    """The instruction set the CPU kernels run with: ``"avx512"``, ``"avx2"`` or ``"sse2"`` on
    x86-64, the best this CPU runs, chosen once at the first call (``"native"`` elsewhere). The
    environment variable ``SAPO_ISA`` forces a lower one; naming one the CPU lacks is an error
    at the first kernel call."""
    return _ops.dispatch_isa()


def loss_counts(mask: torch.Tensor, step: Optional[torch.Tensor] = None) -> torch.Tensor:
    """This rank's counts behind the loss normalizers, a (4) int64 tensor in
    ``LOSS_COUNT_NAMES`` order: ``tokens`` (masked tokens), ``sequences`` (rows with a masked
    token), ``steps`` ((row, step) pairs with a masked token; 0 without ``step``) and ``rows``.
    All-reduce with SUM; :mod:`sapo_torch.distributed` turns the result into the ``global_*``
    arguments of :func:`policy_loss`.

    Args:
        mask: (B, T) 0/1.
        step: (B, T) integer step ids in -1 .. 63 on masked tokens, or None.
    """
    return _ops.loss_counts(mask, step)


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    mask: torch.Tensor,
    token_advantages: Optional[torch.Tensor] = None,
    step_advantages: Optional[torch.Tensor] = None,
    step: Optional[torch.Tensor] = None,
    ref_logp: Optional[torch.Tensor] = None,
    *,
    ratio: str = "token",
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: bool = False,
    dual_clip_c: float = 3.0,
    kl_coef: float = 0.0,
    kl: str = "k3",
    agg: str = "token_mean",
    max_response_length: float = 0.0,
    global_tokens: float = 0.0,
    global_sequences: float = 0.0,
    global_steps: float = 0.0,
    nonfinite: str = "error",
    num_threads: int = 0,
) -> LossOutput:
    """The clipped policy loss with autograd (SPEC §4-6).

    ``loss.backward()`` (or ``torch.autograd.grad``) gives d loss / d logp; no other input gets
    a gradient. The forward pass computes the exact gradient along with the loss and the
    backward pass only scales it, so there is no double backward (the second derivative with
    respect to logp is taken as 0).

    Args:
        logp: (B, T) log-probabilities of the sampled tokens under the current policy.
        old_logp: (B, T) the same under the policy that sampled them.
        mask: (B, T) 0/1, 1 on response tokens.
        token_advantages: (B, T) per-token advantages, or
        step_advantages: (B, K) per-step advantages A[i, k] together with ``step``.
        step: (B, T) integer step ids (-1 .. K-1); needed by ``step_advantages``,
            ``ratio="step"`` and ``agg="step_mean"``.
        ref_logp: (B, T) reference policy, needed when ``kl_coef > 0``.
        ratio: importance ratio per ``"token"``, per ``"step"`` (geometric mean over the step,
            GSPO-token form) or per ``"sequence"`` (GSPO).
        clip_low, clip_high: the clip range [1 - clip_low, 1 + clip_high].
        dual_clip, dual_clip_c: for a < 0, cap the loss at -a * c (c > 1).
        kl_coef: beta of the KL penalty to the reference (0 = off).
        kl: the KL estimator ``"k1"``, ``"k2"`` or ``"k3"``.
        agg: ``"token_mean"``, ``"seq_mean_token_mean"``, ``"seq_mean_token_sum"``,
            ``"seq_mean_token_sum_norm"`` or ``"step_mean"``.
        max_response_length: L of ``seq_mean_token_sum_norm`` (0 = T).
        global_tokens, global_sequences, global_steps: normalizers that replace the local
            counts (0 = local), for data-parallel ranks that divide by global counts.
        nonfinite: ``"error"`` on NaN/Inf in a masked-in input, or ``"mask"`` them out.
        num_threads: worker threads; 0 = torch's intra-op thread count.

    Returns:
        LossOutput(loss () differentiable w.r.t. logp, diagnostics (13) float64);
        ``.as_dict()`` gives the diagnostics by name.
    """
    # Only the options that differ from the op's defaults travel as keywords: the dispatcher
    # parses every keyword argument, and on a small batch that parsing is a visible share of
    # the call (see bench_overhead.py).
    values = (ratio, clip_low, clip_high, dual_clip, dual_clip_c, kl_coef, kl, agg, max_response_length,
              global_tokens, global_sequences, global_steps, nonfinite, num_threads)
    kw = {name: v for (name, default), v in zip(_LOSS_DEFAULTS, values) if v != default}
    loss, diagnostics = _ops.policy_loss(logp, old_logp, mask, token_advantages, step_advantages, step, ref_logp,
                                         **kw)
    return LossOutput(loss, diagnostics)


# (name, default) of the keyword options of the loss ops, in policy_loss's order; the defaults
# are those of the op schemas (= sapo::loss_options).
_LOSS_DEFAULTS = (
    ("ratio", "token"),
    ("clip_low", 0.2),
    ("clip_high", 0.2),
    ("dual_clip", False),
    ("dual_clip_c", 3.0),
    ("kl_coef", 0.0),
    ("kl", "k3"),
    ("agg", "token_mean"),
    ("max_response_length", 0.0),
    ("global_tokens", 0.0),
    ("global_sequences", 0.0),
    ("global_steps", 0.0),
    ("nonfinite", "error"),
    ("num_threads", 0),
)


def policy_loss_forward(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    mask: torch.Tensor,
    token_advantages: Optional[torch.Tensor] = None,
    step_advantages: Optional[torch.Tensor] = None,
    step: Optional[torch.Tensor] = None,
    ref_logp: Optional[torch.Tensor] = None,
    **options,
) -> LossForwardOutput:
    """The fused kernel without autograd: loss, d loss / d logp (B, T) and the diagnostics.
    Takes the arguments of :func:`policy_loss`; for callers that chain the gradient themselves
    (``logp_tensor.backward(out.grad)``)."""
    loss, grad, diagnostics = _ops.policy_loss_fwd(
        logp, old_logp, mask, token_advantages, step_advantages, step, ref_logp, **options
    )
    return LossForwardOutput(loss, grad, diagnostics)
