"""Records whose replies are not (all) in the conversation: preference pairs (DPO) and prompts (GRPO).

Both go through the same chat template, processor and label code as SFT records (``Conversation.encode``): a DPO
sequence is the record with its ``chosen`` (or ``rejected``) reply appended as the last assistant turn, labelled
in the ``last_assistant`` mode under the same span check; a GRPO prompt is the record rendered with the template's
generation prompt (``PromptConversation``), exactly what the model sees when it is asked to answer.
"""

from __future__ import annotations

import dataclasses

import torch

from vlmtune.data.collator import Collator
from vlmtune.data.conversation import IGNORE_INDEX, Conversation, PromptConversation
from vlmtune.data.dataset import VisionLanguageDataset, encode_with, load_media, record_lengths
from vlmtune.data.records import Message, Record
from vlmtune.errors import Problem
from vlmtune.families import Family

REPLIES = ("chosen", "rejected")


def template_options(conversation: Conversation) -> dict:
    """The template switches of a conversation, to build another one that renders like it."""
    return {"enable_thinking": conversation.template_kwargs.get("enable_thinking"),
            "keep_earlier_reasoning": conversation.keep_earlier_reasoning}


def prompt_conversation(conversation: Conversation) -> PromptConversation:
    return PromptConversation(conversation.processor, **template_options(conversation))


def reply_conversation(conversation: Conversation) -> Conversation:
    """The conversation that labels a pair's reply: the last assistant turn only."""
    return Conversation(conversation.processor, "last_assistant", **template_options(conversation))


def with_reply(record: Record, reply: str) -> Record:
    """The record with ``reply`` appended as the assistant's last turn."""
    return dataclasses.replace(record, messages=[*record.messages, Message("assistant", reply)])


def stage_lengths(records: list[Record], conversation: Conversation, budget, family: Family,
                  stage: str) -> tuple[list[int], dict[str, list[int]], list[Problem]]:
    """(the length of each record's longest training sequence, the lengths ``check-data`` reports per part, label
    problems), text and vision tokens, without decoding media.

    DPO: the prompt, and the prompt plus each reply (a pair trains as two sequences; the longer one counts); each
    reply's labels are checked as SFT checks them. GRPO: the prompt (completions add up to
    ``--max_completion_length``).
    """
    if not records:
        return [], {}, []
    prompter = prompt_conversation(conversation)
    prompts = record_lengths(records, prompter, budget, family)
    if stage == "grpo":
        return prompts, {"prompt": prompts}, []
    labeller = reply_conversation(conversation)
    halves, problems = {}, []
    for key in REPLIES:
        variants = [with_reply(r, getattr(r, key)) for r in records]
        counts, found = labeller.measure(variants)
        halves[f"prompt + {key}"] = record_lengths(variants, labeller, budget, family, counts)
        problems += [dataclasses.replace(p, message=f"with the {key} reply: {p.message}") for p in found]
    longest = [max(pair) for pair in zip(*halves.values())]
    return longest, {"prompt": prompts, **halves}, problems


class PreferenceDataset(VisionLanguageDataset):
    """Preference records -> ``{"chosen": item, "rejected": item, "index": position}``.

    Each half is the whole conversation with that reply as the last assistant turn, through the same template,
    processor, label code and span check as SFT, in the ``last_assistant`` mode (only the reply and its end-of-turn
    token are labelled; ``conversation`` gives the template switches). Media are decoded once per pair. The two
    halves must share the prompt's ids token for token, up to where the reply starts; a record whose template or
    tokenizer breaks that stops with its index and id.
    """

    def __init__(self, records, processor, family, budget, conversation: Conversation, *args, **kwargs):
        super().__init__(records, processor, family, budget, conversation, *args, **kwargs)
        self.labeller = reply_conversation(conversation)

    def __getitem__(self, i: int) -> dict:
        return {**super().__getitem__(i), "index": i}

    def encode(self, record: Record) -> dict:
        decoded = load_media(record, self.budget)
        pair = {key: encode_with(self.labeller, with_reply(record, getattr(record, key)), decoded)
                for key in REPLIES}
        starts = {key: int((item["labels"] != IGNORE_INDEX).nonzero()[0]) for key, item in pair.items()}
        start = starts["chosen"]
        if starts["rejected"] != start or not torch.equal(pair["chosen"]["input_ids"][:start],
                                                          pair["rejected"]["input_ids"][:start]):
            raise ValueError("the chosen and rejected sequences do not share the prompt's token ids (the chat "
                             "template renders the prompt differently before each reply); check the replies' start")
        return pair


class PreferenceCollator(Collator):
    """Pairs -> one batch: every chosen sequence first, then every rejected one (rows ``i`` and ``i + B`` are a
    pair), with their vision tensors in the same order; ``pair_index`` holds each pair's dataset position."""

    def __call__(self, pairs: list[dict]) -> dict[str, torch.Tensor]:
        rows = [[pair[key]] for key in REPLIES for pair in pairs]
        batch = self.assemble(rows)
        batch["pair_index"] = torch.tensor([pair["index"] for pair in pairs])
        return batch


class PromptDataset(VisionLanguageDataset):
    """Prompt records (GRPO) -> the prompt's item (ids ending with the generation prompt, vision tensors), plus
    ``record``: its position here, index in the file, id, reward fields, last prompt turn and image paths."""

    def __init__(self, records, processor, family, budget, conversation: Conversation, *args, **kwargs):
        super().__init__(records, processor, family, budget, conversation, *args, **kwargs)
        self.prompter = prompt_conversation(conversation)

    def __getitem__(self, i: int) -> dict:
        record = self.records[i]
        meta = {"position": i, "index": record.index, "id": record.id, "fields": record.fields,
                "prompt": record.messages[-1].text, "images": record.images}
        return {**super().__getitem__(i), "record": meta}

    def encode(self, record: Record) -> dict:
        item = encode_with(self.prompter, record, load_media(record, self.budget))
        item.pop("labels")  # a prompt trains nothing; its completions are labelled when sampled
        return item


def collate_prompts(items: list[dict]) -> dict:
    """GRPO batches stay a list of prompts: the trainer samples them (in one call, padded on the left) and builds
    its own rows."""
    return {"prompts": items}


def completion_row(prompt: dict, completion: torch.Tensor) -> dict:
    """A prompt item (``input_ids`` ending where the reply starts) with a sampled completion appended: the row
    GRPO and on-policy distillation train on, labelled on the completion (and its end token) only."""
    row = {k: v for k, v in prompt.items() if k != "record"}
    row["input_ids"] = torch.cat([prompt["input_ids"], completion])
    row["attention_mask"] = torch.ones_like(row["input_ids"])
    if "mm_token_type_ids" in prompt:
        row["mm_token_type_ids"] = torch.cat([prompt["mm_token_type_ids"], torch.zeros_like(completion)])
    row["labels"] = torch.cat([torch.full_like(prompt["input_ids"], IGNORE_INDEX), completion])
    return row
