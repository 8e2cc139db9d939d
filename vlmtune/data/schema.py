"""What every data format is read into: ``Record`` (one validated sample) and the names it is written with."""

from __future__ import annotations

from dataclasses import dataclass, field

from vlmtune.data import boxes, media

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
KNOWN_KEYS = {"id", "image", "video", "conversations", "box_format", "box_image"}
STAGES = ("sft", "dpo", "grpo", "cpt")
"""What a data file is for: supervised replies, preference pairs, prompts with fields for reward functions, or
documents (continued pre-training: ``text`` with media, no chat)."""
SAMPLE_KEYS = frozenset({"score", "rewards"})
"""What `vlmtune sample` writes beside each reply (its total score, and each reward's); read by no stage."""
STAGE_KEYS = {"sft": SAMPLE_KEYS, "dpo": frozenset({"chosen", "rejected"})}
DOCUMENT_KEYS = frozenset({"id", "image", "video", "text"})
"""The keys of a CPT record."""
DOCUMENT_ROLE = "document"
"""The role of a CPT record's one message: its whole text, placeholders where the media go."""
"""Keys each stage reads beside ``KNOWN_KEYS``; GRPO reads every other key (as reward fields)."""


@dataclass
class Message:
    role: str  # "system" | "user" | "assistant"
    text: str  # with <image> / <video> placeholders where the media go


@dataclass
class Record:
    """One validated sample: messages plus resolved media paths in placeholder order."""

    index: int
    id: str
    messages: list[Message]
    images: list[str] = field(default_factory=list)
    videos: list[str] = field(default_factory=list)
    image_sizes: list[tuple[int, int]] = field(default_factory=list)
    """(width, height) of each image after EXIF orientation, read from its header."""
    video_infos: list[media.VideoInfo] = field(default_factory=list)
    chosen: str | None = None
    """Preference records (DPO): the better reply to the last prompt; ``messages`` end with that prompt."""
    rejected: str | None = None
    """Preference records (DPO): the worse reply to the last prompt."""
    fields: dict = field(default_factory=dict)
    """Prompt records (GRPO): the record's other keys (a gold ``answer``, a ``box``, ...), for reward functions."""
    box_format: str | None = None
    """Convention of the boxes in this record's text (the record's ``box_format``, else ``--box_format``)."""
    box_image: int | list[int] | None = None
    """1-based image each box refers to, in multi-image records (one for all, or one per box)."""
    boxes: list[boxes.Converted] = field(default_factory=list)
    """The boxes found and converted to the family's convention (``vlmtune.data.boxes``)."""

    @property
    def shape(self) -> str:
        """'text', 'image', 'multi_image', 'video' or 'image+video' (for summaries)."""
        if self.images and self.videos:
            return "image+video"
        if self.videos:
            return "video"
        if len(self.images) > 1:
            return "multi_image"
        return "image" if self.images else "text"


RawItem = tuple[int, "int | None", "bytes | str"]
"""(record index, line number in a JSON lines file or None, the record's JSON text)."""


def known_keys(stage: str) -> set[str] | None:
    """The keys a record of ``stage`` may have, or None when any key is accepted (GRPO: reward fields)."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if stage == "cpt":
        return set(DOCUMENT_KEYS)
    return None if stage == "grpo" else KNOWN_KEYS | STAGE_KEYS[stage]
