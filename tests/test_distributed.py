"""torchrun on CPU (gloo, 2 processes): SFT with 2 ranks ends with the weights of 1 process on the
same global batch (DDP and FSDP2), a killed 2-rank run resumes (also on 1 rank), GRPO with 2 ranks
logs the union of both ranks' rollouts."""
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

import train_grpo as grpo
from test_grpo import grpo_flags
from test_sft import make_records

ROOT = Path(__file__).resolve().parents[1]


def torchrun(script, flags, n=2, check=True, **kw):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
           str(ROOT / script), *flags]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if not check:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, **kw)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def weights(folder):
    return load_file(str(Path(folder) / "model.safetensors"))


def sft_flags(tiny_dir, data, out, *extra):
    return ["--model", str(tiny_dir), "--data", str(data), "--out", str(out), "--steps", "6", "--lr", "3e-3",
            "--batch-tokens", "900", "--save-every", "3", "--quiet", "--seed", "1", *extra]


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "fsdp-lora"])
def test_sft_two_ranks_equal_one_process(tiny_dir, tmp_path, mode):
    data, _ = make_records(tmp_path / "data", 6)
    lora = ["--lora-rank", "4"] if "lora" in mode else []
    one = tmp_path / "one"
    subprocess.run([sys.executable, str(ROOT / "train_sft.py"),
                    *sft_flags(tiny_dir, data, one, "--grad-accum", "2", *lora)], cwd=ROOT, check=True,
                   capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    two = tmp_path / "two"
    out = torchrun("train_sft.py", sft_flags(tiny_dir, data, two, *(["--fsdp"] if "fsdp" in mode else []), *lora))
    assert "rank 0 of 2" in out
    a, b = weights(one / "final"), weights(two / "final")
    assert a.keys() == b.keys()
    moved = max((a[k] - weights(tiny_dir)[k]).abs().max().item() for k in a)
    assert moved > 1e-3                                        # training happened
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    # one metrics log, written by rank 0, one line per step; a checkpoint load_policy reads
    steps = [json.loads(line)["step"] for line in (two / "metrics.jsonl").read_text().splitlines()]
    saved = "adapters.safetensors" if lora else "model.safetensors"
    assert steps == list(range(1, 7)) and (two / "step_000006" / saved).exists()


def test_killed_two_rank_run_resumes_on_two_or_one(tiny_dir, tmp_path):
    data, _ = make_records(tmp_path / "data", 6)
    flags = sft_flags(tiny_dir, data, tmp_path / "run")
    flags[flags.index("--steps") + 1] = "30"
    proc = torchrun("train_sft.py", flags, check=False)
    deadline = time.time() + 240
    while not (tmp_path / "run" / "step_000003").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)   # torchrun and both workers
    proc.wait()
    assert not (tmp_path / "run" / "final").exists(), "the run finished before it could be killed"
    out = torchrun("train_sft.py", flags + ["--resume"])
    assert "resumed from" in out and (tmp_path / "run" / "final" / "model.safetensors").exists()
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 31))
    # the same checkpoints continue on one process (another number of ranks)
    flags[flags.index("--steps") + 1] = "33"
    done = subprocess.run([sys.executable, str(ROOT / "train_sft.py"), *flags, "--resume"], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0 and "at step 30" in done.stdout, done.stderr[-2000:]


def test_grpo_two_ranks_log_the_union_of_rollouts(colour_world, tmp_path):
    out = tmp_path / "grpo"
    log = torchrun("train_grpo.py", grpo_flags(colour_world, out, 3) + ["--save-every", "2"])
    assert "rank 0 of 2 (DDP)" in log
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:   # both ranks' groups (2 each): 4 tasks x 8 samples, each counted once
        assert r["samples"] == 32 and r["groups"] == 4 and r["dlogp_max"] < 1e-3
    assert (out / "final" / "model.safetensors").exists() and (out / "step_000002").exists()
    with pytest.raises(SystemExit):
        grpo.parse_args(grpo_flags(colour_world, out, 3) + ["--fsdp"])


def test_collectives_put_their_tensors_on_the_ranks_device(monkeypatch):
    """NCCL (torchrun on GPUs) takes only CUDA tensors: a sum over ranks must build its tensor on
    the rank's device, not on the CPU. Checked without a GPU: the device is recorded, not used."""
    import mmsearch_r1 as core
    seen = []

    def all_reduce(t):
        seen.append(t.device)
        raise StopIteration
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    with pytest.raises(StopIteration):
        core.Dist(rank=0, world=2, local_rank=0, device=torch.device("meta")).sum(3)
    assert seen == [torch.device("meta")]
    assert core.Dist().sum(3) == 3   # one process: no collective


def test_nccl_is_bound_to_the_ranks_gpu(monkeypatch):
    """Under torchrun on GPUs each rank joins NCCL bound to cuda:LOCAL_RANK (`device_id`), so a
    barrier never runs on a guessed GPU. Checked without a GPU: CUDA and the process group stubbed."""
    import mmsearch_r1 as core
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **k: calls.append(("init", a, k)))
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    dist, device = core.init_distributed("cuda")
    cuda1 = torch.device("cuda", 1)
    assert device == dist.device == cuda1 and dist.rank == 1 and dist.local_rank == 1
    assert calls == [("set_device", cuda1), ("init", ("nccl",), {"device_id": cuda1})]
