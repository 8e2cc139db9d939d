"""Group relative policy optimisation, ``grpo(config)``: config -> model -> prompts -> Trainer, top to bottom.

Engine: our ``VisionLanguageTrainer``; each training step samples, scores and trains in ``training_step``. TRL
supplies the fused log-prob head, its ``RepeatSampler`` (``--num_iterations``), its model unwrapping for generation
under DeepSpeed, and, on a GPU with vLLM installed, its ``VLLMGeneration``. TRL's ``GRPOTrainer`` is not used: it
takes a ``datasets.Dataset`` and renders prompts with its own image handling (no video, no vlmtune budgets), a
second data path beside vlmtune's processor-exact one.

A step of one process, for each of its ``per_device_train_batch_size`` prompts:

1. sample ``num_generations`` completions (HF ``generate``, or vLLM) from the prompt's processor ids and pixels,
   every prompt of the step in one call (the vision tower once per prompt);
2. score them with every reward function (and ``--reward_model``, on the prompt + completion rows), sum with the
   weights, and normalise within the group: advantage =
   (reward - group mean) / (group std + 1e-4) (``--scale_rewards``);
3. train on prompt + completion rows (labels on the completion and its end-of-turn token only) with the clipped
   objective ``-min(r A, clip(r, 1 - eps, 1 + eps_high) A)`` per token, ``r`` the probability ratio to the policy
   that sampled, plus ``beta`` x the KL estimate ``exp(ref - logp) - (ref - logp) - 1`` to the reference.

The 2025 variants (``vlmtune.stages.losses``): GSPO's one ratio per completion (``--importance_sampling_level
sequence``), DAPO's dynamic sampling (``--dynamic_sampling N``: groups with equal rewards sampled again, up to N
times, then dropped), its overlong penalty (``--overlong_buffer``) and the overlong filter
(``--mask_truncated_completions``).
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch

from vlmtune import rewards as reward_lib
from vlmtune.config import DataArguments, ModeArguments, ModelArguments, TrainingArguments
from vlmtune.data import media
from vlmtune.data.collator import Collator
from vlmtune.data.conversation import IGNORE_INDEX
from vlmtune.data.prompts import PromptDataset, collate_prompts, completion_row
from vlmtune.errors import ConfigError
from vlmtune.generation import VISION_TOKENS, cut_at_eos, cut_before, eos_ids, left_padded, sample_group
from vlmtune.model.reward import check_folder
from vlmtune.run import COMPLETIONS_FILE
from vlmtune.scoring import load_reward_model, score_rows
from vlmtune.stage_config import GRPOArguments
from vlmtune.stages import group_decoding, losses, rollout_positions, shared_prefix, vision_once
from vlmtune.stages import reference as ref
from vlmtune.stages.merged_lora import merged_for_sampling
from vlmtune.stages.policy import PolicyStage, PolicyTrainer, run_policy_stage

logger = logging.getLogger(__name__)

STD_EPS = 1e-4  # as TRL


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group") -> torch.Tensor:
    """Advantages of rewards laid out as consecutive groups of ``group_size`` completions of one prompt: the
    reward minus its group's mean, divided by the group's standard deviation (``group``, Bessel-corrected as
    ``torch.std``), the whole batch's (``batch``) or not at all (``none``), plus ``STD_EPS``."""
    grouped = rewards.view(-1, group_size)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).flatten()
    if scale == "group":
        return centred / (grouped.std(dim=1).repeat_interleave(group_size) + STD_EPS)
    if scale == "batch":
        return centred / (rewards.std() + STD_EPS)
    return centred


class HFSampler:
    """Completions through the model's own ``generate`` (or, where it applies, ``group_decoding.sample_groups``:
    its sampling loop with one prefill per prompt): every prompt of the batch in one call, padded on the left,
    ``num_generations`` rows each (the vision tower once per prompt, its features repeated; with the rollout's
    ``encodings``, kept for its later forwards), LoRA merged into the weights (``merged_for_sampling``); each
    completion is cut after its first end token."""

    def __init__(self, args: GRPOArguments, collator: Collator, eos_ids: list[int], pad_id: int,
                 suppressed: list[int]):
        self.args, self.collator, self.eos_ids, self.pad_id = args, collator, eos_ids, pad_id
        self.suppressed = suppressed

    @torch.no_grad()
    def sample(self, model, prompts: list[dict], trainer, encodings=None) -> list[list[torch.Tensor]]:
        n = self.args.num_generations
        batch = left_padded(self.collator([{k: v for k, v in p.items() if k != "record"} for p in prompts]))
        if encodings is not None:
            batch = vision_once.model_inputs(model, {**batch, vision_once.ENCODINGS: encodings}, batch.keys())
        decode = group_decoding.sample_groups if group_decoding.applies(model) else None
        with merged_for_sampling(model):
            rows = sample_group(model, batch, self.eos_ids, self.pad_id, self.suppressed, self.args.temperature,
                                self.args.top_p, self.args.top_k, self.args.max_completion_length, repeat=n,
                                decode=decode)
        return [rows[i * n:(i + 1) * n] for i in range(len(prompts))]


class VLLMSampler:
    """Completions through TRL's ``VLLMGeneration`` (colocated or a server; ``vllm_engine``): images and text only.

    Every prompt of the batch goes in one call with the ids HF ``generate`` would get, repeated ``num_generations``
    times (the engine samples that many per distinct prompt), with its images under the run's budget. The engine
    stops at the run's end tokens (``stop_token_ids``, as ``generate``'s ``eos_token_id``), and its weights are
    synced from the policy before the first sampling after each optimizer step (and at the run's first)."""

    def __init__(self, args: GRPOArguments, budget: media.MediaBudget, eos_ids: list[int], engine):
        self.args, self.budget, self.eos_ids, self.engine = args, budget, eos_ids, engine
        self.synced_step = -1

    def sample(self, model, prompts: list[dict], trainer, encodings=None) -> list[list[torch.Tensor]]:
        if trainer.state.global_step != self.synced_step:
            self.engine.sync_weights()
            self.synced_step = trainer.state.global_step
        n = self.args.num_generations
        ids, images = [], []
        for prompt in prompts:
            ids += [prompt["input_ids"].tolist()] * n
            images += [[media.load_image(p, self.budget) for p in prompt["record"]["images"]] or None] * n
        _, completions, _, _ = self.engine.generate(ids, images if any(images) else None, n)
        device = prompts[0]["input_ids"].device
        rows = [cut_at_eos(torch.tensor(c, dtype=torch.long, device=device), self.eos_ids) for c in completions]
        return [rows[i * n:(i + 1) * n] for i in range(len(prompts))]


def vllm_engine(args: GRPOArguments, trainer, eos_ids: list[int]):
    """TRL's ``VLLMGeneration`` for the run: its sampling flags, stopping at ``eos_ids``. Not exercised by the test
    suite (it needs a CUDA device with vLLM installed)."""
    from trl.generation.vllm_generation import VLLMGeneration

    return VLLMGeneration(
        trainer.model, trainer.accelerator, trainer.processing_class, mode=args.vllm_mode,
        server_base_url=args.vllm_server_base_url, gpu_memory_utilization=args.vllm_gpu_memory_utilization,
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        max_completion_length=args.max_completion_length, generation_kwargs={"stop_token_ids": list(eos_ids)})


class GRPOTrainer(PolicyTrainer):
    """``PolicyTrainer`` that samples, scores and trains on completions in each step."""

    def __init__(self, *args, grpo: GRPOArguments, rewards: list[reward_lib.Reward], **kwargs):
        super().__init__(*args, **kwargs)
        self.grpo = grpo
        self.rewards = rewards
        self.use_reward_model(None)
        tokenizer = self.processing_class.tokenizer
        self.eos_ids = eos_ids(self.model, tokenizer)
        self.rollout_collator = Collator(tokenizer.pad_token_id, fillers=self.fillers)
        self.vision_ids = tokenizer.convert_tokens_to_ids(list(VISION_TOKENS))
        self.sampler = HFSampler(grpo, Collator(tokenizer.pad_token_id), self.eos_ids, tokenizer.pad_token_id,
                                 self.vision_ids)
        self._rollouts: dict[tuple, list] = {}  # --num_iterations > 1: a batch's rollout and its uses
        self._samples: list[dict] = []

    def use_reward_model(self, reward_model) -> None:
        """``--reward_model``: it scores each prompt + completion row, after the reward functions."""
        self.reward_model = reward_model
        self.reward_names = [r.name for r in self.rewards] + ["reward_model"] * (reward_model is not None)
        self.reward_weights = [r.weight for r in self.rewards] + [self.grpo.reward_model_weight] * (
            reward_model is not None)

    # ------------------------------------------------------------ sampling and scoring

    def _get_train_sampler(self, train_dataset=None):
        if self.grpo.num_iterations == 1:
            return super()._get_train_sampler(train_dataset)
        from trl.trainer.utils import RepeatSampler

        args = self.args  # each optimizer step's prompts, on every process, come back num_iterations times
        return RepeatSampler(train_dataset or self.train_dataset, mini_repeat_count=1,
                             batch_size=args.per_device_train_batch_size * args.gradient_accumulation_steps
                             * args.world_size, repeat_count=self.grpo.num_iterations, seed=args.seed)

    def training_step(self, model, inputs, num_items_in_batch=None):
        return super().training_step(model, self._rollout(model, inputs["prompts"], "train"), num_items_in_batch)

    def _rollout(self, model, prompts: list[dict], mode: str) -> dict:
        key = tuple(p["record"]["position"] for p in prompts)
        if mode == "train" and key in self._rollouts:
            batch, uses = self._rollouts[key]
            if uses + 1 >= self.grpo.num_iterations:
                del self._rollouts[key]
            else:
                self._rollouts[key] = [batch, uses + 1]
            return batch
        prompts = self._prepare_inputs(prompts)
        encodings = vision_once.Encodings.for_model(model)  # the tower's outputs for every forward of the rollout
        with self._generation_model(model) as generator:
            completions = self._sample(generator, prompts, encodings)
            if mode == "train" and self.grpo.dynamic_sampling:
                prompts, completions = self._resample_equal_groups(generator, prompts, completions, encodings)
        batch = self._score(prompts, completions, mode)
        positions = rollout_positions.row_positions(model, prompts, completions, batch)
        if positions is not None:
            batch["position_ids"] = positions
        if encodings is not None:
            batch[vision_once.ENCODINGS] = encodings
        batch[shared_prefix.PROMPTS] = shared_prefix.prompt_inputs(prompts, self.grpo.num_generations)
        with torch.no_grad():
            if self.grpo.num_iterations > 1:
                batch["old_log_probs"] = ref.token_log_probs(model, batch)
            if self.grpo.beta:
                batch["ref_log_probs"] = self.reference_log_probs(model, batch)
        if mode == "train" and self.grpo.num_iterations > 1:
            self._rollouts[key] = [batch, 1]
        return batch

    def _sample(self, generator, prompts: list[dict], encodings=None) -> list[list[torch.Tensor]]:
        """The completions of each prompt (one group each), from one sampler call for them all."""
        groups = self.sampler.sample(generator, prompts, self, encodings=encodings)
        return [[cut_before(c, self.vision_ids) for c in group] for group in groups]

    def _resample_equal_groups(self, generator, prompts: list[dict], completions: list[list[torch.Tensor]],
                               encodings=None):
        """DAPO's dynamic sampling: the groups whose rewards are all equal are sampled again, up to
        ``--dynamic_sampling`` times; those still equal are dropped (unless every group is: then all stay, so that
        the step runs). Logs the share of groups found equal, and of those dropped."""
        n = self.grpo.num_generations
        equal = ~losses.varied_groups(self._rewards(prompts, completions)[2], n)
        first = equal.float().mean()
        for _ in range(self.grpo.dynamic_sampling):
            if not equal.any():
                break
            again = equal.nonzero().flatten().tolist()
            for i, group in zip(again, self._sample(generator, [prompts[i] for i in again], encodings)):
                completions[i] = group
            equal = ~losses.varied_groups(self._rewards(prompts, completions)[2], n)
        dropped = equal.float().mean() if not equal.all() else torch.tensor(0.0)
        for key, value in (("dynamic_sampling/equal_groups", first), ("dynamic_sampling/dropped_groups", dropped)):
            self.record_metric("train", key, self.accelerator.gather(value.to(self.args.device)[None]).mean().item())
        if equal.all():
            return prompts, completions
        keep = (~equal).nonzero().flatten().tolist()
        return [prompts[i] for i in keep], [completions[i] for i in keep]

    def _rows(self, prompts: list[dict], completions: list[list[torch.Tensor]]) -> list[dict]:
        """Prompt + completion rows, labels on the completion (and its end token) only."""
        return [completion_row(prompt, completion) for prompt, group in zip(prompts, completions)
                for completion in group]

    def _rewards(self, prompts: list[dict], completions: list[list[torch.Tensor]], batch: dict | None = None):
        """(texts, (rewards, completions) scores of each function and of the reward model, weighted total with
        the overlong penalty); ``batch``: the collated rows, when the caller has them (the reward model reads
        them)."""
        n = self.grpo.num_generations
        flat = [c for group in completions for c in group]
        texts = self.processing_class.tokenizer.batch_decode(flat, skip_special_tokens=True)
        per_reward = [[v for i, prompt in enumerate(prompts)
                       for v in reward_lib.score(reward, texts[i * n:(i + 1) * n], prompt["record"])]
                      for reward in self.rewards]
        if self.reward_model is not None:
            batch = batch if batch is not None else self.rollout_collator(self._rows(prompts, completions))
            per_reward.append(score_rows(self.reward_model, batch).tolist())
        per_reward = torch.tensor(per_reward, dtype=torch.float32)  # (rewards, completions)
        total = (per_reward * torch.tensor(self.reward_weights)[:, None]).sum(0)
        if self.grpo.overlong_buffer:
            lengths = torch.tensor([len(c) for c in flat])
            total = total + losses.overlong_penalty(lengths, self.grpo.max_completion_length,
                                                    self.grpo.overlong_buffer, self.grpo.overlong_penalty_factor)
        return texts, per_reward, total

    @contextlib.contextmanager
    def _generation_model(self, model):
        from trl.models.utils import unwrap_model_for_generation

        was_training = model.training
        model.eval()
        try:
            if not self._needs_unwrap(model):
                yield model
                return
            with unwrap_model_for_generation(model, self.accelerator,
                                             gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs
                                             ) as unwrapped:
                yield unwrapped
        finally:
            model.train(was_training)

    def _needs_unwrap(self, model) -> bool:
        """Whether TRL's unwrap does more than give ``model`` back (after a walk over its modules): where a wrapper,
        ZeRO-3 / FSDP shards or gradient checkpointing (switched off for sampling) are in play."""
        return (hasattr(model, "module") or "_orig_mod" in vars(model) or self.is_deepspeed_enabled
                or self.is_fsdp_enabled or bool(self.args.gradient_checkpointing))

    def _score(self, prompts: list[dict], completions: list[list[torch.Tensor]], mode: str) -> dict:
        """Rewards, advantages and the training rows of one batch of prompts and their completions."""
        n = self.grpo.num_generations
        flat = [c for group in completions for c in group]
        ended = torch.tensor([bool(len(c)) and int(c[-1]) in self.eos_ids for c in flat])
        rows = self._rows(prompts, completions)
        batch = self.rollout_collator(rows)
        texts, per_reward, total = self._rewards(prompts, completions, batch)
        advantages = group_advantages(total, n, self.grpo.scale_rewards)
        if self.grpo.mask_truncated_completions:  # the overlong filter: a cut-off completion trains no token
            batch["labels"][~ended.to(batch["labels"].device)] = IGNORE_INDEX
        device = batch["input_ids"].device
        batch["advantages"] = advantages.to(device)

        lengths = torch.tensor([len(c) for c in flat], dtype=torch.float32)
        stats = {"reward": total.mean(), "reward_std": total.view(-1, n).std(1).mean(),
                 "frac_reward_zero_std": (total.view(-1, n).std(1) < 1e-6).float().mean(),
                 "completions/mean_length": lengths.mean(), "completions/min_length": lengths.min(),
                 "completions/max_length": lengths.max(), "completions/clipped_ratio": (~ended).float().mean()}
        for name, values in zip(self.reward_names, per_reward):
            stats[f"rewards/{name}/mean"] = values.mean()
            stats[f"rewards/{name}/std"] = values.std()
        if self.grpo.overlong_buffer:
            stats["rewards/overlong_penalty/mean"] = losses.overlong_penalty(
                lengths, self.grpo.max_completion_length, self.grpo.overlong_buffer,
                self.grpo.overlong_penalty_factor).mean()
        for key, value in stats.items():
            self.record_metric(mode, key, self.accelerator.gather(value.to(device)[None]).mean().item())
        if mode == "train" and self.grpo.log_completions and self.accelerator.is_main_process:
            for i, text in enumerate(texts):
                record = prompts[i // n]["record"]
                self._samples.append({"id": record["id"], "prompt": record["prompt"], "completion": text,
                                      "rewards": {k: float(v[i]) for k, v in zip(self.reward_names, per_reward)},
                                      "reward": float(total[i]), "advantage": float(advantages[i])})
        return batch

    # ------------------------------------------------------------ loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = self.mode_of(model)
        advantages = inputs["advantages"][:, None]
        mask = (inputs["labels"][:, 1:] != IGNORE_INDEX).float()
        logps = ref.token_log_probs(model, inputs)
        old = inputs.get("old_log_probs")
        old = logps.detach() if old is None else old
        log_ratio = losses.importance_log_ratio(logps, old, mask, self.grpo.importance_sampling_level)
        # (rows, 1) under GSPO: one value per completion, broadcast over its tokens
        per_token, _, is_clipped = losses.clipped_objective(log_ratio, advantages, self.grpo.epsilon,
                                                                self.grpo.epsilon_high)
        if self.grpo.beta:
            diff = inputs["ref_log_probs"] - logps
            kl = torch.exp(diff) - diff - 1
            per_token = per_token + self.grpo.beta * kl
        if self.grpo.loss_type == "grpo":
            loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
        elif self.grpo.loss_type == "bnpo":
            loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
        else:  # dr_grpo
            loss = (per_token * mask).sum() / (per_token.shape[0] * self.grpo.max_completion_length)

        def masked_mean(values: torch.Tensor) -> float:
            totals = self.accelerator.reduce(torch.stack([(values * mask).sum(), mask.sum()]).detach(), "sum")
            return (totals[0] / totals[1].clamp(min=1)).item()

        self.record_metric(mode, "clip_ratio", masked_mean(is_clipped.float().expand_as(mask)))
        if self.grpo.beta:
            self.record_metric(mode, "kl", masked_mean(kl))
        return (loss, {"log_probs": logps.detach()}) if return_outputs else loss

    def eval_inputs(self, model, inputs: dict) -> dict:
        return self._rollout(model, inputs["prompts"], "eval")

    # ------------------------------------------------------------ logs

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._samples:  # a training log line: the completions sampled since the last one
            if self.args.should_save:
                path = Path(self.args.output_dir, COMPLETIONS_FILE)
                path.parent.mkdir(parents=True, exist_ok=True)
                with path.open("a") as f:
                    for sample in self._samples[: self.grpo.log_completions]:
                        f.write(json.dumps({"step": self.state.global_step, **sample}) + "\n")
            self._samples.clear()
        super().log(logs, start_time)


def grpo(model_args: ModelArguments, data_args: DataArguments, mode_args: ModeArguments,
         train_args: TrainingArguments, grpo_args: GRPOArguments) -> Path:
    """Run one GRPO job; returns the output folder."""
    rewards = reward_lib.load_rewards(grpo_args.reward_funcs, grpo_args.reward_weights)
    if grpo_args.reward_model:
        check_folder(grpo_args.reward_model, "--reward_model")

    def dataset(records, lengths, source, start, conversation):  # room for the completion beside each prompt
        return PromptDataset(records, start.processor, start.family, start.budget, conversation,
                             data_args.max_seq_length, data_args.strict_length,
                             [n + grpo_args.max_completion_length for n in lengths], source)

    def prepare(trainer: GRPOTrainer, start, plan, resume: str | None, train_set) -> None:
        trainer.sampler = choose_sampler(grpo_args, trainer, train_set, start.budget)
        if grpo_args.reward_model:
            trainer.use_reward_model(load_reward_model(grpo_args.reward_model, start.processor, start.family,
                                                       trainer.args.device))
        logger.info("GRPO: %d completions per prompt, rewards %s, %s loss, beta %g (reference: %s)",
                    grpo_args.num_generations,
                    ", ".join(f"{k} x {w:g}" for k, w in zip(trainer.reward_names, trainer.reward_weights)),
                    grpo_args.loss_type, grpo_args.beta,
                    "none" if not grpo_args.beta else "adapters off" if plan.uses_lora else "a frozen copy")

    return run_policy_stage(PolicyStage(
        name="grpo", args=grpo_args, trainer=GRPOTrainer, trainer_kwargs={"grpo": grpo_args, "rewards": rewards},
        dataset=dataset, collator=lambda processor, fillers: collate_prompts,  # prompts: the trainer samples
        check=lambda dataset: reward_lib.check_fields(rewards, dataset.records, dataset.source),
        data_path="prompt records, with the fields the reward functions read",
        no_packing="GRPO samples its sequences",
        empty="no prompt is left after the length filter (prompt + --max_completion_length); raise --max_seq_length",
        reference=bool(grpo_args.beta), reference_user="vlmtune grpo with --beta > 0",
        temperature=grpo_args.temperature, prepare=prepare,
    ), model_args, data_args, mode_args, train_args)


def choose_sampler(args: GRPOArguments, trainer: GRPOTrainer, dataset: PromptDataset, budget: media.MediaBudget):
    """HF generate, or vLLM where asked for (or, by default, where it is installed on a CUDA machine)."""
    import importlib.util

    has_vllm = importlib.util.find_spec("vllm") is not None
    cuda = torch.cuda.is_available()
    if args.use_vllm and not cuda:
        raise ConfigError("--use_vllm True needs a CUDA device; on CPU, completions are sampled with generate")
    if args.use_vllm and not has_vllm:
        raise ConfigError("--use_vllm True but vLLM is not installed (pip install vllm), or drop the flag")
    if args.use_vllm is None and cuda and not has_vllm:
        logger.info("sampling: HF generate (vLLM is not installed; pip install vllm for faster sampling on GPU)")
    if not (args.use_vllm or (args.use_vllm is None and cuda and has_vllm)):
        if not cuda:
            logger.info("sampling: HF generate (CPU)")
        return trainer.sampler
    videos = [r.id for r in dataset.records if r.videos]
    if videos:
        raise ConfigError(f"vLLM sampling (TRL's VLLMGeneration) takes images and text only; {len(videos)} record(s) "
                          f"have videos (ids {videos[:5]}): pass --use_vllm False")
    logger.info("sampling: vLLM (%s)", args.vllm_mode)
    return VLLMSampler(args, budget, trainer.eos_ids, vllm_engine(args, trainer, trainer.eos_ids))
