"""The toy world builds, its oracle trajectories solve every task through the real tools, and
they load back as SFT data token for token."""
import importlib.util
import json
from pathlib import Path

import mmsearch_r1 as core

ROOT = Path(__file__).resolve().parents[1]


def test_prepare_small_world(tmp_path):
    spec = importlib.util.spec_from_file_location("prepare", ROOT / "data" / "toyworld" / "prepare.py")
    prepare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare)
    stats = prepare.main(["--out", str(tmp_path), "--entities", "12", "--tasks", "16"])
    assert stats == {"train": 12, "test": 4, "search_found": 12, "correct": 12}
    for name in ("corpus.jsonl", "images.jsonl", "train.jsonl", "test.jsonl", "sft.jsonl", "model/config.json"):
        assert (tmp_path / name).exists(), name
    policy = core.load_policy(tmp_path / "model")
    record = json.loads((tmp_path / "sft.jsonl").read_text().splitlines()[0])
    assert [m["role"] for m in record["messages"]] == ["system", "user"] + ["assistant", "tool"] * 3 + ["assistant"]
    assert len(record["images"]) == 2 and record["images"][0] != record["images"][1]
    traj = core.trajectory_from_record(policy, record)
    value, parts = core.reward(traj, json.loads((tmp_path / "train.jsonl").read_text().splitlines()[0]))
    assert parts["correct"] == 1.0 and parts["format"] == 1.0 and value == 1.0
