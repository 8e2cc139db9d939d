"""The data store's keys: what a store's contents depend on (``store_settings``), where a group lives, its lock."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import time
from pathlib import Path

import vlmtune
from vlmtune.data import media
from vlmtune.data.conversation import Conversation
from vlmtune.data.frames import frame_list, is_frame_list
from vlmtune.data.records import media_folders
from vlmtune.families import Family

STORE_VERSION = 3  # bump when the layout or what a store means changes
DIGEST_MEMO = "content.json"
"""In a store's group: the data file's content digest and the stat signature it was computed under."""
SETTLED_S = 2.0
"""A file written less than this long before it is hashed gets no memo: a write within the file system's
timestamp tick after the hash would leave its stat as it was (git's "racy" files)."""


def processor_fingerprint(processor) -> str:
    """SHA-256 of what in a processor decides a record's token count: the tokenizer (vocabulary, merges,
    added tokens, normalizer and pre-tokenizer), the chat templates and the vision patching. Pixel and frame
    budgets are keyed separately (``set_processor_budget`` writes them into the processor)."""
    tokenizer = processor.tokenizer
    backend = getattr(tokenizer, "_tokenizer", None)
    digest = hashlib.sha256()
    if hasattr(backend, "to_str"):
        # without the truncation and padding settings: a call of the tokenizer sets them, a count ignores them
        state = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
        digest.update(json.dumps(state, sort_keys=True).encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    vision = {}
    for name in ("image_processor", "video_processor"):
        part = getattr(processor, name, None)
        vision[name] = None if part is None else [type(part).__name__] + [
            getattr(part, key, None) for key in ("patch_size", "merge_size", "temporal_patch_size")]
    digest.update(json.dumps({
        "processor": type(processor).__name__,
        "tokenizer": type(tokenizer).__name__,
        "chat_template": getattr(processor, "chat_template", None),
        "tokenizer_chat_template": getattr(tokenizer, "chat_template", None),
        "split_special_tokens": getattr(tokenizer, "split_special_tokens", False),
        "vision": vision,
    }, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def store_settings(data_path: str | Path, processor, family: Family, budget: media.MediaBudget,
                   conversation: Conversation, *,
                   image_folder: str | Path | None, video_folder: str | Path | None, allow_urls: bool, deep: bool,
                   min_image_side: int, data_format: str = "llava", stage: str = "sft") -> dict:
    """Everything a store's contents depend on, except the data file's bytes."""
    import tokenizers
    import transformers

    images, videos = media_folders(data_path, image_folder, video_folder)
    return {
        "store": STORE_VERSION,
        "vlmtune": vlmtune.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "data_path": os.path.abspath(data_path),
        "image_folder": str(images),
        "video_folder": str(videos),
        # relative media paths are kept relative (as errors name them): they mean something only from one folder
        "cwd": None if images.is_absolute() and videos.is_absolute() else os.getcwd(),
        "allow_urls": allow_urls,
        "data_format": data_format,  # detected from the first record, or forced
        "deep": deep,
        "min_image_side": min_image_side,
        "family": {"model_type": family.model_type, "patch_size": family.patch_size,
                   "video_timestamps": family.video_timestamps},
        "budget": dataclasses.asdict(budget),
        "processor": processor_fingerprint(processor),
        # the template's switches and how replies are cut (text tokens), and what the label check trains
        "conversation": conversation.fingerprint(),
        "label_mode": conversation.label_mode,
        **({"stage": stage} if stage != "sft" else {}),  # what the records are (SFT stores keep their key)
    }


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes; of a folder (``save_to_disk``): of its files' names and bytes."""
    digest = hashlib.sha256()
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
    return digest.hexdigest()


def _signature(path: Path) -> list[int]:
    """What any write to a file, or its replacement by another, changes: device, inode, size, mtime and ctime
    (the ctime cannot be set back by a program, as the mtime can)."""
    st = os.stat(path)
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def content_digest(path: str | Path, group: Path) -> str:
    """``file_digest(path)``, remembered in ``group`` under the file's stat signature, so that opening the store
    of a large file that has not changed does not read it whole (529 MB: ~2 s here). A file written in the
    ``SETTLED_S`` seconds before it is hashed, a changed signature and a ``save_to_disk`` folder are read whole."""
    path = Path(path)
    if path.is_dir():
        return file_digest(path)
    memo, signature, where = group / DIGEST_MEMO, _signature(path), str(path.resolve())
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        saved = json.loads(memo.read_text())
        if saved["path"] == where and saved["signature"] == signature:
            return saved["digest"]
    started = time.time_ns()
    digest = file_digest(path)
    if _signature(path) == signature and started - max(signature[3:]) > SETTLED_S * 1e9:
        group.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f"{memo.name}.{os.getpid()}.tmp")  # replaced whole: a reader sees one or the other
        tmp.write_text(json.dumps({"path": where, "signature": signature, "digest": digest}))
        os.replace(tmp, memo)
    return digest


def _record_hash(text: bytes | str) -> bytes:
    return hashlib.blake2b(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"),
                           digest_size=16).digest()


def group_folder(settings: dict) -> Path:
    return vlmtune.cache_root() / "data" / _digest(settings)[:24]


@contextlib.contextmanager
def _locked(group: Path, exclusive: bool):
    """The group's lock: shared while a store is opened, exclusive while one is built, swapped or deleted."""
    group.mkdir(parents=True, exist_ok=True)
    with open(group / "lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)



def _stat(path: str) -> list[int] | None:
    """``[size, mtime_ns]`` of a media file, None when it cannot be read. A frame list: ``[its frames' total size,
    a hash of every frame's size and mtime]`` (a frame edited, added or removed changes it)."""
    if is_frame_list(path):
        stats = [None if media.is_url(f) or media.is_inline(f) else _stat(f) for f in frame_list(path)[0]]
        digest = hashlib.blake2b(json.dumps(stats).encode(), digest_size=7).hexdigest()
        return [sum(st[0] for st in stats if st), int(digest, 16)]
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]
