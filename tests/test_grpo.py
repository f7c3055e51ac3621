"""train_grpo.py: advantages, the clipped loss and its aggregations, k3 KL, masks, AHPO, and the
loop itself: GRPO raises the reward of an SFT-started tiny policy, and resumes exactly after a kill."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mmsearch_r1 as core
import tools
import train_grpo as grpo

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------- advantages


def test_loo_advantages_worked_examples():
    assert grpo.loo_advantages([1, 0, 1, 1], 2).tolist() == [1, -1, 0, 0]
    torch.testing.assert_close(grpo.loo_advantages([1, 0, 0, 0], 4), torch.tensor([1, -1 / 3, -1 / 3, -1 / 3]))
    assert grpo.loo_advantages([0.5, 0.5, 0.5], 3).tolist() == [0, 0, 0]            # all equal: no signal
    assert grpo.loo_advantages([1, 0, 1], 1).tolist() == [0, 0, 0]                  # groups of one
    # an unscorable reward gets 0 and leaves the statistics: [1, None, 0] is the group [1, 0]
    assert grpo.loo_advantages([1, None, 0], 3).tolist() == [1, 0, -1]
    assert grpo.loo_advantages([None, 1], 2).tolist() == [0, 0]                    # no scorable group-mate


def test_grpo_and_drgrpo_advantages():
    torch.testing.assert_close(grpo.grpo_advantages([1, 0, 0, 1], 2, scale=False), torch.tensor([0.5, -0.5, -0.5, 0.5]))
    a = grpo.grpo_advantages([1, 0, 0, 0], 4)                      # mean 0.25, unbiased std 0.5
    torch.testing.assert_close(a, torch.tensor([1.5, -0.5, -0.5, -0.5]), atol=1e-5, rtol=0)
    assert grpo.grpo_advantages([2, 2, 2], 3).tolist() == [0, 0, 0]
    assert grpo.grpo_advantages([1, 0], 1).tolist() == [0, 0]
    torch.testing.assert_close(grpo.grpo_advantages([1, None, 0], 3, scale=False), torch.tensor([0.5, 0, -0.5]))
    with pytest.raises(ValueError, match="groups of 4"):
        grpo.loo_advantages([1, 0, 1], 4)


# ---------------------------------------------------------------------------------------------- the loss


def test_policy_loss_hand_computed():
    logp = torch.log(torch.tensor([[0.5, 0.5, 0.2], [0.4, 0.1, 0.3]]))
    old = torch.log(torch.tensor([[0.5, 0.25, 0.2], [0.5, 0.1, 0.3]]))
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    adv = torch.tensor([1.0, -2.0])
    # ratios: [1, 2, 1], [0.8, 1, 1]; clip 0.2 / 0.28
    # row 0 (A=1): -min(1, 1) = -1; -min(2, 1.28) = -1.28 (clipped); masked
    # row 1 (A=-2): -min(-1.6, -2*max(0.8,0.8)=-1.6) = 1.6; 2; 2
    per_tok = torch.tensor([[-1.0, -1.28, 0.0], [1.6, 2.0, 2.0]])
    loss, stats = grpo.policy_loss(logp, old, adv, mask, agg="token-mean")
    assert loss.item() == pytest.approx(per_tok.sum().item() / 5, abs=1e-6)
    assert stats["clipfrac"] == pytest.approx(1 / 5)
    loss, _ = grpo.policy_loss(logp, old, adv, mask, agg="seq-mean-token-sum")
    assert loss.item() == pytest.approx(((-1 - 1.28) + (1.6 + 2 + 2)) / 2, abs=1e-6)
    loss, _ = grpo.policy_loss(logp, old, adv, mask, agg="seq-mean-token-mean")
    assert loss.item() == pytest.approx(((-1 - 1.28) / 2 + (1.6 + 2 + 2) / 3) / 2, abs=1e-6)
    loss, _ = grpo.policy_loss(logp, old, adv, mask, agg="token-mean", norm=10)   # a step's token count
    assert loss.item() == pytest.approx(per_tok.sum().item() / 10, abs=1e-6)


def test_clipped_token_gets_no_gradient_and_dual_clip():
    old = torch.zeros(1, 3)
    logp = torch.tensor([[0.0, 1.0, -1.0]], requires_grad=True)   # ratios 1, e (clipped for A>0), 1/e
    grpo.policy_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 3))[0].backward()
    assert logp.grad[0, 1] == 0 and logp.grad[0, 0] != 0 and logp.grad[0, 2] != 0
    # dual clip: A < 0 and a huge ratio -> the loss is bounded by -c * A, and has no gradient
    logp = torch.tensor([[3.0]], requires_grad=True)
    loss, _ = grpo.policy_loss(logp, torch.zeros(1, 1), torch.tensor([-1.0]), torch.ones(1, 1), clip_c=3.0)
    loss.backward()
    assert loss.item() == pytest.approx(3.0) and logp.grad.item() == 0
    loss, _ = grpo.policy_loss(torch.tensor([[3.0]]), torch.zeros(1, 1), torch.tensor([-1.0]), torch.ones(1, 1))
    assert loss.item() == pytest.approx(torch.exp(torch.tensor(3.0)).item(), rel=1e-5)   # without it: unbounded


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
def test_all_masked_batch_is_zero_with_finite_gradients(agg):
    logp = torch.randn(2, 4, requires_grad=True)
    loss, _ = grpo.policy_loss(logp, logp.detach(), torch.tensor([1.0, -1.0]), torch.zeros(2, 4), agg=agg)
    loss.backward()
    assert loss.item() == 0 and torch.isfinite(logp.grad).all()


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
def test_single_update_gradient_is_the_plain_policy_gradient(agg):
    """old = the same forward's detached log-probs: ratio 1, so the gradient is that of -A·logp."""
    torch.manual_seed(0)
    logp = torch.randn(3, 5).log_softmax(-1).requires_grad_()
    adv, mask = torch.tensor([0.7, -1.2, 0.3]), (torch.rand(3, 5) > 0.3).long()
    loss, stats = grpo.policy_loss(logp, logp.detach(), adv, mask, agg=agg)
    (g,) = torch.autograd.grad(loss, logp)
    (g_ref,) = torch.autograd.grad(grpo.aggregate(-adv[:, None] * logp, mask, agg), logp)
    torch.testing.assert_close(g, g_ref)
    assert stats["clipfrac"] == 0 and stats["ratio"] == pytest.approx(1.0)


def test_kl_k3_finite_and_non_negative():
    logp = torch.tensor([-50.0, -1.0, 0.0, -1e-6, -30.0])
    ref = torch.tensor([0.0, -1.0, -80.0, -2e-6, -30.0 + 1e-7])
    kl = grpo.kl_k3(logp, ref)
    assert torch.isfinite(kl).all() and (kl >= 0).all()
    assert kl[1] == 0 and kl[0] > 1e6
    d = torch.tensor(0.3)
    assert grpo.kl_k3(torch.tensor(0.0), d).item() == pytest.approx((d.exp() - d - 1).item(), rel=1e-6)


# ---------------------------------------------------------------------------------------------- masks and AHPO


class Args:
    no_mask_over_turn = no_mask_repetition = no_mask_tool_errors = no_mask_truncated = False


def fake(finish, over_turn=False):
    return core.Trajectory(finish_reason=finish, meta={"over_turn": over_turn})


def test_over_turn_no_gradient_but_counts_in_the_group():
    trajs = [fake("answer"), fake("max_turns", over_turn=True), fake("answer"), fake("repetition")]
    weights, counts = grpo.loss_weights(trajs, Args())
    assert weights == [1, 0, 1, 0] and counts == {"over_turn": 1, "anomaly": 1}
    # the over-turn sample (reward 0) still moves its group-mates' advantages
    with_it = grpo.loo_advantages([1.0, 0.0, 1.0, 0.0], 4)
    without = grpo.loo_advantages([1.0, None, 1.0, 0.0], 4)
    assert with_it[0] != without[0]
    # and it carries no gradient: weight 0 leaves it out of the update
    args = Args()
    args.no_mask_over_turn = True
    assert grpo.loss_weights(trajs, args)[0] == [1, 1, 1, 0]


def test_ahpo_fires_exactly_below_the_threshold():
    def line(task_id, correct):
        return {"id": task_id, "samples": [{"correct": c} for c in correct]}
    experts = {"a": "expert a", "b": "expert b", "c": "expert c"}
    lines = [line("a", [0, 0, 0]), line("b", [1, 0, 0]), line("c", [1, 1, 0]), line("d", [0, 0, 0])]
    assert grpo.ahpo_records(lines, experts, threshold=1) == ["expert a"]                 # d has no expert
    assert grpo.ahpo_records(lines, experts, threshold=2) == ["expert a", "expert b"]
    assert grpo.ahpo_records(lines, {}, threshold=2) == []


# ---------------------------------------------------------------------------------------------- the loop

SYSTEM = "Answer with a colour."   # the colour world's system prompt (conftest.py)


def grpo_flags(root, out, steps):
    return ["--model", str(root / "sft" / "final"), "--tasks", str(root / "tasks.jsonl"), "--out", str(out),
            "--steps", str(steps), "--lr", "3e-3", "--tasks-per-step", "4", "--group-size", "8", "--no-tools",
            "--system", SYSTEM, "--max-new-tokens", "24", "--format-weight", "0", "--cache", "", "--quiet"]


def test_grpo_raises_the_reward(colour_world, tmp_path):
    out = tmp_path / "run"
    # lr 1e-3: at 3e-3 the run is chaotic (a 1e-6 change in the kernel's rounding sent it to a
    # policy that writes to the length limit, reward 0, after step 22)
    grpo.main(grpo_flags(colour_world, out, 30) + ["--save-every", "1000", "--lr", "1e-3", "--eval-tasks",
                                                   str(colour_world / "tasks.jsonl"), "--eval-every", "15"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first, last = [sum(r["reward"] for r in rows[a:b]) / (b - a) for a, b in [(0, 3), (27, 30)]]
    assert first < 0.3 and last > 0.6, (first, last)
    assert all(r["dlogp_max"] < 1e-3 for r in rows)          # the sampler and the trainer see the same model
    assert "eval_acc" in rows[14] and (out / "samples" / "step_000030.html").exists()
    assert core.load_policy(out / "final").model_type == "qwen2_5_vl"


def test_ahpo_kl_and_dynamic_sampling_run(colour_world, tmp_path):
    out = tmp_path / "ahpo"
    grpo.main(grpo_flags(colour_world, out, 3) + ["--expert-data", str(colour_world / "experts.jsonl"),
                                                  "--ahpo-threshold", "9", "--beta", "0.1", "--save-every", "1000",
                                                  "--dynamic-sampling"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["ahpo"] == 4 for r in rows)                 # threshold above the group size: every group fires
    assert rows[-1]["kl"] > 0 and all(r["kl"] >= 0 for r in rows)


def test_grpo_resume_after_kill_equals_uninterrupted(colour_world, tmp_path):
    flags = grpo_flags(colour_world, "X", 8) + ["--save-every", "2", "--keep-last", "1"]
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    run = [sys.executable, str(ROOT / "train_grpo.py")]
    proc = subprocess.Popen(run + [f if f != "X" else str(killed) for f in flags], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "step_000004").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "final").exists(), "the run finished before it could be killed"
    out = subprocess.run(run + [f if f != "X" else str(killed) for f in flags] + ["--resume"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert 4 <= int(out.split("at step ")[1].split()[0]) < 8
    grpo.main([f if f != "X" else str(straight) for f in flags])
    a, b = (load_file(str(d / "step_000008" / "model.safetensors")) for d in (killed, straight))
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))


def test_bad_flags(tmp_path, capsys):
    (tmp_path / "t.jsonl").write_text("")
    base = ["--model", "m", "--tasks", str(tmp_path / "t.jsonl")]
    for flags, message in [(["--model", "m", "--tasks", "nope.jsonl"], "no such file"),
                           (base + ["--group-size", "1"], "at least 2"),
                           (base + ["--temperature", "0"], "T > 0"),
                           (base + ["--max-turns", "0"], "--max-turns must be positive"),
                           (base + ["--top-p", "1.5"], "top_p 1.5: the nucleus mass lies in (0, 1]"),
                           (base + ["--metric", "judge"], "needs --judge-url")]:
        with pytest.raises(SystemExit):
            grpo.parse_args(flags)
        assert message in capsys.readouterr().err


def test_task_records_are_read_as_eval_reads_them(tmp_path):
    path = tmp_path / "tasks.jsonl"
    path.write_text(json.dumps({"id": "t", "question": "Q?", "answer": "x", "answer_eval": ["x", "ex"]}) + "\n")
    with pytest.raises(SystemExit, match="tasks.jsonl line 1: no image"):
        core.read_tasks(path, "train_grpo")
    (task,) = core.read_tasks(path, "train_grpo", allow_no_image=True)
    assert task["answers"] == ["x", "ex"] and task["image"] == []
    path.write_text(json.dumps({"id": "t", "question": "Q?", "answer": "x"}) + "\n{not json\n")
    with pytest.raises(SystemExit, match=r"train_grpo: .*tasks.jsonl:2: not valid JSON"):
        core.read_tasks(path, "train_grpo", allow_no_image=True)


def test_a_bad_task_file_stops_before_the_model_loads(tmp_path, monkeypatch):
    def load_policy(*args, **kwargs):
        raise AssertionError("the model was loaded before the task file was read")
    monkeypatch.setattr(core, "load_policy", load_policy)
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps({"id": "t", "question": "Q?", "answers": ["x"]}) + "\n")   # no image
    with pytest.raises(SystemExit, match="tasks.jsonl line 1: no image"):
        grpo.main(["--model", str(tmp_path / "model"), "--tasks", str(tasks), "--out", str(tmp_path / "run"),
                   "--no-tools"])


def test_rollouts_run_under_the_updates_autocast(monkeypatch):
    """On a GPU the update runs under bf16 autocast; the samples must come from that distribution
    too (and at bf16 speed). Checked on CPU with a CPU autocast standing in for the GPU's."""
    seen = []

    def rollout(policy, tasks, toolbox, n, **kw):
        seen.append(torch.is_autocast_enabled("cpu"))
        return []
    monkeypatch.setattr(core, "rollout", rollout)
    args = grpo.parse_args(["--model", "m", "--tasks", __file__, "--no-tools"])
    grpo.rollout_and_score(None, [], tools.Toolbox(), args, 0, None, lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert seen == [True]
