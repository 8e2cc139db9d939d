"""Whether a second model (a reward model, a distillation teacher) reads the same ids and pixels as the policy."""

from __future__ import annotations

from vlmtune.errors import ConfigError
from vlmtune.families import Family


def check_compatible(processor, family: Family, other_processor, other_family: Family, what: str) -> None:
    """``ConfigError`` in one sentence unless ``other`` (named by ``what``, e.g. "--teacher PATH") has the same
    tokenizer vocabulary and vision token scheme (patch size, merge, image / video tokens) as the run's model:
    its forward must read the run's batches (ids, pixels, grids) as they are."""
    vocab, other = processor.tokenizer.get_vocab(), other_processor.tokenizer.get_vocab()
    if vocab != other:
        differ = sorted(set(vocab.items()) ^ set(other.items()))
        raise ConfigError(f"{what} does not share the run's tokenizer ({len(vocab)} vs {len(other)} tokens, "
                          f"{len(differ)} differ, e.g. {differ[:3]}); it must use the same tokenizer as "
                          "--model_name_or_path")
    mine, theirs = _vision_scheme(processor, family), _vision_scheme(other_processor, other_family)
    if mine != theirs:
        changed = {k: (v, theirs[k]) for k, v in mine.items() if theirs[k] != v}
        raise ConfigError(f"{what} does not share the run's vision token scheme ({changed}, run vs other); it "
                          "must see images and videos through the same patches and tokens as --model_name_or_path")


def _vision_scheme(processor, family: Family) -> dict:
    image = getattr(processor, "image_processor", None)
    return {"patch_size": getattr(image, "patch_size", family.patch_size),
            "merge_size": getattr(image, "merge_size", 2),
            "temporal_patch_size": getattr(image, "temporal_patch_size", None),
            "image_token": getattr(processor, "image_token", None),
            "video_token": getattr(processor, "video_token", None),
            "video_timestamps": family.video_timestamps}
