"""The main command end to end on a small world (data/toyworld/run.py --fast): every stage runs,
the tables and pages are written, and a second run skips what is finished."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_main_command_fast_variant(tmp_path):
    out = tmp_path / "toy"
    cmd = [sys.executable, str(ROOT / "data" / "toyworld" / "run.py"), "--fast", "--out", str(out)]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for stage in ("world", "sft", "grpo"):
        assert f"[{stage}] done" in first.stdout
    table = (out / "results.md").read_text()
    for row in ("init (tools)", "sft (no tools)", "grpo (tools)", "acc crop", "acc visual", "acc whole",
                "acc twohop", "acc hard", "acc unseen", "turns (hard)"):   # every question type of the default world
        assert row in table, row
    assert json.loads((out / "grpo" / "args.json").read_text())["max_turns"] == 6      # Mini-o3: a short budget
    assert json.loads((out / "eval_grpo" / "summary.json").read_text())["settings"]["max_turns"] == 8   # more at test
    assert "sft: on hard, " in table and "grpo: on hard, " in table
    assert "answered with the page's (moved) year" in table and (out / "eval_grpo_moved" / "summary.json").exists()
    moved = (out / "world" / "corpus_moved.jsonl").read_text()
    assert "completed in" in moved and moved != (out / "world" / "corpus.jsonl").read_text()
    assert "<svg" in (out / "curves.html").read_text() and (out / "eval_grpo" / "report.html").exists()
    rows = [json.loads(line) for line in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1)) and rows[-1]["dlogp_max"] < 1e-3
    # the copy probe scores the SFT checkpoints on the expert trajectories: every url and quoted year digit
    sys.path.insert(0, str(ROOT / "data" / "toyworld"))
    import copy_probe
    expert = [json.loads(line) for line in (out / "world" / "expert.jsonl").read_text().splitlines()]
    probed = copy_probe.main([str(out / "sft"), str(out / "world")])
    assert [r["checkpoint"] for r in probed][-1] == "final" and len(probed) >= 2
    assert all(r["year_digits"] == 4 * len(expert) and r["url_digits"] >= 3 * len(expert) for r in probed)
    assert all(0 < r[k] < 1 for r in probed for k in ("url_p", "url_think_p", "url_call_p", "year_p"))
    # ... and the kind check after every image search of the hard SFT trajectories
    train = {t["id"]: t for t in map(json.loads, (out / "world" / "train.jsonl").read_text().splitlines())}
    sft = [json.loads(line) for line in (out / "world" / "sft.jsonl").read_text().splitlines()]
    hard = {i for i, t in train.items() if t["type"] == "hard"}
    searches = sum('"name": "image_search"' in m["content"] for r in sft if r["id"] in hard
                   for m in r["messages"] if m["role"] == "assistant")
    assert all(r["kinds"] == r["matches"] + r["misses"] == searches > 0 and r["matches"] and r["misses"] for r in probed)
    assert all(0 < r[k] < 1 for r in probed for k in ("kind_p", "read_on_match_p", "go_on_after_miss_p"))
    # ... and the corner the first think of a searched crop trajectory copies from the question (two tokens)
    corners = sum(f"image's {train[r['id']]['corner']} corner" in r["messages"][2]["content"]
                  for r in sft if train[r["id"]]["type"] == "crop")
    assert all(r["corner_tokens"] == 2 * min(corners, 200) > 0 and 0 < r["corner_p"] < 1 for r in probed)
    # ... and the twin's name a two-hop trajectory copies from the page into its think and its query
    twins = sum(train[r["id"]]["type"] == "twohop" and sum('"text_search"' in m["content"] for m in r["messages"]
                                                          if m["role"] == "assistant") == 1 for r in sft)
    assert all(r["twins"] == min(twins, 200) > 0 and 0 < r["twin_think_p"] < 1 and 0 < r["twin_query_p"] < 1
               for r in probed)
    assert copy_probe.main([str(out / "sft"), str(out / "world")]) == []   # done: skipped
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "] done" not in again.stdout          # every stage skipped
    assert "| grpo (tools) |" in again.stdout
    other = subprocess.run(cmd + ["--seed", "1"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert other.returncode != 0 and "--seed 0 there, 1 now" in other.stderr   # other settings: refused, clearly


def test_main_command_with_ahpo(tmp_path):
    """--ahpo: GRPO also learns from the world's expert trajectories where a group had no success (and the
    SFT flags reach train_sft)."""
    out = tmp_path / "ahpo"
    cmd = [sys.executable, str(ROOT / "data" / "toyworld" / "run.py"), "--fast", "--out", str(out), "--ahpo",
           "--sft-min-lr-ratio", "0.5", "--sft-weight-decay", "0.05"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    sft = json.loads((out / "sft" / "args.json").read_text())
    assert (sft["min_lr_ratio"], sft["weight_decay"]) == (0.5, 0.05)   # passed on to train_sft
    settings = json.loads((out / "grpo" / "args.json").read_text())
    assert settings["expert_data"].endswith("expert.jsonl")
    expert = (out / "world" / "expert.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert expert and sum(r["ahpo"] for r in rows) > 0   # AHPO fired on groups with no success


def test_killing_the_main_command_stops_its_stages(tmp_path):
    """SIGTERM to run.py ends the stages it is running side by side too (else they would go on
    writing into the folder)."""
    pid_files = [tmp_path / f"stage{i}.pid" for i in range(2)]
    stages = [f"import os, time; open({str(f)!r}, 'w').write(str(os.getpid())); time.sleep(120)" for f in pid_files]
    driver = (f"import signal, sys; sys.path.insert(0, {str(ROOT / 'data' / 'toyworld')!r}); import run; "
              "signal.signal(signal.SIGTERM, run.stop_on_signal); "
              f"run.run([('a', [sys.executable, '-c', {stages[0]!r}]), ('b', [sys.executable, '-c', {stages[1]!r}])], "
              f"{str(tmp_path / 'log.txt')!r})")
    proc = subprocess.Popen([sys.executable, "-c", driver], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 60
    while not all(f.exists() and f.read_text() for f in pid_files) and time.time() < deadline:
        time.sleep(0.1)
    children = [int(f.read_text()) for f in pid_files]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "stopped by signal" in err and "run the same command again" in err
    for child in children:
        with pytest.raises(ProcessLookupError):   # the stage is gone (killed and reaped), not running on
            os.kill(child, 0)


def test_a_failing_stage_stops_the_others_with_its_log(tmp_path):
    """Side by side, the first stage that fails stops the pipeline with the end of its own log, and
    the stage still running is killed; the stages' logs end up in log.txt."""
    sys.path.insert(0, str(ROOT / "data" / "toyworld"))
    import run
    log = tmp_path / "log.txt"
    fail = "import sys; print('reading the world'); sys.exit('bad world: no tasks')"
    slow = "import time; print('slow stage', flush=True); time.sleep(120)"
    t0 = time.time()
    with pytest.raises(SystemExit) as e:
        run.run([("eval a", [sys.executable, "-c", slow]), ("eval b", [sys.executable, "-c", fail])], log)
    assert "[eval b] failed (exit 1)" in str(e.value) and "bad world: no tasks" in str(e.value)
    assert time.time() - t0 < 60                          # the slow one was killed, not waited for
    assert "bad world: no tasks" in log.read_text() and "slow stage" in log.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.txt"]   # the stages' own logs went into it


def test_stage_table_counts_unseen_landmarks_apart():
    sys.path.insert(0, str(ROOT / "data" / "toyworld"))
    import run
    sample = lambda ok, calls: {"correct": ok, "tool_calls": calls, "turns": 3, "finish_reason": "answer"}
    results = [{"id": "a", "samples": [sample(1.0, {"image_search": 1})]},
               {"id": "b", "samples": [sample(0.0, {"image_search": 1})]},
               {"id": "c", "samples": [sample(1.0, {})]}]
    row = run.stage_table("grpo", results, {"a": "whole", "b": "whole", "c": "visual"}, unseen={"b"})
    assert row["acc"] == 2 / 3 and row["acc whole"] == 0.5 and row["acc unseen"] == 0.0
    assert "acc unseen" not in run.stage_table("grpo", results, {"a": "whole", "b": "whole", "c": "visual"})


def test_hard_line_reads_what_follows_each_image_search():
    sys.path.insert(0, str(ROOT / "data" / "toyworld"))
    import run
    def hit(kind):
        return {"role": "tool", "content": [{"type": "text", "text": f"image_search {{}}\n1. Kalo (u)\n   Kalo, a {kind} in Renville."}]}
    def call(name):
        return {"role": "assistant", "content": f'<think>.</think>\n<tool_call>\n{{"name": "{name}", "arguments": {{}}}}\n</tool_call>'}
    tries = [hit("tower"), call("crop"), hit("statue"), call("visit")]   # a miss, another corner, a match, a visit
    gives_up = [hit("gate"), {"role": "assistant", "content": "<think>.</think>\n<answer>1900</answer>"}]
    broken = [hit("gate"), {"role": "assistant", "content": '<think>The top result is a "arguments": [4'}]
    results = [{"id": "h", "samples": [{"trajectory": {"messages": m}} for m in (tries, gives_up, broken)]},
               {"id": "w", "samples": [{"trajectory": {"messages": [hit("bridge"), call("visit")]}}]}]
    tasks = {"h": {"type": "hard", "question": "In what year was the statue in this image completed?"},
             "w": {"type": "whole", "question": "In what year was this bridge completed?"}}
    assert run.hard_line("sft", results, tasks) == ("sft: on hard, after a miss: another corner 1, answer 1, "
                                                    "neither (malformed) 1; after a match: visit 1")
    assert run.hard_line("sft", results[1:], tasks) == "sft: on hard, no image search"


def test_flags_for_a_stage_may_be_one_flag():
    """--world-args --renumber is prepare.py's flag, not an unknown one of run.py's."""
    sys.path.insert(0, str(ROOT / "data" / "toyworld"))
    import run
    args = run.parse_args(["--world-args", "--renumber", "--grpo-args", "--advantage grpo", "--seed", "2"])
    assert (args.world_args, args.grpo_args, args.seed) == ("--renumber", "--advantage grpo", 2)
    assert run.parse_args(["--world-args=--redated 0"]).world_args == "--redated 0"


def test_a_world_from_an_older_prepare_is_a_clear_error(tmp_path):
    sys.path.insert(0, str(ROOT / "data" / "toyworld"))
    import run
    (tmp_path / "world").mkdir()
    (tmp_path / "world" / "sft.jsonl").write_text("")
    with pytest.raises(SystemExit, match="older prepare.py"):
        run.main(["--out", str(tmp_path)])


def test_bad_flags_stop_before_any_stage(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "data" / "toyworld"))
    import run
    (tmp_path / "file").write_text("x")
    for flags, message in [(["--sft-steps", "-1"], "--sft-steps -1: the counts"),
                           (["--temperature", "0"], "--temperature 0.0: the counts, learning rates and temperature"),
                           (["--sft-min-lr-ratio", "2"], "--sft-min-lr-ratio 2.0"),
                           (["--sft-weight-decay", "-0.1"], "--sft-weight-decay -0.1: the counts"),
                           (["--out", str(tmp_path / "file")], "is a file; give a folder")]:
        with pytest.raises(SystemExit):
            run.parse_args(flags)
        assert message in capsys.readouterr().err
