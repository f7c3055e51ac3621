"""train_sft.py and the training pieces of the core: the loss sees only what the policy writes,
the gradient does not depend on the micro-batch split, LoRA, resume after a kill, bad records."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import mmsearch_r1 as core
import train_sft

ROOT = Path(__file__).resolve().parents[1]


def call(name, **arguments):
    return core.format_tool_call(name, arguments)


def make_records(folder, n=4):
    """n short trajectories (question image, crop, search, answer) with their image files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        Image.new("RGB", (60 + 8 * i, 40), (40 * i, 100, 200)).save(folder / f"q{i}.png")
        Image.new("RGB", (28, 28), (200, 40 * i, 10)).save(folder / f"c{i}.png")
        city = ["Paris", "London", "Rome", "Berlin", "Madrid", "Oslo"][i % 6]
        records.append({"id": f"r{i}", "images": [f"q{i}.png", f"c{i}.png"], "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"Where is tower {i}?"}]},
            {"role": "assistant", "content": "<think>zoom in</think>\n" + call("crop", bbox_2d=[0, 0, 20 + i, 20])},
            {"role": "tool", "content": [{"type": "text", "text": "crop:"}, {"type": "image"}]},
            {"role": "assistant", "content": "<think>search</think>\n" + call("text_search", query=f"tower {i}" * (i + 1))},
            {"role": "tool", "content": f"1. Tower {i} ({city})"},
            {"role": "assistant", "content": f"<think>found it</think>\n<answer>{city}</answer>"}]})
    path = folder / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path, records


def trajs_of(policy, path):
    return [core.trajectory_from_record(policy, r, r["_root"]) for r in core.load_jsonl(path)]


def grads_of(policy, micro_batches, n_tokens):
    policy.model.zero_grad(set_to_none=True)
    loss = train_sft.accumulate_gradients(policy, micro_batches, n_tokens)
    grads = {n: p.grad.clone() for n, p in policy.model.named_parameters() if p.grad is not None}
    policy.model.zero_grad(set_to_none=True)
    return loss, grads


def test_same_gradient_whatever_the_micro_batch_split(policy, tmp_path):
    path, _ = make_records(tmp_path, 4)
    trajs = trajs_of(policy, path)
    assert len({len(t.input_ids) for t in trajs}) == 4          # different lengths, so the split matters
    n_tokens = sum(sum(t.loss_mask) for t in trajs)
    loss1, g1 = grads_of(policy, [trajs], n_tokens)
    loss4, g4 = grads_of(policy, [[t] for t in trajs], n_tokens)
    assert loss1 == pytest.approx(loss4, rel=1e-5)
    for name in g1:
        torch.testing.assert_close(g4[name], g1[name], rtol=1e-4, atol=1e-7)
    # a mean of per-micro-batch means weights the tokens of short trajectories more: measurably
    # different gradients (so this test can fail)
    policy.model.zero_grad(set_to_none=True)
    for t in trajs:
        (core.masked_nll(policy, core.collate(policy, [t]), sum(t.loss_mask)) / len(trajs)).backward()
    g_means = {n: p.grad.clone() for n, p in policy.model.named_parameters() if p.grad is not None}
    policy.model.zero_grad(set_to_none=True)
    assert max((g_means[n] - g1[n]).abs().max() / g1[n].abs().max() for n in g1) > 1e-2


def test_masked_tokens_change_nothing(policy, tmp_path):
    """A trailing tool response or user prompt (after the last assistant turn) is context for nothing:
    changing its tokens leaves loss and gradients unchanged. Changing an assistant token does not."""
    _, records = make_records(tmp_path, 1)
    base = records[0]

    def with_tail(role, text, answer="Paris"):
        msgs = [dict(m) for m in base["messages"]]
        msgs[-1] = {"role": "assistant", "content": f"<think>found it</think>\n<answer>{answer}</answer>"}
        return {**base, "messages": msgs + [{"role": role, "content": text}]}

    def loss_and_grads(record):
        traj = core.trajectory_from_record(policy, record, tmp_path)
        return grads_of(policy, [[traj]], sum(traj.loss_mask))

    for role in ("tool", "user"):
        loss_a, ga = loss_and_grads(with_tail(role, "the result is 1889."))
        loss_b, gb = loss_and_grads(with_tail(role, "something else entirely, and longer: Rome, 2024!"))
        assert loss_a == loss_b
        for n in ga:   # equal up to float summation order (the sequences differ in length)
            torch.testing.assert_close(gb[n], ga[n], rtol=1e-5, atol=1e-8)
    loss_c, _ = loss_and_grads(with_tail("tool", "the result is 1889.", answer="Madrid"))
    assert loss_c != loss_a


def test_overfits_a_handful_of_trajectories(tiny_dir, tmp_path):
    path, _ = make_records(tmp_path / "data", 4)
    train_sft.main(["--model", str(tiny_dir), "--data", str(path), "--out", str(tmp_path / "run"), "--steps", "60",
                    "--lr", "1e-2", "--warmup", "5", "--batch-tokens", "100000", "--save-every", "1000", "--quiet"])
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 60 and losses[-1] < losses[0] / 5, (losses[0], losses[-1])
    policy = core.load_policy(tmp_path / "run" / "final")              # final/ is a plain model folder
    assert policy.model_type == "qwen2_5_vl"


def test_lora_adapters_only_merge_and_zero(tiny_dir, tmp_path):
    path, _ = make_records(tmp_path, 2)
    base = core.load_policy(tiny_dir)
    policy = core.load_policy(tiny_dir)
    trajs = trajs_of(policy, path)
    batch = core.collate(policy, trajs)
    with torch.no_grad():
        ref, _ = core.sequence_logprobs(base, batch)
    core.add_lora(policy.model, rank=4, alpha=8)
    with torch.no_grad():
        zero, _ = core.sequence_logprobs(policy, batch)
    assert torch.equal(zero, ref)                                    # B = 0: exactly the base model
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    params = core.trainable_parameters(policy.model)
    assert params and all(".lora_" in n for n, p in policy.model.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(3):
        train_sft.accumulate_gradients(policy, [trajs], sum(sum(t.loss_mask) for t in trajs))
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in policy.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".lora_" in n for n in changed)
    with torch.no_grad():
        adapted, _ = core.sequence_logprobs(policy, batch)
        with core.lora_disabled(policy.model):
            off, _ = core.sequence_logprobs(policy, batch)
    assert not torch.allclose(adapted, ref) and torch.equal(off, ref)
    core.save_weights(policy, tmp_path / "lora_ckpt", base=tiny_dir)
    merged = core.load_policy(tmp_path / "lora_ckpt")                # base + adapters, merged
    with torch.no_grad():
        m, _ = core.sequence_logprobs(merged, core.collate(merged, trajs))
    torch.testing.assert_close(m, adapted, atol=1e-5, rtol=0)
    train_sft.main(["--merge", str(tmp_path / "lora_ckpt"), "--out", str(tmp_path / "merged")])
    assert (tmp_path / "merged" / "config.json").exists() and not (tmp_path / "merged" / "lora.json").exists()


@pytest.mark.parametrize("lora", [False, True])
def test_resume_after_kill_equals_uninterrupted(tiny_dir, tmp_path, lora):
    path, _ = make_records(tmp_path / "data", 6)
    flags = ["--model", str(tiny_dir), "--data", str(path), "--steps", "40", "--lr", "3e-3", "--warmup", "3",
             "--batch-tokens", "1200", "--grad-accum", "2", "--save-every", "5", "--keep-last", "2", "--quiet"]
    flags += ["--lora-rank", "4"] if lora else []
    script = str(ROOT / "train_sft.py")
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, script, *flags, "--out", str(killed)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "step_000010").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "final").exists(), "the run finished before it could be killed"
    out = subprocess.run([sys.executable, script, *flags, "--out", str(killed), "--resume"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    resumed_at = int(out.split("at step ")[1].split()[0])
    assert 10 <= resumed_at < 40
    train_sft.main([*flags, "--out", str(tmp_path / "straight")])
    for name in ("adapters.safetensors",) if lora else ("model.safetensors",):
        a = load_file(str(killed / "step_000040" / name))
        b = load_file(str(tmp_path / "straight" / "step_000040" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 41))                                # no step lost or logged twice


BAD = {
    "missing image": ({"images": ["nope.png"], "messages": [{"role": "user", "content": [{"type": "image"}]},
                                                            {"role": "assistant", "content": "<answer>x</answer>"}]},
                      "can't be read"),
    "unknown role": ({"messages": [{"role": "robot", "content": "hi"}]}, "unknown role 'robot'"),
    "tool without a call": ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "hm"},
                                          {"role": "tool", "content": "r"}]}, "no assistant tool call before it"),
    "call does not parse": ({"messages": [{"role": "user", "content": "q"},
                                          {"role": "assistant", "content": "<tool_call>{oops</tool_call>"},
                                          {"role": "tool", "content": "r"}]}, "does not parse"),
    "more image parts than images": ({"messages": [{"role": "user", "content": [{"type": "image"}]},
                                                   {"role": "assistant", "content": "<answer>x</answer>"}]},
                                     "1 image part(s) in the messages but 0 image(s) listed"),
    "no messages": ({"id": "x"}, "no 'messages' list"),
    "no assistant turn": ({"messages": [{"role": "user", "content": "q"}]}, "no assistant turn"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_record_messages(case):
    record, message = BAD[case]
    assert message in core.check_trajectory_record(record)


def test_bad_records_stop_or_are_skipped(tiny_dir, tmp_path, capsys):
    path, records = make_records(tmp_path, 2)
    lines = [json.dumps(r) for r in records] + [json.dumps(b[0]) for b in BAD.values()] + ["[1, 2]"]
    path.write_text("\n".join(lines[:2] + lines[2:-1]) + "\n")
    with pytest.raises(SystemExit, match=r"sft.jsonl:3: image 'nope.png' can't be read.*--skip-bad"):
        train_sft.main(["--model", str(tiny_dir), "--data", str(path), "--out", str(tmp_path / "a"), "--quiet"])
    out = tmp_path / "b"
    train_sft.main(["--model", str(tiny_dir), "--data", str(path), "--out", str(out), "--quiet", "--skip-bad",
                    "--steps", "1"])
    assert f"{len(lines) - 1} records: 2 used, {len(BAD)} bad (skipped)" in capsys.readouterr().out
    (tmp_path / "junk.jsonl").write_text(lines[-1] + "\n")
    with pytest.raises(ValueError, match="junk.jsonl:1: a line must be a JSON object"):
        core.load_jsonl(tmp_path / "junk.jsonl")
    with pytest.raises(SystemExit, match="train_sft: .*junk.jsonl:1: a line must be a JSON object.*--skip-bad"):
        train_sft.main(["--model", str(tiny_dir), "--data", str(tmp_path / "junk.jsonl"), "--out", str(tmp_path / "c")])
    # lines that are not JSON objects (a list, a half-written line, bytes that are not UTF-8) are bad records too
    with open(path, "ab") as f:
        f.write(b"[1, 2]\n\xff\xfe\n" + lines[0][:40].encode() + b"\n")
    train_sft.main(["--model", str(tiny_dir), "--data", str(path), "--out", str(tmp_path / "d"), "--quiet", "--skip-bad",
                    "--steps", "1"])
    assert f"{len(lines) + 2} records: 2 used, {len(BAD) + 3} bad (skipped)" in capsys.readouterr().out
    assert core.load_jsonl(path, bad := [])[-1]["_line"] == len(lines) - 1
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + lines[0].encode() + b"\n")   # a byte-order mark
    assert core.load_jsonl(tmp_path / "bom.jsonl")[0]["id"] == json.loads(lines[0])["id"]
    assert [b.split(":", 2)[1:] for b in bad] == [[str(len(lines)), " a line must be a JSON object, got list"],
                                                  [str(len(lines) + 1), " not UTF-8 text"],
                                                  [str(len(lines) + 2), " not valid JSON (Invalid control character at)"]]


def test_long_records_are_cut_at_a_turn_boundary(policy, tmp_path):
    path, records = make_records(tmp_path, 1)
    full = core.trajectory_from_record(policy, core.load_jsonl(path)[0], tmp_path)
    record = core.load_jsonl(path)[0]
    traj, cut = train_sft.cut_to_fit(policy, record, len(full.input_ids) - 1)
    assert traj is not None and len(traj.input_ids) < len(full.input_ids)
    assert cut["messages"][-1]["role"] == "assistant" and len(cut["messages"]) < len(record["messages"])
    assert train_sft.cut_to_fit(policy, record, 10)[0] is None


def test_trajectories_are_kept_within_the_memory_budget(policy, tmp_path):
    path, _ = make_records(tmp_path, 4)
    rebuilt = trajs_of(policy, path)
    assert all("_traj" not in r for r in train_sft.load_sft_data(path, policy, 8192, False, True, 0)[0])
    two = sum(train_sft.trajectory_bytes(t) for t in rebuilt[:2])
    records, _, _, counts = train_sft.load_sft_data(path, policy, 8192, False, True, (two + 1) / 2**20)
    assert counts["kept"] == 2 and ["_traj" in r for r in records] == [True, True, False, False]
    for record, traj in zip(records, rebuilt):       # kept or built again: the same trajectory
        kept = train_sft.trajectory(policy, record)
        assert kept.input_ids == traj.input_ids and kept.loss_mask == traj.loss_mask
        for (p1, g1), (p2, g2) in zip(kept.image_inputs, traj.image_inputs, strict=True):
            assert torch.equal(p1, p2) and torch.equal(g1, g2)


def test_bad_flags(tmp_path, capsys):
    (tmp_path / "f").write_text("")
    for flags, message in [([], "--model and --data are required"),
                           (["--model", "m", "--data", "missing.jsonl"], "missing.jsonl: no such file"),
                           (["--model", "m", "--data", str(tmp_path / "f"), "--out", str(tmp_path / "f")], "is a file"),
                           (["--model", "m", "--data", str(tmp_path / "f"), "--lr", "0"], "must be positive"),
                           (["--model", "m", "--data", str(tmp_path / "f"), "--max-turns", "0"], "--max-turns must be positive")]:
        with pytest.raises(SystemExit):
            train_sft.parse_args(flags)
        assert message in capsys.readouterr().err


def test_a_save_killed_midway_leaves_no_final(policy, tmp_path, monkeypatch):
    """final/config.json says "trained" to run.py and to users: it must not exist before the weights do."""
    save_weights = core.save_weights

    def killed(policy, folder, **kwargs):   # config.json written, then the process dies
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "config.json").write_text("{}")
        raise KeyboardInterrupt
    monkeypatch.setattr(core, "save_weights", killed)
    with pytest.raises(KeyboardInterrupt):
        core.save_final(policy, tmp_path)
    assert not (tmp_path / "final").exists()
    monkeypatch.setattr(core, "save_weights", save_weights)
    (tmp_path / "final").mkdir()   # and a final/ of an earlier run is replaced
    assert core.load_policy(core.save_final(policy, tmp_path)).model_type == policy.model_type
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_trim_metrics_drops_later_steps_and_a_half_written_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.5}\n{"step": 2, "loss": 2.0}\n{"step": 3, "loss": 1.5}\n{"step": 4, "lo')
    core.trim_metrics(path, 2)
    assert path.read_text() == '{"step": 1, "loss": 2.5}\n{"step": 2, "loss": 2.0}\n'


def test_resume_point_refuses_a_used_folder_and_starts_fresh_on_an_empty_one(tmp_path, capsys):
    assert core.resume_point(tmp_path, False, "train_sft") is None   # a new run in an empty folder
    assert core.resume_point(tmp_path, True, "train_sft") is None
    assert "--resume but no checkpoint" in capsys.readouterr().out
    for step in (5, 10):
        (tmp_path / f"step_{step:06d}").mkdir()
        (tmp_path / f"step_{step:06d}" / "trainer.pt").write_bytes(b"")
    (tmp_path / "step_000015").mkdir()   # cut short: no trainer.pt, not a checkpoint
    with pytest.raises(SystemExit, match="already has checkpoints; pass --resume"):
        core.resume_point(tmp_path, False, "train_grpo")
    assert core.resume_point(tmp_path, True, "train_grpo").name == "step_000010"
    assert core.start_step(None, None, None, tmp_path / "metrics.jsonl", True, "train_sft") == 0


def test_a_bad_data_file_stops_before_the_model_loads(tmp_path, monkeypatch):
    def load_policy(*args, **kwargs):
        raise AssertionError("the model was loaded before the data file was read")
    monkeypatch.setattr(core, "load_policy", load_policy)
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}]}) + "\n")
    with pytest.raises(SystemExit, match="sft.jsonl:1: no assistant turn"):
        train_sft.main(["--model", str(tmp_path / "model"), "--data", str(path), "--out", str(tmp_path / "run")])


def test_checkpoint_state_is_read_onto_the_cpu_and_keeps_one_gpu_rng(policy, tmp_path, monkeypatch):
    """What a GPU run saves and resumes, checked without a GPU: only this process's CUDA RNG state
    (get_rng_state_all would open a context on every visible GPU), and trainer.pt read with
    map_location="cpu" (the optimizer moves its state to the parameters' devices)."""
    state = torch.tensor([7], dtype=torch.uint8)
    restored, loads = [], []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: state)
    monkeypatch.setattr(torch.cuda, "set_rng_state", restored.append)
    for every_gpu in ("get_rng_state_all", "set_rng_state_all"):
        monkeypatch.setattr(torch.cuda, every_gpu, lambda *a: pytest.fail(f"{every_gpu} touches every GPU"))
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: loads.append(kw.get("map_location")) or real_load(*a, **kw))
    optimizer = torch.optim.AdamW(policy.model.parameters(), lr=1e-3)
    folder = core.save_checkpoint(tmp_path, 3, policy, optimizer, {"step": 3}, {"model": "m"})
    assert core.load_trainer_state(folder, optimizer)["step"] == 3
    assert loads == ["cpu"] and len(restored) == 1 and torch.equal(restored[0], state)


def test_eval_tasks_are_read_as_eval_reads_them_before_the_model_loads(tiny_dir, tmp_path, monkeypatch):
    path, _ = make_records(tmp_path, 2)
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps({"id": "t", "question": "Q?", "answer": "x"}) + "\n")   # no image
    monkeypatch.setattr(core, "load_policy", lambda *a, **k: pytest.fail("the model loaded first"))
    with pytest.raises(SystemExit, match="train_sft: .*tasks.jsonl line 1: no image"):
        train_sft.main(["--model", str(tiny_dir), "--data", str(path), "--out", str(tmp_path / "run"),
                        "--eval-tasks", str(tasks), "--corpus", str(path), "--quiet"])
