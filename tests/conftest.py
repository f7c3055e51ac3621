"""Shared fixtures: tiny policies of the real architectures, built once per test session."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mmsearch_r1 as core  # noqa: E402

TEXTS = ["What is in this image? <think>Let me look closer.</think> The answer is Paris.",
         "The Eiffel Tower is a wrought-iron lattice tower in Paris, France.",
         "crop image_search text_search visit bbox query url goal results title snippet"] * 10


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return core.build_tiny_policy(tmp_path_factory.mktemp("tiny25"), TEXTS, family="qwen2_5_vl")


@pytest.fixture(scope="session")
def policy(tiny_dir):
    return core.load_policy(tiny_dir)


@pytest.fixture(scope="session")
def policy3(tmp_path_factory):
    return core.load_policy(core.build_tiny_policy(tmp_path_factory.mktemp("tiny3"), TEXTS, family="qwen3_vl"))
