"""Benchmark: naive log-probs (full logits, log_softmax, gather) against the fused `token_logprobs`.

    python tests/bench_logprob.py                 # CPU shapes (fp32, and bf16 at the small one), each in a fresh process
    python tests/bench_logprob.py --device cuda   # adds (8192, 2048, 151936) bf16 and bare-matmul ratios

Forward + backward of sum(logp * g), with W trained (full fine-tuning: dh and dW) and W frozen
(LoRA or a frozen head: dh only). Time is the best of --repeats runs. Memory is the peak
above what the inputs (and their gradients) already hold: on CPU the peak RSS of a fresh
process minus its RSS just before the first run; on a GPU torch.cuda.max_memory_allocated
minus the allocation before it. Not a test: run it by hand and paste the table.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mmsearch_r1 import token_logprobs  # noqa: E402


def naive(h, w, y):
    return torch.log_softmax((h @ w.t()).float(), dim=-1).gather(1, y[:, None])[:, 0]


def bare_matmuls(h, w, y):
    """The GEMMs any method must do: one forward (h W^T), two backward (dz W, dz^T h)."""
    z = h @ w.t()
    return z @ w, z.t() @ h


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(method, N, H, V, dtype, device, repeats, frozen):
    torch.manual_seed(0)
    dtype = getattr(torch, dtype)
    h = torch.randn(N, H, device=device, dtype=dtype, requires_grad=True)
    w = (torch.randn(V, H, device=device, dtype=dtype) * 0.02).requires_grad_(not frozen)
    y = torch.randint(0, V, (N,), device=device)
    g = torch.randn(N, device=device)
    h.grad = torch.zeros_like(h)   # gradients count as inputs
    if not frozen:
        w.grad = torch.zeros_like(w)
    cuda = device == "cuda"

    def step():
        if method == "matmul":
            with torch.no_grad():
                bare_matmuls(h, w, y)
            return
        logp = naive(h, w, y) if method == "naive" else token_logprobs(h, w, y)
        (logp * g).sum().backward()

    if cuda:
        step()                                  # warm up kernels
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_mb()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if cuda:
        extra = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    print(json.dumps({"time_s": min(times), "extra_mb": extra}))


def run(method, N, H, V, dtype, device, repeats, frozen):
    cmd = [sys.executable, __file__, "--worker", method, str(N), str(H), str(V), dtype, str(int(frozen)),
           "--device", device, "--repeats", str(repeats)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return {"time_s": float("nan"), "extra_mb": float("nan"), "error": out.stderr.strip()[-300:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--shapes", default=None, help="only these rows of the table, by index, e.g. 1,2")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per method (best is kept)")
    ap.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        method, N, H, V, dtype, frozen = args.worker
        return worker(method, int(N), int(H), int(V), dtype, args.device, args.repeats, frozen == "1")

    shapes = [(2048, 512, 32000, "float32"), (4096, 896, 151936, "float32"), (2048, 512, 32000, "bfloat16")]
    if args.device == "cuda":   # (CPUs without bf16 units run the large bf16 GEMMs for minutes)
        shapes += [(4096, 896, 151936, "bfloat16"), (8192, 2048, 151936, "bfloat16")]
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {os.cpu_count()} threads"
    print(f"# token_logprobs benchmark on {name}, torch {torch.__version__}, forward + backward\n")
    print("| N, H, V | dtype | W | naive s | fused s | fused/naive time | naive extra MB | fused extra MB "
          "| fused/naive memory | fused/matmuls time |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    if args.shapes:
        shapes = [shapes[int(i)] for i in args.shapes.split(",")]
    for (N, H, V, dtype), frozen in [(shape, frozen) for shape in shapes for frozen in (False, True)]:
        nv = run("naive", N, H, V, dtype, args.device, args.repeats, frozen)
        fu = run("fused", N, H, V, dtype, args.device, args.repeats, frozen)
        mm = None if frozen else run("matmul", N, H, V, dtype, args.device, args.repeats, frozen)
        ratio_mm = f"{fu['time_s'] / mm['time_s']:.2f}x" if mm else "-"
        print(f"| {N}, {H}, {V} | {dtype} | {'frozen' if frozen else 'trained'} | {nv['time_s']:.3f} | {fu['time_s']:.3f} | "
              f"{fu['time_s'] / nv['time_s']:.2f}x | {nv['extra_mb']:.0f} | {fu['extra_mb']:.0f} | "
              f"{fu['extra_mb'] / nv['extra_mb']:.1%} | {ratio_mm} |", flush=True)
        for r in (nv, fu, mm):
            if r and "error" in r:
                print(f"  error: {r['error']}")


if __name__ == "__main__":
    main()
