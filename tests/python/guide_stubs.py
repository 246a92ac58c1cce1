"""Stand-ins for the parts of verl and TRL that docs/guides/{verl,trl}.md use, so that the
guides' code can run here (neither package is installed). They have the names and call
signatures the guides rely on and do the least that lets the guides' code execute; they are
not models of verl's or TRL's behaviour beyond that.

install() puts them into sys.modules; uninstall() removes them again."""
import random
import sys
import types
from collections import defaultdict

import torch

# The guides' SID token ids: level k in [151700 + 256 k, 151956 + 256 k).
SID_LO = 151700
THOUGHT = 1000  # thought tokens: ids 0 .. THOUGHT-1


def interleaved_response(rng, K=3, codes=4, T=16, defect=False):
    """thought*, SID level 0, thought*, SID level 1, ... right-padded; (ids, mask)."""
    ids = []
    for k in range(K if not defect else K - 1):
        ids += [rng.randrange(THOUGHT) for _ in range(rng.randint(0, 2))]
        ids.append(SID_LO + 256 * k + rng.randrange(codes))
    ids = ids[:T]
    mask = [1] * len(ids) + [0] * (T - len(ids))
    return ids + [0] * (T - len(ids)), mask


# ----------------------------------------------------------------------------- verl
def _make_verl():
    verl = types.ModuleType("verl")
    trainer = types.ModuleType("verl.trainer")
    ppo = types.ModuleType("verl.trainer.ppo")
    core_algos = types.ModuleType("verl.trainer.ppo.core_algos")
    ray_trainer = types.ModuleType("verl.trainer.ppo.ray_trainer")

    core_algos.POLICY_LOSS_REGISTRY = {}

    def register_policy_loss(name):
        def decorator(fn):
            core_algos.POLICY_LOSS_REGISTRY[name] = fn
            return fn
        return decorator

    def get_policy_loss_fn(name):
        return core_algos.POLICY_LOSS_REGISTRY[name]

    core_algos.register_policy_loss = register_policy_loss
    core_algos.get_policy_loss_fn = get_policy_loss_fn

    def compute_advantage(data, adv_estimator, gamma=1.0, lam=1.0, num_repeat=1, multi_turn=False,
                          norm_adv_by_std_in_grpo=True, config=None):
        data.meta_info["computed_by"] = f"verl:{adv_estimator}"
        return data

    ray_trainer.compute_advantage = compute_advantage
    verl.trainer, trainer.ppo = trainer, ppo
    ppo.core_algos, ppo.ray_trainer = core_algos, ray_trainer
    return {"verl": verl, "verl.trainer": trainer, "verl.trainer.ppo": ppo,
            "verl.trainer.ppo.core_algos": core_algos, "verl.trainer.ppo.ray_trainer": ray_trainer}


class DataProto:
    """verl's DataProto as far as the guide uses it: batch (tensors), non_tensor_batch (numpy)."""

    def __init__(self, batch, non_tensor_batch):
        self.batch = dict(batch)
        self.non_tensor_batch = dict(non_tensor_batch)
        self.meta_info = {}


# ----------------------------------------------------------------------------- trl
class _StubLM(torch.nn.Module):
    """Per-token log-probabilities log sigmoid(a[pos] + b * (id mod 5)): differentiable, < 0."""

    def __init__(self, length=64):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = torch.nn.Parameter(torch.randn(length, generator=g))
        self.b = torch.nn.Parameter(torch.tensor(0.3))
        self.training = True

    def forward(self, input_ids):
        pos = self.a[: input_ids.size(1)]
        return torch.nn.functional.logsigmoid(pos + self.b * (input_ids % 5).to(pos.dtype))


class GRPOConfig:
    def __init__(self, output_dir="out", num_generations=8, beta=0.04, loss_type="grpo", epsilon=0.2,
                 epsilon_high=None, max_completion_length=16, num_iterations=1, scale_rewards=True, **kwargs):
        self.output_dir = output_dir
        self.num_generations = num_generations
        self.beta = beta
        self.loss_type = loss_type
        self.epsilon = epsilon
        self.epsilon_high = epsilon_high if epsilon_high is not None else epsilon
        self.max_completion_length = max_completion_length
        self.num_iterations = num_iterations
        self.scale_rewards = scale_rewards
        self.__dict__.update(kwargs)


class _Accelerator:
    process_index = 0

    def gather(self, t):
        return t


class GRPOTrainer:
    """Members used by the guide and by sapo_torch.trl, with TRL 0.17-0.19's names."""

    def __init__(self, model, reward_funcs, args=None, train_dataset=None, **kwargs):
        args = args or GRPOConfig()
        self.model = _StubLM() if isinstance(model, str) else model
        self.reward_funcs = reward_funcs if isinstance(reward_funcs, list) else [reward_funcs]
        self.args = args
        self.train_dataset = train_dataset
        self.num_generations = args.num_generations
        self.beta = args.beta
        self.loss_type = args.loss_type
        self.epsilon_low, self.epsilon_high = args.epsilon, args.epsilon_high
        self.max_completion_length = args.max_completion_length
        self.num_iterations = args.num_iterations
        self.scale_rewards = args.scale_rewards
        self.accelerator = _Accelerator()
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._rng = random.Random(0)

    def _get_per_token_logps(self, model, input_ids, attention_mask, logits_to_keep):
        return model(input_ids)[:, -logits_to_keep:]

    def _generate_and_score_completions(self, inputs):
        B, C = len(inputs), self.max_completion_length
        rows = [interleaved_response(self._rng, T=C, defect=(i % 7 == 6)) for i in range(B)]
        completion_ids = torch.tensor([r[0] for r in rows])
        completion_mask = torch.tensor([r[1] for r in rows])
        prompt_ids = torch.full((B, 4), 7, dtype=torch.int64)
        prompt_mask = torch.ones(B, 4, dtype=torch.int64)
        rewards = torch.tensor([sum(f(prompts=[x["prompt"] for x in inputs], completions=["..."] * B)[i]
                                    for f in self.reward_funcs) for i in range(B)], dtype=torch.float32)
        grouped = rewards.view(-1, self.num_generations)
        adv = (grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)
        ref = None
        if self.beta != 0.0:
            with torch.no_grad():
                ids = torch.cat([prompt_ids, completion_ids], 1)
                ref = self.model(ids)[:, -C:] + 0.1
        return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
                "completion_mask": completion_mask, "advantages": adv.reshape(-1),
                "old_per_token_logps": None, "ref_per_token_logps": ref}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        raise NotImplementedError("the stand-in has no loss of its own")

    def train(self):
        """One step over the dataset: each prompt num_generations times, contiguously."""
        inputs = [x for x in self.train_dataset for _ in range(self.num_generations)]
        batch = self._generate_and_score_completions(inputs)
        loss = self.compute_loss(self.model, batch)
        loss.backward()
        self.last_batch, self.last_loss = batch, loss
        return loss


def _make_trl():
    trl = types.ModuleType("trl")
    trl.GRPOConfig = GRPOConfig
    trl.GRPOTrainer = GRPOTrainer
    return {"trl": trl}


_installed = []


def install():
    mods = {**_make_verl(), **_make_trl()}
    for name, mod in mods.items():
        assert name not in sys.modules, f"a real {name} is importable here; the stand-in would shadow it"
        sys.modules[name] = mod
        _installed.append(name)
    return mods


def uninstall():
    while _installed:
        sys.modules.pop(_installed.pop(), None)
