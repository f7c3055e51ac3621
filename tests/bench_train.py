"""Benchmark: one SFT optimizer step (full fine-tuning and LoRA) and one GRPO step.

    python tests/bench_train.py                   # CPU: the tiny and small configs, each in a fresh process
    python tests/bench_train.py --toy runs/toy    # GRPO steps on the toy world instead (train_grpo.py itself)
    python tests/bench_train.py --toy-sft runs/toy  # SFT steps on the toy world: plain forward against ours
    python tests/bench_train.py --device cuda     # adds a Qwen2.5-VL-3B-shaped model at 8k tokens (bf16 autocast)

SFT rows: --rows trajectories of about --tokens tokens each (a question image, a long assistant
turn), one micro-batch, the best of --repeats steps after one warm-up. tok/s counts every token
of the batch; memory is the peak above the process's size after the model and data are loaded
(CPU: peak RSS; GPU: torch.cuda.max_memory_allocated).
GRPO rows: 8 tasks x 8 samples rolled out at T = 1 (one turn of up to 128 new tokens, no tools),
then the policy loss (random advantages, so every sample trains) with backward and AdamW: rollout
seconds, update seconds, tokens/s over the step. Not a test: run it by hand and paste the tables.
"""
import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mmsearch_r1 as core  # noqa: E402
import train_grpo  # noqa: E402
import train_sft  # noqa: E402

CONFIGS = {
    "tiny": {},
    "small": dict(hidden=256, layers=4, heads=4, kv_heads=2),
    "3b": dict(hidden=2048, layers=36, heads=16, kv_heads=2, intermediate=11008, model_vocab=151936,
               vision_hidden=1280, vision_depth=32, max_pixels=1024 * 28 * 28),
}
TEXT = "The tower stands in the old city centre; it was built in 1889 for the fair and is 300 metres tall. "


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(config, mode, rows, tokens, device, repeats):
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = core.build_tiny_policy(Path(tmp) / "m", [TEXT] * 50, **CONFIGS[config])
        on_gpu = device == "cuda"
        dtype = torch.bfloat16 if (mode == "lora" and on_gpu) else torch.float32
        policy = core.load_policy(folder, device=device, dtype=dtype)
    if mode == "lora":
        core.add_lora(policy.model, rank=16, alpha=32)
    params = core.trainable_parameters(policy.model)
    opt = torch.optim.AdamW(params, lr=1e-5)
    image = Image.new("RGB", (448, 336), "red")
    words = TEXT * (tokens // 20)
    trajs = []
    for r in range(rows):
        traj = core.new_trajectory(policy, {"image": image, "question": f"Question {r}?"}, system="")
        core.add_message(policy, traj, "assistant", words)
        traj.input_ids, traj.loss_mask = traj.input_ids[:tokens], traj.loss_mask[:tokens]
        trajs.append(traj)
    n_tokens = sum(sum(t.loss_mask) for t in trajs)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if on_gpu else contextlib.nullcontext

    def step():
        train_sft.accumulate_gradients(policy, [trajs], n_tokens, autocast)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if on_gpu:
            torch.cuda.synchronize()

    step()   # warm-up (and AdamW's state allocation)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_mb()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    extra = (torch.cuda.max_memory_allocated() - base) / 2**20 if on_gpu else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    total = sum(len(t.input_ids) for t in trajs)
    print(json.dumps({"params_m": sum(p.numel() for p in policy.model.parameters()) / 1e6,
                      "trainable_m": sum(p.numel() for p in params) / 1e6, "tokens": total,
                      "step_s": min(times), "tok_s": total / min(times), "extra_mb": extra}))


def grpo_worker(config, device, repeats):
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        policy = core.load_policy(core.build_tiny_policy(Path(tmp) / "m", [TEXT] * 50, **CONFIGS[config]), device=device)
    params = core.trainable_parameters(policy.model)
    opt = torch.optim.AdamW(params, lr=1e-5)
    tasks = [{"id": str(i), "image": Image.new("RGB", (224, 168), (30 * i, 90, 200)), "question": f"Question {i}?"}
             for i in range(8)]
    best = None
    for r in range(repeats + 1):
        t0 = time.perf_counter()
        trajs = core.rollout(policy, tasks, None, n=8, max_turns=1, max_new_tokens=128, temperature=1.0,
                             seed=r, max_batch=64, progress=False)
        t1 = time.perf_counter()
        adv = torch.randn(len(trajs))
        for mb in core.pack_by_tokens([len(t.input_ids) for t in trajs], 16384):
            batch = core.collate(policy, [trajs[i] for i in mb])
            logp, _ = core.sequence_logprobs(policy, batch, 1.0)
            loss, _ = train_grpo.policy_loss(logp, logp.detach(), adv[mb], batch["loss_mask"],
                                             norm=sum(sum(t.loss_mask) for t in trajs))
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        if r and (best is None or t2 - t0 < best[0] + best[1]):
            best = (t1 - t0, t2 - t1, sum(len(t.input_ids) for t in trajs), sum(sum(t.loss_mask) for t in trajs))
    rollout_s, update_s, tokens, sampled = best
    print(json.dumps({"rollout_s": rollout_s, "update_s": update_s, "tokens": tokens, "sampled": sampled,
                      "tok_s": tokens / (rollout_s + update_s),
                      "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def toy_grpo_steps(run, steps):
    """train_grpo.py as the main command runs it (8 tasks x 8 samples, tools, T 0.7; the tool limits
    RUN's GRPO used), from RUN's SFT model for `steps` steps in a temporary folder: its metrics lines."""
    world, root = Path(run) / "world", Path(__file__).resolve().parents[1]
    used = json.loads((Path(run) / "grpo" / "args.json").read_text())   # the run's own tool settings
    tool = [f"--{k.replace('_', '-')}={used[k]}" for k in ("k", "visit_chars", "max_turns", "max_new_tokens",
                                                           "max_context") if k in used]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, root / "train_grpo.py", "--model", Path(run) / "sft" / "final",
               "--tasks", world / "train.jsonl", "--out", tmp, "--steps", steps, "--lr", "3e-4", "--temperature", "0.7",
               "--tasks-per-step", "8", "--group-size", "8", "--rollout-batch", "64", "--quiet",
               "--backend", "local", "--corpus", world / "corpus.jsonl", "--image-index", world / "images.jsonl",
               "--cache", "", *tool, "--system", (world / "system.txt").read_text(encoding="utf-8")]
        out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=root)
        if out.returncode:
            raise SystemExit(f"train_grpo.py failed: {out.stderr.strip()[-800:]}")
        return [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]


def toy_sft_ab(run, steps):
    """SFT steps of train_sft.py's own functions on RUN's world (its model and sft.jsonl, the main
    command's 4,096-token steps), alternating step by step between the plain forward (the Conv3d
    patch embedding, every row run whole) and ours (matmul patch embedding, shared prefix run once),
    after one epoch that caches every trajectory's positions: seconds a step of each, paired in time."""
    import types
    world = Path(run) / "world"
    policy = core.load_policy(world / "model", device="cpu")
    embed = policy.model.model.visual.patch_embed
    records, lengths, n_loss, _ = train_sft.load_sft_data(world / "sft.jsonl", policy, 8192, False, True, 2048)
    micro_batches = core.pack_by_tokens(lengths, 4096)
    params = core.trainable_parameters(policy.model)
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95))
    saving = core.SHARED_PREFIX_SAVING

    def step(s, ours):
        core.SHARED_PREFIX_SAVING = saving if ours else float("inf")
        embed.forward = types.MethodType(core._patch_embed_forward if ours else type(embed).forward, embed)
        micro = train_sft.step_micro_batches(micro_batches, s, 1, 0)
        trajs = [[train_sft.trajectory(policy, records[i]) for i in mb] for mb in micro]
        train_sft.accumulate_gradients(policy, trajs, sum(n_loss[i] for mb in micro for i in mb))
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    epoch = len(micro_batches)
    for s in range(epoch):
        step(s, True)
    times = {False: [], True: []}
    for s in range(epoch, epoch + 2 * steps):
        t0 = time.perf_counter()
        step(s, s % 2 == 1)
        times[s % 2 == 1].append(time.perf_counter() - t0)
    plain, ours = (sum(times[k]) / len(times[k]) for k in (False, True))
    print(f"SFT steps on the toy world ({run}), {steps} each, alternating:\n\n| plain s/step | ours s/step | ours / plain |"
          f"\n|---|---|---|\n| {plain:.3f} | {ours:.3f} | {ours / plain:.3f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--toy", default=None, help="a data/toyworld/run.py output folder: time GRPO steps on it (only)")
    ap.add_argument("--toy-steps", type=int, default=12, help="GRPO steps on the toy world (the first is not counted)")
    ap.add_argument("--toy-sft", default=None, help="a data/toyworld/run.py output folder: time SFT steps on it, "
                    "plain forward against ours, alternating (only)")
    ap.add_argument("--toy-sft-steps", type=int, default=134, help="SFT steps of each kind")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--rows", type=int, default=4, help="trajectories per step")
    ap.add_argument("--tokens", type=int, default=1024, help="tokens per trajectory")
    ap.add_argument("--repeats", type=int, default=3, help="timed steps (best is reported)")
    ap.add_argument("--worker", nargs=2, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker and args.worker[1] == "grpo":
        return grpo_worker(args.worker[0], args.device, args.repeats)
    if args.worker:
        return worker(*args.worker, args.rows, args.tokens, args.device, args.repeats)
    if args.toy_sft:
        return toy_sft_ab(args.toy_sft, args.toy_sft_steps)
    if args.toy:
        rows = toy_grpo_steps(args.toy, args.toy_steps)[1:]
        mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("dt", "rollout_s", "len", "turns")}
        print(f"GRPO on the toy world ({args.toy}, its SFT model, the main command's settings), "
              f"mean of steps 2-{args.toy_steps}:\n\n| step s | rollout s | update s | tokens/sample | turns/sample |"
              f"\n|---|---|---|---|---|\n| {mean['dt']:.2f} | {mean['rollout_s']:.2f} | "
              f"{mean['dt'] - mean['rollout_s']:.2f} | {mean['len']:.0f} | {mean['turns']:.2f} |")
        return
    runs = [(c, m, args.rows, args.tokens) for c in ("tiny", "small") for m in ("full", "lora")]
    if args.device == "cuda":
        runs += [("3b", m, 1, 8192) for m in ("full", "lora")]
    print("| config | mode | params M | trainable M | tokens/step | step s | tok/s | extra MB |\n|---|---|---|---|---|---|---|---|")
    for config, mode, rows, tokens in runs:
        out = subprocess.run([sys.executable, __file__, "--worker", config, mode, "--rows", str(rows),
                              "--tokens", str(tokens), "--device", args.device, "--repeats", str(args.repeats)],
                             capture_output=True, text=True)
        if out.returncode:
            print(f"| {config} | {mode} | failed: {out.stderr.strip().splitlines()[-1]} |")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {config} | {mode} | {r['params_m']:.2f} | {r['trainable_m']:.3f} | {r['tokens']} | "
              f"{r['step_s']:.3f} | {r['tok_s']:.0f} | {r['extra_mb']:.0f} |")

    print("\n| config | GRPO step: 8 tasks x 8 samples | rollout s | update s | tokens | sampled tokens | tok/s | peak RSS MB |"
          "\n|---|---|---|---|---|---|---|---|")
    for config in ("tiny", "small") + (("3b",) if args.device == "cuda" else ()):
        out = subprocess.run([sys.executable, __file__, "--worker", config, "grpo", "--device", args.device,
                              "--repeats", str(args.repeats)], capture_output=True, text=True)
        if out.returncode:
            print(f"| {config} | failed: {out.stderr.strip().splitlines()[-1]} |")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {config} | one step | {r['rollout_s']:.2f} | {r['update_s']:.2f} | {r['tokens']} | {r['sampled']} | "
              f"{r['tok_s']:.0f} | {r['peak_mb']:.0f} |")


if __name__ == "__main__":
    main()
