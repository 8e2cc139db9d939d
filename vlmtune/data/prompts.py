"""Records whose replies are not (all) in the conversation: preference pairs (DPO) and prompts (GRPO).

Both are rendered by the same chat template and processor as SFT records (``vlmtune.data.conversation``,
``vlmtune.data.dataset.process``): a DPO sequence is the record with its ``chosen`` (or ``rejected``) reply appended
as the last assistant turn, labelled by the conversation's ``last_assistant`` mode; a GRPO prompt is the record
rendered with the template's generation prompt, exactly what the model sees when it is asked to answer.
"""

from __future__ import annotations

import dataclasses

import torch

from vlmtune.data.collator import Collator
from vlmtune.data.conversation import IGNORE_INDEX, Conversation, chat_messages
from vlmtune.data.dataset import VisionLanguageDataset, _vision_token_counts, load_media, process, record_lengths
from vlmtune.data.records import Message, Record
from vlmtune.families import Family

REPLIES = ("chosen", "rejected")


def prompt_text(conversation: Conversation, record: Record) -> str:
    """The chat-template text of the record's prompt, ending with the generation prompt (the assistant header)."""
    return conversation.processor.apply_chat_template(chat_messages(record), tokenize=False,
                                                      add_generation_prompt=True)


def with_reply(record: Record, reply: str) -> Record:
    """The record with ``reply`` appended as the assistant's last turn."""
    return dataclasses.replace(record, messages=[*record.messages, Message("assistant", reply)])


def prompt_lengths(records: list[Record], conversation: Conversation, budget, family: Family) -> list[int]:
    """Tokens of each record's prompt with the generation prompt (text + vision), without decoding media."""
    tokenizer = conversation.processor.tokenizer
    ids = tokenizer([prompt_text(conversation, r) for r in records], add_special_tokens=False)["input_ids"]
    return [len(i) + _vision_token_counts(r, budget, family, conversation.processor) for r, i in zip(records, ids)]


def stage_lengths(records: list[Record], conversation: Conversation, budget, family: Family,
                  stage: str) -> tuple[list[int], dict[str, list[int]]]:
    """(the length of each record's longest training sequence, the lengths ``check-data`` reports per part).

    DPO: the prompt, and the prompt plus each reply (a pair trains as two sequences; the longer one counts).
    GRPO: the prompt (completions are generated, up to ``--max_completion_length`` more).
    """
    if not records:
        return [], {}
    prompts = prompt_lengths(records, conversation, budget, family)
    if stage == "grpo":
        return prompts, {"prompt": prompts}
    halves = {f"prompt + {key}": record_lengths([with_reply(r, getattr(r, key)) for r in records], conversation,
                                                budget, family) for key in REPLIES}
    longest = [max(pair) for pair in zip(*halves.values())]
    return longest, {"prompt": prompts, **halves}


class PreferenceDataset(VisionLanguageDataset):
    """Preference records -> ``{"chosen": item, "rejected": item, "index": position}``.

    Each half is the whole conversation with that reply as the last assistant turn, through the same template,
    processor and label code as SFT (``conversation`` must use the ``last_assistant`` label mode: only the reply
    and its end-of-turn token are labelled). Media are decoded once per pair. The two halves must share the prompt's
    ids token for token, up to where the reply starts; a record whose template or tokenizer breaks that stops with
    its index and id.
    """

    def __init__(self, records, processor, family, budget, conversation: Conversation, *args, **kwargs):
        if conversation.label_mode != "last_assistant":
            raise ValueError("a preference dataset labels the last reply only: use label_mode 'last_assistant'")
        super().__init__(records, processor, family, budget, conversation, *args, **kwargs)

    def __getitem__(self, i: int) -> dict:
        return {**super().__getitem__(i), "index": i}

    def encode(self, record: Record) -> dict:
        decoded = load_media(record, self.budget)
        pair = {}
        for key in REPLIES:
            item = process(self.processor, self.conversation.text(with_reply(record, getattr(record, key))), decoded)
            item["labels"] = self.conversation.labels(item["input_ids"])
            pair[key] = item
        starts = {}
        for key, item in pair.items():
            labelled = (item["labels"] != IGNORE_INDEX).nonzero()
            if not len(labelled):
                raise ValueError(f"no token of the {key} reply was found after the assistant header (does the reply "
                                 "start with a newline? the tokenizer merges it with the header's); strip it")
            starts[key] = int(labelled[0])
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

    def __getitem__(self, i: int) -> dict:
        record = self.records[i]
        meta = {"position": i, "index": record.index, "id": record.id, "fields": record.fields,
                "prompt": record.messages[-1].text, "images": record.images}
        return {**super().__getitem__(i), "record": meta}

    def encode(self, record: Record) -> dict:
        return process(self.processor, prompt_text(self.conversation, record), load_media(record, self.budget))


def collate_prompts(items: list[dict]) -> dict:
    """GRPO batches stay a list of prompts: each prompt is sampled on its own (no padding between prompts)."""
    return {"prompts": items}
