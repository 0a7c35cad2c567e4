"""The vLLM plug-in's setting (hf_overrides={"visionzip": {...}}), parsed without vLLM: the keys apply()
takes for Qwen, their defaults and their errors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from visionzip_kernels.integrations.vllm import VisionZipSettings, settings_from_config


def config(**overrides):
    return SimpleNamespace(**overrides)


def test_not_enabled():
    assert settings_from_config(config()) is None
    assert settings_from_config(config(visionzip=None)) is None
    assert settings_from_config(config(visionzip=False)) is None


def test_defaults_and_explicit_budgets():
    assert settings_from_config(config(visionzip={})) == VisionZipSettings(0.65, 0.05, -1)
    assert settings_from_config(config(visionzip=True)) == VisionZipSettings(0.65, 0.05, -1)
    assert settings_from_config(config(visionzip={"dominant": 0.45, "contextual": 0.05})) == (0.45, 0.05, -1)
    assert settings_from_config(config(visionzip={"dominant": 20, "contextual": 4, "layer": -2})) == (20, 4, -2)


def test_tokens_and_ratio_split_54_10():
    assert settings_from_config(config(visionzip={"tokens": 64})) == (54, 10, -1)
    dominant, contextual, _ = settings_from_config(config(visionzip={"ratio": 0.64}))
    assert dominant == pytest.approx(0.54) and contextual == pytest.approx(0.10)


@pytest.mark.parametrize("raw, error, words", [
    ({"dominant": 0.5, "tokens": 10}, ValueError, "not both"),
    ({"dominat": 0.5}, ValueError, "unknown key"),
    ({"layer": 1.5}, TypeError, "layer"),
    ({"ratio": 1.5}, ValueError, "ratio"),
    ([0.65, 0.05], TypeError, "mapping"),
])
def test_bad_settings_name_the_key(raw, error, words):
    with pytest.raises(error, match=words):
        settings_from_config(config(visionzip=raw))
