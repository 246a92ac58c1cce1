"""SAPO in TRL's GRPOTrainer (https://github.com/huggingface/trl): a subclass factory.

``make_sapo_grpo_trainer(GRPOTrainer)`` returns a subclass that

1. after TRL generates and scores the completions (``_generate_and_score_completions``),
   segments each completion into K steps, computes step rewards against the target SID of its
   prompt (a dataset column) and SAPO's per-step group advantages (over the whole generation
   batch, gathered across processes like TRL's own advantages), and stores them in the inputs
   dict as ``"sapo_step"`` (B, C) and ``"sapo_step_advantages"`` (B, K);
2. replaces ``compute_loss`` (the transformers ``Trainer`` hook TRL implements) by
   :func:`sapo_torch.policy_loss` on TRL's per-token log-probabilities.

The factory takes the base class as an argument, so this module does not import TRL (and the
tests can run it against a stand-in). It follows the GRPOTrainer internals of TRL 0.17-0.19:
``_generate_and_score_completions(inputs)`` returning ``prompt_ids``, ``prompt_mask``,
``completion_ids``, ``completion_mask``, ``old_per_token_logps`` (None when
``num_iterations == 1``), ``ref_per_token_logps`` (None when ``beta == 0``);
``_get_per_token_logps(model, input_ids, attention_mask, logits_to_keep)`` (or
``_get_per_token_logps_and_entropies`` in later versions); attributes ``num_generations``,
``beta``, ``epsilon_low``, ``epsilon_high``, ``loss_type``, ``max_completion_length``,
``accelerator``, ``_metrics``. Other versions may need small changes in the two methods.

``loss_type`` mapping: ``"grpo"`` -> ``seq_mean_token_mean`` over all B rows (TRL clamps
empty rows' token count to 1), ``"bnpo"`` and ``"dapo"`` -> ``token_mean`` (TRL's dapo divides
by the tokens of the whole accumulated batch; pass ``sapo_global_tokens`` for that),
``"dr_grpo"`` -> ``seq_mean_token_sum_norm`` with L = ``max_completion_length``. Or set
``sapo_agg`` (e.g. ``"step_mean"``). TRL's KL term is k3 with ``beta``, as sapo's ``kl="k3"``.
"""
from typing import Any, Optional, Sequence

import torch

from . import group_advantages, policy_loss, segment_steps, step_rewards

__all__ = ["make_sapo_grpo_trainer", "LOSS_TYPES"]

#: TRL loss_type -> sapo aggregation
LOSS_TYPES = {"grpo": "seq_mean_token_mean", "bnpo": "token_mean", "dapo": "token_mean",
              "dr_grpo": "seq_mean_token_sum_norm"}


def make_sapo_grpo_trainer(base: Optional[type] = None) -> type:
    """Returns ``SAPOGRPOTrainer(base)``; ``base`` defaults to ``trl.GRPOTrainer``.

    Extra constructor keywords (all ``sapo_``-prefixed, the rest go to the base class):

    * ``sapo_num_steps`` (K), ``sapo_sid_ranges``: as :func:`sapo_torch.segment_steps`
      (required); ``sapo_layout``, ``sapo_think_end_id``, ``sapo_codes_per_level``.
    * ``sapo_target_key``: the dataset column with each prompt's target SID codes
      (K integers; default ``"target_sid"``).
    * ``sapo_reward_kind`` (default ``"prefix"``), ``sapo_level_weights``,
      ``sapo_malformed_reward``: as :func:`sapo_torch.step_rewards`.
    * ``sapo_norm`` (default ``"std"``; ``"none"`` when TRL's ``scale_rewards`` is False),
      ``sapo_singleton``: as :func:`sapo_torch.group_advantages`.
    * ``sapo_ratio`` (``"token"``, ``"step"``, ``"sequence"``), ``sapo_agg`` (default from
      ``loss_type``), ``sapo_dual_clip_c`` (None = off), ``sapo_global_tokens``.
    """
    if base is None:
        from trl import GRPOTrainer as base  # noqa: N813

    class SAPOGRPOTrainer(base):
        def __init__(self, *args, sapo_num_steps: int, sapo_sid_ranges: Sequence, sapo_layout: str = "interleaved",
                     sapo_think_end_id: int = -1, sapo_codes_per_level: Sequence[int] = (),
                     sapo_target_key: str = "target_sid", sapo_reward_kind: str = "prefix",
                     sapo_level_weights: Sequence[float] = (), sapo_malformed_reward: float = 0.0,
                     sapo_norm: Optional[str] = None, sapo_singleton: str = "zero", sapo_ratio: str = "token",
                     sapo_agg: Optional[str] = None, sapo_dual_clip_c: Optional[float] = None,
                     sapo_global_tokens: float = 0.0, **kwargs):
            super().__init__(*args, **kwargs)
            self.sapo_segment = dict(num_steps=sapo_num_steps, sid_ranges=sapo_sid_ranges, layout=sapo_layout,
                                     think_end_id=sapo_think_end_id, codes_per_level=sapo_codes_per_level)
            self.sapo_target_key = sapo_target_key
            self.sapo_rewards = dict(kind=sapo_reward_kind, level_weights=sapo_level_weights,
                                     malformed_reward=sapo_malformed_reward)
            if sapo_norm is None:
                sapo_norm = "std" if getattr(self, "scale_rewards", True) else "none"
            self.sapo_advantages = dict(norm=sapo_norm, singleton=sapo_singleton)
            self.sapo_ratio = sapo_ratio
            self.sapo_agg = sapo_agg
            self.sapo_dual_clip_c = sapo_dual_clip_c
            self.sapo_global_tokens = sapo_global_tokens

        # -- 1. step advantages, next to TRL's outcome advantages ---------------------------
        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            ids, mask = out["completion_ids"], out["completion_mask"]
            seg = segment_steps(ids.cpu(), mask.cpu(), **self.sapo_segment)
            targets = torch.tensor([list(x[self.sapo_target_key]) for x in inputs], dtype=torch.int64)
            r = step_rewards(seg.codes, seg.malformed, targets, **self.sapo_rewards)
            # A prompt's num_generations completions may sit on several processes: gather the
            # rewards of the whole generation batch, normalize per group, keep the local slice.
            acc = self.accelerator
            r_all = acc.gather(r.to(ids.device)).cpu()
            adv = group_advantages(r_all, group_size=self.num_generations, **self.sapo_advantages).adv
            n = len(inputs)
            local = slice(acc.process_index * n, (acc.process_index + 1) * n)
            out["sapo_step"] = seg.step.to(ids.device)
            out["sapo_step_advantages"] = adv[local].to(ids.device)
            self._sapo_log("sapo/malformed_frac", float(seg.malformed.float().mean()))
            return out

        # -- 2. the loss ---------------------------------------------------------------------
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if return_outputs:
                raise ValueError("the SAPO GRPOTrainer does not return outputs")
            prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
            completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
            input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
            attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
            logits_to_keep = completion_ids.size(1)
            if hasattr(self, "_get_per_token_logps_and_entropies"):
                logps, _ = self._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep)
            else:
                logps = self._get_per_token_logps(model, input_ids, attention_mask, logits_to_keep)
            old = inputs.get("old_per_token_logps")
            if old is None:  # num_iterations == 1: the sampling policy is the current one
                old = logps.detach()
            ref = inputs.get("ref_per_token_logps") if self.beta != 0.0 else None

            loss_type = getattr(self, "loss_type", "grpo")
            agg = self.sapo_agg or LOSS_TYPES.get(loss_type)
            if agg is None:
                raise ValueError(f"unknown TRL loss_type {loss_type!r}; set sapo_agg")
            norms = {}
            if agg == "seq_mean_token_mean" and self.sapo_agg is None:
                norms["global_sequences"] = float(completion_mask.size(0))  # TRL: mean over all rows
            if agg == "seq_mean_token_sum_norm":
                norms["max_response_length"] = float(self.max_completion_length)
            if agg == "token_mean" and self.sapo_global_tokens:
                norms["global_tokens"] = float(self.sapo_global_tokens)
            out = policy_loss(
                logps, old, completion_mask,
                step_advantages=inputs["sapo_step_advantages"], step=inputs["sapo_step"], ref_logp=ref,
                ratio=self.sapo_ratio, agg=agg,
                clip_low=self.epsilon_low, clip_high=self.epsilon_high,
                dual_clip=self.sapo_dual_clip_c is not None,
                dual_clip_c=self.sapo_dual_clip_c if self.sapo_dual_clip_c is not None else 3.0,
                kl_coef=float(self.beta), kl="k3", **norms,
            )
            d = out.as_dict()
            self._sapo_log("clip_ratio", d["clip_frac_low"] + d["clip_frac_high"])
            if self.beta != 0.0:
                self._sapo_log("kl", d["kl_ref"])
            return out.loss

        def _sapo_log(self, key: str, value: float) -> None:
            metrics: Any = getattr(self, "_metrics", None)
            if metrics is None:
                return
            model = getattr(self, "model", None)
            mode = "train" if model is None or getattr(model, "training", True) else "eval"
            try:
                metrics[mode][key].append(value)
            except (KeyError, TypeError, AttributeError):
                pass

    SAPOGRPOTrainer.__name__ = SAPOGRPOTrainer.__qualname__ = f"SAPO{base.__name__}"
    return SAPOGRPOTrainer
