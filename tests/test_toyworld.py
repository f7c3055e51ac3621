"""The toy world: deterministic for a seed, every question type in every split, and its oracle
trajectories load back as SFT data that replays to the right answer."""
import hashlib
import importlib.util
import json
import re
from pathlib import Path

import pytest

import mmsearch_r1 as core
import tools

ROOT = Path(__file__).resolve().parents[1]
RICH = "visual:0.15,whole:0.25,crop:0.3,twohop:0.15,hard:0.15"   # every question type (README: the richer world)


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
    flags = ["--entities", "30", "--tasks", "120", "--vocab", "600", "--mix", RICH, "--redated", "0.5"]
    stats = prepare.main(["--out", str(tmp_path / "a"), *flags, "--no-renumber"])
    assert (stats["train"], stats["val"], stats["test"]) == (90, 6, 24)
    oracle = stats["oracle"]
    assert set(oracle) == {"visual", "whole", "crop", "twohop", "hard"}
    for kind in ("visual", "whole", "twohop"):   # from the image; the top hit is right
        assert oracle[kind][0] == oracle[kind][1] > 0, kind
    for kind in ("crop", "hard"):                 # the fixed corner box finds it (almost) always
        assert 0.8 * oracle[kind][1] <= oracle[kind][0] <= oracle[kind][1], kind
    assert 0 < stats["direct"] < sum(oracle[k][1] for k in ("whole", "crop", "twohop"))   # some from memory
    assert stats["sft"] == sum(a for a, _ in oracle.values())
    assert 0 < stats["recovered"] < oracle["hard"][0]     # some hard trajectories recover from a wrong crop
    assert 0 < stats["expert"] <= oracle["hard"][1]
    out = tmp_path / "a"
    for split in ("train", "val", "test"):
        types = {json.loads(line)["type"] for line in (out / f"{split}.jsonl").read_text().splitlines()}
        assert types == set(oracle), split
    # deterministic for a seed (--no-renumber changes only the re-dated pages' ids: checked below)
    renumbered = prepare.main(["--out", str(tmp_path / "b"), *flags])
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    # every oracle and expert trajectory replays, through the chat format, to the right answer
    policy = core.load_policy(out / "model")
    model = policy.model
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight   # tied, after a reload
    sft, expert = core.load_jsonl(out / "sft.jsonl"), core.load_jsonl(out / "expert.jsonl")
    visits = [m["content"][0]["text"] for r in sft for m in r["messages"]
              if m["role"] == "tool" and m["content"][0].get("text", "").startswith("visit")]
    assert visits and all(re.search(r"URL: http://toyworld.local/page/\d{3}\n\n(Construction was completed in "
                                    r"\d{4}|Its twin is the \w+ \w+)\.$", v) for v in visits)   # the goal's sentence only
    tasks = {t["id"]: t for t in core.load_jsonl(out / "train.jsonl")}
    for record in sft + expert:   # those that read re-dated pages answer the page's year
        assert core.check_trajectory_record(record) is None
        traj = core.trajectory_from_record(policy, record, out)
        value, parts = core.reward(traj, dict(tasks[record["id"]], answers=record.get("answers") or tasks[record["id"]]["answers"]))
        assert parts["correct"] == 1.0 and parts["format"] == 1.0
    # about half the searched trajectories read re-dated pages: there the page, not memory, is right,
    # and no landmark keeps one re-dated year (nor the eval's moved year)
    redated = [r for r in sft if "pages" in r]
    searched = [r for r in sft if '"name": "visit"' in str(r["messages"])]
    assert len(redated) == stats["redated"] and 0.25 * len(searched) < len(redated) < 0.75 * len(searched)
    years = {}
    for r in redated:
        task = tasks[r["id"]]
        page = [m["content"][0]["text"] for m in r["messages"] if m["role"] == "tool"][-1]
        assert f"completed in {r['answers'][0]}." in page and task["answers"][0] not in page
        assert r["answers"][0] not in task["answers"] + task["moved_answers"]
        years.setdefault(task["entity"], []).append(r["answers"][0])
    again = [y for y in years.values() if len(y) > 1]   # landmarks read re-dated more than once
    assert again and sum(len(set(y)) > 1 for y in again) > 0.5 * len(again)
    # with --no-renumber the re-dated pages keep each landmark's page id; by default (the same
    # trajectories otherwise) they are shuffled, so the id visited is rarely the landmark's own
    url = {d["title"]: d["url"] for d in core.load_jsonl(out / "corpus.jsonl")}

    def visited(record):   # (title, url) of each page the trajectory read
        return re.findall(r"Title: (.+)\nURL: (\S+)", "\n".join(m["content"][0].get("text", "") for m in record["messages"]
                                                                 if m["role"] == "tool"))
    assert all(url[title] == u for r in sft for title, u in visited(r))
    shuffled = [r for r in core.load_jsonl(tmp_path / "b" / "sft.jsonl") if "pages" in r]
    assert renumbered["sft"] == stats["sft"] and [r["answers"] for r in shuffled] == [r["answers"] for r in redated]
    reads = [url[title] == u for r in shuffled for title, u in visited(r)]
    assert reads and sum(reads) < 0.2 * len(reads)
    # --views 2: each re-dated task read on two different copies
    two = prepare.main(["--out", str(tmp_path / "c"), *flags, "--views", "2"])
    assert digest(tmp_path / "c") == digest(tmp_path / "b")
    both = [r for r in core.load_jsonl(tmp_path / "c" / "sft.jsonl") if "pages" in r]
    pages = {}
    for r in both:
        pages.setdefault(r["id"], []).append(r["pages"])
    # (views draw from the re-dating stream, so another set of tasks is re-dated: counted per task)
    assert two["redated"] == len(both) > 0 and all(len(set(p)) == len(p) for p in pages.values())
    assert sum(len(p) == 2 for p in pages.values()) > 0.9 * len(pages)   # (a few dropped: a wrong top hit)
    calls = [[m["content"] for m in r["messages"] if m["role"] == "assistant"] for r in expert]
    assert all(tasks[r["id"]]["type"] == "hard" for r in expert)
    assert all(sum('"name": "crop"' in c for c in turns) == 1 for turns in calls)   # the expert crops the right corner
    twohop = [r for r in sft if tasks[r["id"]]["type"] == "twohop" and len(r["messages"]) > 3]
    assert twohop and all('"name": "text_search"' in str(r["messages"]) for r in twohop)
    # some two-hop trajectories misspell the name, get "No results." and revise the query (and are right)
    revised = [r for r in twohop if "No results." in str(r["messages"])]
    assert len(revised) == stats["revised"] and 0 < len(revised) < len(twohop)
    assert all(str(r["messages"]).count('"name": "text_search"') == 2 for r in revised)


def test_too_many_landmarks_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="distinct pictures"):
        prepare_module().main(["--entities", "600", "--out", str(tmp_path)])


def test_too_many_views_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="--views 9: want 1 to 8"):
        prepare_module().main(["--views", "9", "--out", str(tmp_path)])


def test_unknown_question_type_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="unknown question type"):
        prepare_module().main(["--mix", "visual:0.5,riddle:0.5", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="type:share pairs"):
        prepare_module().main(["--mix", "visual", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="shares must be 0 or more"):
        prepare_module().main(["--mix", "visual:-1,crop:1", "--out", str(tmp_path)])


@pytest.mark.parametrize("flags, message", [
    (["--entities", "3"], "want at least 4 landmarks"),
    (["--tasks", "0"], "and 1 task"),
    (["--hidden", "12"], "--hidden 12: want a multiple of 8"),
    (["--init-std", "0"], "--init-std 0.0: want a positive scale"),
    (["--scene-scale", "0"], "--scene-scale 0: want 1"),
    (["--typos", "1.5"], "--typos 1.5: a share, want 0 to 1"),
    (["--test-fraction", "0.9", "--val-fraction", "0.1"], "must stay below 1"),
])
def test_bad_world_flags_stop_before_any_work(tmp_path, flags, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        prepare_module().main(flags + ["--out", str(tmp_path / "w")])
    assert not (tmp_path / "w").exists()


HARD_ONLY = ["--entities", "30", "--tasks", "80", "--vocab", "600", "--mix", "hard:1", "--redated", "0",
             "--hard-memory", "0"]   # a small hard world whose oracle always tries on after a miss


def test_hard_trajectories_check_the_hits_kind(tmp_path):
    """Every hard oracle trajectory copies the top hit's kind into its think after each image search
    (what copy_probe.py scores): "a <asked>." before the visit, "a <other>, not a <asked>." before
    another corner; some recover from a wrong first corner."""
    stats = prepare_module().main(["--out", str(tmp_path), *HARD_ONLY])
    tasks = {t["id"]: t for t in core.load_jsonl(tmp_path / "train.jsonl")}
    misses = 0
    for r in core.load_jsonl(tmp_path / "sft.jsonl"):
        asked = tasks[r["id"]]["question"].split(" the ")[1].split()[0]
        thinks = [m["content"] for m in r["messages"] if m["role"] == "assistant"]
        assert f"<think>The top result is a {asked}. I will read it." in thinks[-2] and '"visit"' in thinks[-2]
        for t in thinks[1:-2]:
            if "The top result is a" in t:
                assert f", not a {asked}. I will try the image's" in t
                misses += 1
    assert misses >= stats["recovered"] > 0


def test_a_world_file_is_written_whole_or_not_at_all(tmp_path):
    """run.py takes sft.jsonl as the sign of a finished world: a killed prepare.py must not leave half of it."""
    def rows():
        yield {"id": "a"}
        raise KeyboardInterrupt   # killed mid-write
    with pytest.raises(KeyboardInterrupt):
        core.write_jsonl(tmp_path / "sft.jsonl", rows())
    assert list(tmp_path.iterdir()) == []   # neither the file nor its temporary one
    core.write_jsonl(tmp_path / "sft.jsonl", [{"id": "a"}, {"id": "b"}])
    assert [r["id"] for r in core.load_jsonl(tmp_path / "sft.jsonl")] == ["a", "b"]


def test_hard_direct(tmp_path):
    """--hard-direct 1: every hard training question is answered from memory (one turn, no tool),
    and the world's other draws stay as they were (the same tasks, questions and scenes)."""
    prepare = prepare_module()
    prepare.main(["--out", str(tmp_path / "a"), *HARD_ONLY])
    stats = prepare.main(["--out", str(tmp_path / "b"), *HARD_ONLY, "--hard-direct", "1"])
    assert digest(tmp_path / "a") != digest(tmp_path / "b")   # train.jsonl records "direct"
    drop = lambda rows: [{k: v for k, v in t.items() if k not in ("direct", "_root")} for t in rows]   # noqa: E731
    for split in ("train", "val", "test"):
        a, b = (core.load_jsonl(tmp_path / w / f"{split}.jsonl") for w in "ab")
        assert drop(a) == drop(b), split
    assert all(t["direct"] for t in core.load_jsonl(tmp_path / "b" / "train.jsonl"))
    assert stats["direct"] == stats["train"] == stats["sft"]
    for r in core.load_jsonl(tmp_path / "b" / "sft.jsonl"):
        assert [m["role"] for m in r["messages"]] == ["system", "user", "assistant"]
        assert r["messages"][-1]["content"].startswith("<think>I know this ")


def test_hard_memory(tmp_path):
    """--hard-memory 1: every hard trajectory whose first corner shows another kind answers from
    memory right after it (crop, image search, answer); the others read the page as before, and
    the tasks stay as they were."""
    prepare = prepare_module()
    prepare.main(["--out", str(tmp_path / "a"), *HARD_ONLY])
    stats = prepare.main(["--out", str(tmp_path / "b"), *HARD_ONLY, "--hard-memory", "1"])
    for split in ("train", "val", "test"):
        a, b = (core.load_jsonl(tmp_path / w / f"{split}.jsonl") for w in "ab")
        assert [dict(t, _root=None) for t in a] == [dict(t, _root=None) for t in b], split
    gave_up = 0
    for r in core.load_jsonl(tmp_path / "b" / "sft.jsonl"):
        thinks = [m["content"] for m in r["messages"] if m["role"] == "assistant"]
        if "I know the" in thinks[-1]:
            gave_up += 1
            assert len(thinks) == 3 and ", not a " in thinks[-1] and "<answer>" in thinks[-1]
        else:
            assert "The top result is a" in thinks[-2] and '"visit"' in thinks[-2] and len(thinks) == 4
    assert gave_up > 0 and stats["recovered"] == 0


def test_hard_decoys(tmp_path):
    """--hard-decoys fountain: every hard scene shows the asked landmark, of another kind, and two
    fountains; the SFT data's misses are all fountains; a world with too few fountains is refused."""
    prepare = prepare_module()
    stats = prepare.main(["--out", str(tmp_path / "a"), *HARD_ONLY, "--hard-decoys", "fountain"])
    kinds = [h["snippet"].split(", a ")[1].split(" in ")[0] for h in core.load_jsonl(tmp_path / "a" / "images.jsonl")]
    for split in ("train", "val", "test"):
        for t in core.load_jsonl(tmp_path / "a" / f"{split}.jsonl"):
            assert t["corners"][t["corner"]] == t["entity"] and kinds[t["entity"]] != "fountain"
            assert sorted(kinds[m] for c, m in t["corners"].items() if c != t["corner"]) == ["fountain"] * 2
    misses = [m["content"] for r in core.load_jsonl(tmp_path / "a" / "sft.jsonl") for m in r["messages"]
              if m["role"] == "assistant" and "I will try" in m["content"]]
    assert stats["recovered"] > 0 and misses and all("The top result is a fountain, not a" in m for m in misses)
    with pytest.raises(SystemExit, match="fewer than two"):
        prepare.main(["--out", str(tmp_path / "b"), *HARD_ONLY, "--entities", "6", "--hard-decoys", "fountain"])


def test_scene_scale(tmp_path):
    """--scene-scale 2: corner scenes twice the size with landmarks of the same TILE pixels (shown to
    the model at half of them); the oracle's crop, in the model's coordinates, cuts the corner's
    tile out of the full image, and its image searches still find the landmarks."""
    prepare = prepare_module()
    stats = prepare.main(["--out", str(tmp_path), *HARD_ONLY, "--mix", "crop:0.5,hard:0.5", "--scene-scale", "2"])
    tasks = core.load_jsonl(tmp_path / "train.jsonl")
    policy = core.load_policy(tmp_path / "model")
    size = (prepare.SCENE[0] * 2, prepare.SCENE[1] * 2)
    assert all(core.load_image(tmp_path / t["image"]).size == size for t in tasks)
    shown = policy.shown_size(core.load_image(tmp_path / tasks[0]["image"]))
    assert shown[0] <= prepare.SCENE[0]   # the model sees the scene at about half its pixels
    boxes = {c: prepare.corner_box(c, size) for c in prepare.CORNERS}
    crops = [m["content"] for r in core.load_jsonl(tmp_path / "sft.jsonl") for m in r["messages"]
             if m["role"] == "assistant" and '"crop"' in m["content"]]
    assert crops
    for call in crops:   # each box, back in the full image's pixels, is one corner's fixed box (a tile and a margin)
        box = json.loads(re.search(r"\[[^\]]*\]", call).group())
        full = [v * size[i % 2] / shown[i % 2] for i, v in enumerate(box)]
        assert any(max(abs(u - v) for u, v in zip(full, b)) <= 2 for b in boxes.values()), (box, full)
    right, total = (sum(stats["oracle"][k][j] for k in ("crop", "hard")) for j in (0, 1))
    assert right >= 0.9 * total


def test_direct_per_question_type(tmp_path):
    """--direct whole:1: every whole training question from memory, crop and twohop always searched;
    a type that is not whole, crop or twohop, a share outside 0-1, or a malformed value is refused."""
    prepare = prepare_module()
    flags = ["--entities", "30", "--tasks", "80", "--vocab", "600", "--mix", "whole:0.5,crop:0.3,twohop:0.2", "--redated", "0"]
    stats = prepare.main(["--out", str(tmp_path / "a"), *flags, "--direct", "whole:1"])
    train = core.load_jsonl(tmp_path / "a" / "train.jsonl")
    assert {t["type"] for t in train} == {"whole", "crop", "twohop"}
    assert all(t["direct"] == (t["type"] == "whole") for t in train)
    assert stats["direct"] == sum(t["type"] == "whole" for t in train)
    for bad, says in [("visual:0.5", "only whole, crop and twohop"), ("whole:1.5", "want 0 to 1"), ("half", "type:share")]:
        with pytest.raises(SystemExit, match=says):
            prepare.main(["--out", str(tmp_path / "b"), *flags, "--direct", bad])


def test_say_url(tmp_path):
    """The think before each visit ends by naming the url the call opens (--say-url, the default);
    everything else is the trajectories prepare.py writes with --no-say-url."""
    prepare = prepare_module()
    flags = ["--entities", "30", "--tasks", "80", "--vocab", "600", "--mix", "whole:0.3,crop:0.2,twohop:0.3,hard:0.2"]
    prepare.main(["--out", str(tmp_path / "a"), *flags])
    prepare.main(["--out", str(tmp_path / "b"), *flags, "--no-say-url"])
    assert digest(tmp_path / "a") == digest(tmp_path / "b")   # the same world, tasks and scenes
    visits = 0
    for a, b in zip(*(core.load_jsonl(tmp_path / w / "sft.jsonl") for w in "ab")):
        assert len(a["messages"]) == len(b["messages"])
        for turn_a, turn_b in zip(a["messages"], b["messages"]):
            calls = tools.parse_tool_calls(turn_a["content"])[0] if turn_a["role"] == "assistant" else []
            if calls and calls[0]["name"] == "visit":
                url = calls[0]["arguments"]["url"]
                assert turn_a["content"] == turn_b["content"].replace("</think>", f" It is at {url}.</think>", 1)
                visits += 1
            else:
                assert turn_a == turn_b
    assert visits > 20
