"""The toy world: deterministic for a seed, every question type in every split, and its oracle
trajectories load back as SFT data that replays to the right answer."""
import hashlib
import importlib.util
import json
import re
from pathlib import Path

import pytest

import mmsearch_r1 as core

ROOT = Path(__file__).resolve().parents[1]


def prepare_module():
    spec = importlib.util.spec_from_file_location("prepare", ROOT / "data" / "toyworld" / "prepare.py")
    prepare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare)
    return prepare


def digest(folder):
    return hashlib.sha256(b"".join((folder / n).read_bytes() for n in
                                   ("corpus.jsonl", "images.jsonl", "train.jsonl", "val.jsonl", "test.jsonl"))).hexdigest()


def test_prepare_small_world(tmp_path):
    prepare = prepare_module()
    flags = ["--entities", "24", "--tasks", "90", "--vocab", "600"]
    stats = prepare.main(["--out", str(tmp_path / "a"), *flags])
    assert (stats["train"], stats["val"], stats["test"]) == (68, 4, 18)
    visual, whole, crop = (stats["oracle"][k] for k in ("visual", "whole", "crop"))
    assert visual[0] == visual[1] > 0 and whole[0] == whole[1] > 0   # from the image; the top hit is right
    assert 0.9 * crop[1] <= crop[0] <= crop[1]             # the fixed corner box finds it (almost) always
    assert 0 < stats["direct"] < whole[1] + crop[1]        # some knowledge questions answered from memory
    assert stats["sft"] == visual[0] + whole[0] + crop[0]
    out = tmp_path / "a"
    for split in ("train", "val", "test"):
        types = {json.loads(line)["type"] for line in (out / f"{split}.jsonl").read_text().splitlines()}
        assert types == {"visual", "whole", "crop"}, split
    # deterministic for a seed
    prepare.main(["--out", str(tmp_path / "b"), *flags])
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    # every oracle trajectory replays, through the chat format, to the right answer
    policy = core.load_policy(out / "model")
    model = policy.model
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight   # tied, after a reload
    visits = [m["content"][0]["text"] for r in core.load_jsonl(out / "sft.jsonl") for m in r["messages"]
              if m["role"] == "tool" and m["content"][0].get("text", "").startswith("visit")]
    assert visits and all(re.search(r"URL: http://toyworld.local/page/\d{3}\n\nConstruction was completed in "
                                    r"\d{4}\.$", v) for v in visits)   # a numbered page, the goal's sentence only
    tasks = {t["id"]: t for t in core.load_jsonl(out / "train.jsonl")}
    for record in core.load_jsonl(out / "sft.jsonl"):
        assert core.check_trajectory_record(record) is None
        traj = core.trajectory_from_record(policy, record, out)
        value, parts = core.reward(traj, tasks[record["id"].rsplit("_", 1)[0]] if record["id"] not in tasks
                                   else tasks[record["id"]])
        assert parts["correct"] == 1.0 and parts["format"] == 1.0


def test_too_many_landmarks_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="distinct pictures"):
        prepare_module().main(["--entities", "600", "--out", str(tmp_path)])
