"""Direct preference optimisation, ``dpo(config)``: config -> model -> preference pairs -> Trainer, top to bottom.

Engine: ``PolicyTrainer`` (``vlmtune.stages.policy``) with the DPO loss in ``compute_loss``, run by
``run_policy_stage``; TRL supplies the fused log-prob head (``vlmtune.stages.reference``). TRL's ``DPOTrainer`` is
not used: it takes a ``datasets.Dataset`` only and tokenizes prompt and replies apart (images only), which is a
second data path beside vlmtune's processor-exact one.

A batch of B pairs is one forward of 2B rows: the B chosen sequences, then the B rejected ones, each with its
pixels (``PreferenceCollator``). The summed log-probability of each reply's tokens (its end-of-turn token
included) under the policy and under the reference gives the implicit rewards ``beta * (logp - ref_logp)``.
The reference-free losses (``--loss_type orpo|simpo``, ``vlmtune.stages.losses``) use the replies' mean token
log-probabilities under the policy alone (rewards ``beta * mean logp``, as TRL logs them); no reference is loaded.

Under ``--sequence_parallel_size N`` each rank of a group holds a chunk of every chosen and rejected row (and the
reference's forward splits alike); the summed log-probs are added up over the group (with autograd) before the
loss, so the loss and its gradients are the single-process step's (``vlmtune.stages.sequence_parallel``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from vlmtune.config import DataArguments, ModeArguments, ModelArguments, TrainingArguments
from vlmtune.data.prompts import PreferenceCollator, PreferenceDataset
from vlmtune.errors import ConfigError
from vlmtune.run import REF_FILE
from vlmtune.stage_config import DPOArguments
from vlmtune.stages import losses as variants
from vlmtune.stages import reference as ref
from vlmtune.stages.policy import PolicyStage, PolicyTrainer, run_policy_stage

logger = logging.getLogger(__name__)


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             args: DPOArguments, chosen_tokens: torch.Tensor | None = None,
             rejected_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pair DPO loss from summed reply log-probs (policy and reference). IPO divides each log-ratio by its
    reply's token count, as TRL does."""
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    if args.loss_type == "ipo":
        margin = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        return (margin - 1 / (2 * args.beta)) ** 2
    logits = args.beta * (chosen_ratio - rejected_ratio)
    if args.loss_type == "hinge":
        return torch.relu(1 - logits)
    eps = args.label_smoothing
    return -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)


class DPOTrainer(PolicyTrainer):
    """``PolicyTrainer`` whose loss is DPO's, against a ``Reference`` or precomputed reference log-probs."""

    def __init__(self, *args, dpo: DPOArguments, **kwargs):
        super().__init__(*args, **kwargs)
        self.dpo = dpo
        self.ref_table: dict[str, torch.Tensor] = {}  # "train" / "eval" -> (pairs, 2), precomputed
        self.ref_seen: dict[str, dict[int, torch.Tensor]] = {"train": {}, "eval": {}}  # mode -> pair -> (2,)

    # ------------------------------------------------------------ loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = self.mode_of(model)
        pair_index = inputs.pop("pair_index")
        mask = inputs["labels"][:, 1:] != -100
        if self.dpo.reference_free:
            return self._reference_free_loss(model, inputs, mask, mode, return_outputs)
        if self.dpo.precompute_ref_log_probs:
            ref_logps = self._reference_table(model, mode)[pair_index.cpu()].T.flatten()
        else:
            ref_logps = self._reference_sums(model, inputs, pair_index, mode)
        logps = self.log_prob_sums(model, inputs)
        chosen, rejected = logps.chunk(2)
        ref_chosen, ref_rejected = ref_logps.to(logps).chunk(2)
        tokens_chosen, tokens_rejected = mask.sum(-1).chunk(2)
        losses = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.dpo, tokens_chosen, tokens_rejected)
        beta = self.dpo.beta
        self._record(mode, chosen.detach(), rejected.detach(), beta * (chosen.detach() - ref_chosen),
                     beta * (rejected.detach() - ref_rejected))
        loss = losses.mean()
        return (loss, {"logps": logps.detach()}) if return_outputs else loss

    def _reference_free_loss(self, model, inputs, mask, mode: str, return_outputs: bool):
        """ORPO or SimPO from the policy's mean token log-probability of each reply."""
        logps = self.log_prob_sums(model, inputs)
        means = logps / mask.sum(-1).clamp(min=1)
        chosen, rejected = means.chunk(2)
        extra = {}
        if self.dpo.loss_type == "orpo":
            losses, log_odds = variants.orpo_loss(chosen, rejected, self.dpo.beta)
            extra = {"log_odds_ratio": log_odds.detach(), "nll_loss": -chosen.detach()}
        else:
            losses = variants.simpo_loss(chosen, rejected, self.dpo.beta, self.dpo.simpo_gamma,
                                         self.dpo.label_smoothing)
        sums = logps.detach().chunk(2)
        self._record(mode, *sums, self.dpo.beta * chosen.detach(), self.dpo.beta * rejected.detach(), extra)
        loss = losses.mean()
        return (loss, {"logps": logps.detach()}) if return_outputs else loss

    def _record(self, mode: str, chosen, rejected, rewards_chosen, rewards_rejected, extra: dict | None = None):
        values = {
            "rewards/chosen": rewards_chosen, "rewards/rejected": rewards_rejected,
            "rewards/margins": rewards_chosen - rewards_rejected,
            "rewards/accuracies": (rewards_chosen > rewards_rejected).float(),
            "logps/chosen": chosen, "logps/rejected": rejected, **(extra or {}),
        }
        for key, value in values.items():
            self.record_metric(mode, key, self.accelerator.gather(value).mean().item())

    # ------------------------------------------------------------ reference

    def _reference_sums(self, model, inputs: dict, pair_index: torch.Tensor, mode: str) -> torch.Tensor:
        """The reference's summed reply log-probs of the batch (chosen rows, then rejected), each pair scored once
        per run: the reference never changes (adapters off, or the frozen copy), so a pair's sums are kept from
        the first batch that held it and reused in later epochs."""
        seen = self.ref_seen[mode]
        pairs = pair_index.tolist()
        if all(i in seen for i in pairs):
            kept = torch.stack([seen[i] for i in pairs])  # (pairs, 2)
            return kept.T.flatten().to(inputs["input_ids"].device)
        sums = self.reference_log_prob_sums(model, inputs)
        for i, pair in zip(pairs, torch.stack(sums.detach().chunk(2), -1).cpu()):
            seen[i] = pair
        return sums

    # ------------------------------------------------------------ precomputed reference

    def _reference_table(self, model, mode: str) -> torch.Tensor:
        """The reference log-probs of every pair of the split, computed before the first step with the policy as it
        starts (a LoRA policy's fresh adapters change nothing yet; a full policy is its own reference then), for
        the training and the eval split at once."""
        if mode not in self.ref_table:
            if self.state.global_step > 0:
                raise ConfigError("--precompute_ref_log_probs: the reference log-probs were not saved with the "
                                  f"checkpoint this run resumed from ({REF_FILE}); they cannot be computed after "
                                  "training started. Resume without the flag, or start again")
            for split, dataset in (("train", self.train_dataset), ("eval", self.eval_dataset)):
                if dataset is not None and split not in self.ref_table:
                    self.ref_table[split] = self._score_pairs(model, dataset, split)
        return self.ref_table[mode]

    @torch.no_grad()
    def _score_pairs(self, model, dataset, mode: str) -> torch.Tensor:
        table = torch.full((len(dataset), 2), float("nan"))
        was_training = model.training
        model.eval()
        loader = self.get_eval_dataloader(dataset)  # sharded over the processes, every rank the same batch count
        for batch in loader:
            batch = self._prepare_inputs(batch)
            index = batch.pop("pair_index")
            chosen, rejected = ref.token_log_probs(model, batch).sum(-1).chunk(2)
            scored = self.accelerator.gather(torch.stack([index.to(chosen), chosen, rejected], -1)).cpu()
            table[scored[:, 0].long()] = scored[:, 1:].float()
        model.train(was_training)
        if table.isnan().any():
            raise RuntimeError(f"precomputing the reference: {int(table.isnan().any(-1).sum())} pairs not scored")
        logger.info("reference log-probs precomputed for %d %s pairs", len(table), mode)
        return table

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        if self.args.should_save and self.ref_table:
            save_file({k: v.contiguous() for k, v in self.ref_table.items()},
                      str(Path(output_dir or self.args.output_dir, REF_FILE)))

    def load_reference_table(self, checkpoint: str | None) -> None:
        """Resume: the precomputed reference log-probs saved with the checkpoint folder
        (``checkpoints.resolve_resume``'s answer), if any."""
        path = Path(checkpoint or "", REF_FILE)
        if checkpoint and path.is_file():
            self.ref_table = {k: v for k, v in load_file(str(path)).items()}


def dpo(model_args: ModelArguments, data_args: DataArguments, mode_args: ModeArguments,
        train_args: TrainingArguments, dpo_args: DPOArguments) -> Path:
    """Run one DPO job; returns the output folder."""
    if train_args.sequence_parallel_size > 1 and dpo_args.precompute_ref_log_probs:
        raise ConfigError(f"--sequence_parallel_size {train_args.sequence_parallel_size} with "
                          "--precompute_ref_log_probs: the precomputing pass scores each process's own batches, "
                          "which a split sequence cannot; drop --precompute_ref_log_probs (the reference then runs "
                          "beside the policy, split as it is)")

    def dataset(records, lengths, source, start, conversation):
        return PreferenceDataset(records, start.processor, start.family, start.budget, conversation,
                                 data_args.max_seq_length, data_args.strict_length, lengths, source)

    def prepare(trainer: DPOTrainer, start, plan, resume: str | None, train_set) -> None:
        logger.info("DPO: %s loss, beta %g, reference %s", dpo_args.loss_type, dpo_args.beta,
                    "none (a reference-free loss)" if dpo_args.reference_free
                    else "precomputed before step 1" if dpo_args.precompute_ref_log_probs
                    else "adapters off" if plan.uses_lora else "a frozen copy")
        trainer.load_reference_table(resume)

    return run_policy_stage(PolicyStage(
        name="dpo", args=dpo_args, trainer=DPOTrainer, trainer_kwargs={"dpo": dpo_args},
        dataset=dataset, label_mode="last_assistant",  # the reply only
        collator=lambda processor, fillers: PreferenceCollator(processor.tokenizer.pad_token_id, fillers=fillers),
        data_path="preference records: prompt turns plus 'chosen' and 'rejected'",
        no_packing="DPO batches pair each chosen sequence with its rejected one",
        empty="no preference record is left after the length filter; raise --max_seq_length",
        reference=not (dpo_args.precompute_ref_log_probs or dpo_args.reference_free), reference_user="vlmtune dpo",
        prepare=prepare,
    ), model_args, data_args, mode_args, train_args)
