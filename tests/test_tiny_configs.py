"""The tiny models' configs carry every key a published config of their family has (values aside).

The references are real config.json files of each family, kept in tests/fixtures/real_configs/ (their sources in
tests/fixtures/README.md). Both sides go through transformers' own config class, as vLLM and transformers load a
folder: keys the class renames (rope_scaling -> rope_parameters, torch_dtype -> dtype, num_experts ->
num_local_experts) or fills with defaults line up, and what is left are the keys a loader finds only if the file
carries them (norm_topk_prob, mamba_ssm_dtype, ...): the ones that matter here.
"""

import json
from pathlib import Path

import pytest
from transformers import AutoConfig

from vlmtune.families import FAMILIES
from vlmtune.testing import tiny

REAL = Path(__file__).parent / "fixtures" / "real_configs"
FAMILIES_WITH_A_REAL_CONFIG = sorted(p.stem for p in REAL.glob("*.json"))

NOT_READ = {"in_chans", "spatial_patch_size", "vision_token_id"}
"""Keys of the hub's Qwen2.5-VL configs that neither transformers 5.22 nor vLLM 0.32 reads (their model and config
code has no reader): the Qwen2-VL-era vision aliases of in_channels / patch_size, which the tiny configs carry, and
the id of <|vision_pad|>, a token the tiny tokenizer does not have."""


def _as_loaded(config: dict) -> dict:
    """``config`` as transformers' config class of its model type writes it back (what a loader sees)."""
    kwargs = {k: v for k, v in config.items() if k != "model_type"}
    return AutoConfig.for_model(config["model_type"], **kwargs).to_dict()


def _scopes(config: dict) -> dict[str, set[str]]:
    """Key sets per scope. The language model's keys form one scope whether a file puts them at the top (the older
    flat hub format, Qwen2-VL / Qwen2.5-VL) or in text_config: loaders read them through get_text_config()."""
    text = set(config) | set(config.get("text_config", {}))
    return {"top and text_config": text - {"text_config", "vision_config"},
            "vision_config": set(config.get("vision_config", {}))}


@pytest.fixture(scope="module")
def tiny_configs():
    out = {}
    for family in FAMILIES_WITH_A_REAL_CONFIG:
        fam = FAMILIES[family]
        out[family] = tiny.tiny_config(fam, tiny._train_tokenizer(0, fam.extra_tokens)).to_dict()
    return out


def test_real_configs_cover_the_newer_families():
    assert {"qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"} <= set(FAMILIES_WITH_A_REAL_CONFIG)
    assert set(FAMILIES_WITH_A_REAL_CONFIG) <= set(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES_WITH_A_REAL_CONFIG)
def test_tiny_config_has_every_key_of_the_real_one(family, tiny_configs):
    real = json.loads((REAL / f"{family}.json").read_text())
    assert real["model_type"] == family
    have, want = _scopes(tiny_configs[family]), _scopes(_as_loaded(real))
    missing = {scope: sorted(want[scope] - have[scope] - NOT_READ) for scope in want}
    assert missing == {scope: [] for scope in want}
