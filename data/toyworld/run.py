"""The main command: the whole pipeline on the offline toy world, on a CPU, in minutes.

    python data/toyworld/run.py                      # -> runs/toy/: world, evals, SFT, GRPO, tables, pages
    python data/toyworld/run.py --seed 1 --out runs/toy_s1
    python data/toyworld/run.py --fast --out /tmp/toy_fast     # a small world and short runs (CI)

Stages, each a separate script run in its own process, the evals of a stage side by side
(re-running skips finished stages and resumes an interrupted training run):
    1. world      data/toyworld/prepare.py: landmarks, pages, image index, tasks, oracle SFT data, tiny model
    2. eval init  eval.py on the test split, the untrained model, with tools and with --no-tools
    3. sft        train_sft.py on the oracle trajectories
    4. eval sft
    5. grpo       train_grpo.py from the SFT model on the train tasks (val tasks evaluated as it goes)
    6. eval grpo  (and its HTML report)
    The SFT and GRPO models are also evaluated on the world's moved pages (corpus_moved.jsonl, every
    year moved by 311): an agent that reads the page answers the moved year, one that recalls the
    landmark the true one.
Then a table per stage (accuracy overall, per question type and on landmarks no training task
shows; tool use, turns, finish reasons), the moved-page counts and what the model does on `hard` after
each image search (hard_line) are printed and written to results.md, and curves.html draws the training curves.
"""
import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SEARCHES = ("image_search", "text_search", "visit")


PASSED_ON = ("--world-args", "--grpo-args")


def joined(argv):
    """argv with each PASSED_ON flag glued to its value: argparse would read a value of one flag
    ("--world-args --renumber") as a flag of run.py's own and stop."""
    out, rest = [], iter(argv)
    for a in rest:
        out.append(f"{a}={next(rest, '')}" if a in PASSED_ON else a)
    return out


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/toy", help="folder for every stage's output")
    ap.add_argument("--seed", type=int, default=0, help="world, SFT and GRPO seed")
    ap.add_argument("--fast", action="store_true", help="a small world and short runs (for CI)")
    ap.add_argument("--sft-steps", type=int, default=None, help="SFT optimizer steps")
    ap.add_argument("--sft-lr", type=float, default=3e-3, help="SFT learning rate")
    ap.add_argument("--sft-min-lr-ratio", type=float, default=0.1, help="SFT's cosine decay ends at this fraction "
                    "of --sft-lr (1: constant)")
    ap.add_argument("--sft-batch-tokens", type=int, default=3300, help="padded tokens per SFT step")
    ap.add_argument("--sft-weight-decay", type=float, default=0.0, help="SFT's AdamW weight decay")
    ap.add_argument("--grpo-steps", type=int, default=None, help="GRPO optimizer steps")
    ap.add_argument("--grpo-lr", type=float, default=3e-4, help="GRPO learning rate")
    ap.add_argument("--temperature", type=float, default=0.7, help="GRPO sampling temperature")
    ap.add_argument("--k", type=int, default=1, help="search results shown (the oracle's and the policy's)")
    ap.add_argument("--visit-chars", type=int, default=60, help="visit keeps this many characters of a page")
    ap.add_argument("--crop-upscale", type=int, default=112, help="crops are upscaled to this short side")
    ap.add_argument("--world-args", default="", help="extra flags for prepare.py, e.g. '--mix visual:0.2,whole:0.3,crop:0.5'")
    ap.add_argument("--grpo-args", default="", help="extra flags for train_grpo.py (ablations), e.g. '--advantage grpo'")
    ap.add_argument("--ahpo", action="store_true", help="GRPO with AHPO: the world's expert trajectories (hard questions)")
    ap.add_argument("--train-turns", type=int, default=6, help="GRPO's turn budget (over it: over-turn, masked)")
    ap.add_argument("--eval-turns", type=int, default=8, help="eval's turn budget (Mini-o3: more at test time)")
    args = ap.parse_args(joined(sys.argv[1:] if argv is None else argv))
    args.sft_steps = args.sft_steps or (60 if args.fast else 2500)
    args.grpo_steps = args.grpo_steps or (8 if args.fast else 25)
    counts = ("sft_steps", "grpo_steps", "sft_batch_tokens", "k", "visit_chars", "crop_upscale", "train_turns", "eval_turns")
    bad = [f"--{name.replace('_', '-')} {getattr(args, name)}" for name in counts + ("sft_lr", "grpo_lr", "temperature")
           if getattr(args, name) <= 0]
    if not 0 <= args.sft_min_lr_ratio <= 1:
        bad.append(f"--sft-min-lr-ratio {args.sft_min_lr_ratio}")
    if args.sft_weight_decay < 0:
        bad.append(f"--sft-weight-decay {args.sft_weight_decay}")
    if bad:
        ap.error(", ".join(bad) + ": the counts, learning rates and temperature must be positive, "
                 "the min-lr ratio 0 to 1, the weight decay 0 or more")
    if Path(args.out).is_file():
        ap.error(f"--out {args.out} is a file; give a folder")
    return args


def check_settings(out, args):
    """A folder holds one run: re-running it with other settings would silently mix stages made
    under both, so the settings are recorded on the first run and must match on every later one."""
    path, mine = out / "settings.json", {k: v for k, v in vars(args).items() if k != "out"}
    if path.exists():
        theirs = json.loads(path.read_text(encoding="utf-8"))
        theirs = {**{k: v for k, v in vars(parse_args([])).items() if k not in theirs}, **theirs}   # knobs added since: defaults
        diff = [f"--{k.replace('_', '-')} {theirs.get(k)!r} there, {v!r} now" for k, v in mine.items() if theirs.get(k) != v]
        if diff:
            raise SystemExit(f"{out} holds a run made with other settings ({'; '.join(diff)}): "
                             "give these settings another --out, or delete the folder to start over.")
    else:   # a new folder, or stages copied in by hand (the README's ablations): from now on, these settings
        path.write_text(json.dumps(mine, indent=1) + "\n", encoding="utf-8")


def stop_on_signal(signum, frame):
    """SIGTERM / SIGHUP (a `kill`, a closed terminal) as an exception, so that `run` kills the
    running stage before exiting: left alone, the stage would go on writing into the folder."""
    raise SystemExit(f"run.py: stopped by signal {signum} (the running stage too); run the same command "
                     "again to resume: finished stages are skipped, training resumes from its last checkpoint.")


def run(jobs, log):
    """Stages [(name, cmd), ...] side by side, each in its own process; one stage writes to `log`,
    several each to their own file, added to `log` when it ends. A failure stops the pipeline; an
    exception while they run (see stop_on_signal) kills them all. Side by side, each gets an equal
    share of the CPU threads: an eval spends much of its time in one thread (imports, the decoding
    loop's Python, the tools), so a stage's three evals together take about 0.8 of their time one
    after the other (with the same results: greedy decoding here did not change with the thread
    count, checked answer by answer on the SFT stage's evals and table by table on every stage's)."""
    t0 = time.time()
    threads = str(max(1, (os.cpu_count() or 1) // len(jobs)))
    env = {**os.environ, "OMP_NUM_THREADS": threads} if len(jobs) > 1 else None
    procs = []

    def keep_log(part):   # a stage's log, added to `log` if it has its own
        text = part.read_text(encoding="utf-8", errors="replace")
        if part != Path(log):
            with open(log, "a", encoding="utf-8") as f:
                f.write(text)
            part.unlink()
        return text

    try:
        for stage, cmd in jobs:
            print(f"[{stage}] {' '.join(str(c) for c in cmd[1:])}", flush=True)
            part = Path(log) if len(jobs) == 1 else Path(f"{log}.{len(procs)}")
            with open(part, "a" if len(jobs) == 1 else "w", encoding="utf-8") as f:
                procs.append((stage, part, subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=env, stdout=f,
                                                            stderr=subprocess.STDOUT)))
        running = list(procs)
        while running:   # the first to fail stops the others
            time.sleep(0.2)
            for stage, part, proc in [job for job in running if job[2].poll() is not None]:
                running.remove((stage, part, proc))
                text = keep_log(part)
                if proc.returncode:
                    tail = "".join(text.splitlines(keepends=True)[-15:])   # (a stage alone: log.txt's end)
                    raise SystemExit(f"[{stage}] failed (exit {proc.returncode}); the end of its log ({log}):\n"
                                     f"{tail}\nFix the cause and run the same command again: finished stages are skipped.")
                print(f"[{stage}] done in {time.time() - t0:.0f} s", flush=True)
    finally:
        for _, part, proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if part != Path(log) and part.exists():   # a killed stage's own log
                keep_log(part)


def stage_table(name, results, types, unseen=()):
    """One row of the summary table from an eval's results.jsonl lines. unseen: the ids of the
    knowledge questions (all but `visual`) about a landmark no training task shows."""
    samples = [(types[r["id"]], s) for r in results if "error" not in r for s in r["samples"]]
    n = max(1, len(samples))
    row = {"stage": name, "acc": sum(s["correct"] or 0 for _, s in samples) / n}
    for t in sorted(set(types.values())):
        of_type = [s for k, s in samples if k == t]
        row[f"acc {t}"] = sum(s["correct"] or 0 for s in of_type) / max(1, len(of_type))
    if unseen:   # the asked landmark is in no SFT trajectory: memory cannot know its year
        new = [s for r in results if r["id"] in unseen and "error" not in r for s in r["samples"]]
        row["acc unseen"] = sum(s["correct"] or 0 for s in new) / max(1, len(new))
    visual = [s for k, s in samples if k == "visual"]
    row["searches/q (visual)"] = sum(sum(s["tool_calls"].get(x, 0) for x in SEARCHES) for s in visual) / max(1, len(visual))
    row["crops/q"] = sum(s["tool_calls"].get("crop", 0) for _, s in samples) / n
    row["calls/q"] = sum(sum(s["tool_calls"].values()) for _, s in samples) / n
    row["turns"] = sum(s["turns"] for _, s in samples) / n
    hard = [s for k, s in samples if k == "hard"]
    if hard:
        row["turns (hard)"] = sum(s["turns"] for s in hard) / len(hard)
    row["finish"] = ", ".join(f"{k} {v}" for k, v in Counter(s["finish_reason"] for _, s in samples).most_common())
    return row


def reading_line(stage, results, tasks):
    """What the model answered the knowledge questions with, on moved pages."""
    answers = [((s["answer"] or "").strip(), tasks[r["id"]]) for r in results
               if "error" not in r and "moved_answers" in tasks[r["id"]] for s in r["samples"]]
    page = sum(a == t["moved_answers"][0] for a, t in answers)
    memory = sum(a == t["answers"][0] for a, t in answers)
    return (f"{stage}: of {len(answers)} knowledge questions, {page} answered with the page's (moved) year, "
            f"{memory} with the true year")


def hard_line(stage, results, tasks):
    """What the model did on `hard` after each image search: after a miss (the top hit is of
    another kind than the question asks) another corner, a visit, an answer or a reply with neither
    a tool call nor an answer; after a match the same."""
    after = Counter()
    for r in results:
        task = tasks[r["id"]]
        if task["type"] != "hard" or "error" in r:
            continue
        asked = re.search(r"the (\w+) in this image", task["question"]).group(1)
        for s in r["samples"]:
            messages = s["trajectory"]["messages"]
            for m, reply in zip(messages, messages[1:]):
                text = m["content"] if isinstance(m["content"], str) else " ".join(p.get("text", "") for p in m["content"])
                if m["role"] != "tool" or not text.startswith("image_search"):
                    continue
                kind = re.search(r", an? (\w+) in ", text)   # the snippet: "Kalomi Tower, a tower in Renville."
                said = str(reply["content"])
                call = re.search(r'"name": "(\w+)"', said)
                act = ({"crop": "another corner"}.get(call[1], call[1]) if call
                       else "answer" if "<answer>" in said else "neither (malformed)")
                after["match" if kind and kind[1] == asked else "miss", act] += 1
    parts = [f"after a {hit}: " + ", ".join(f"{act} {n}" for (h, act), n in sorted(after.items()) if h == hit)
             for hit in ("miss", "match") if any(h == hit for h, _ in after)]
    return f"{stage}: on hard, " + ("; ".join(parts) if parts else "no image search")


def markdown(rows):
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |")
    return "\n".join(lines)


def svg_curve(title, series, width=520, height=180):
    """An inline SVG line chart: series is {label: [(x, y), ...]}."""
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    points = [p for s in series.values() for p in s]
    if not points:
        return ""
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points) or 1
    y0, y1 = min(0.0, min(p[1] for p in points)), max(p[1] for p in points) or 1.0
    sx = lambda x: 40 + (x - x0) / max(1e-9, x1 - x0) * (width - 60)
    sy = lambda y: height - 25 - (y - y0) / max(1e-9, y1 - y0) * (height - 45)
    body = [f'<text x="40" y="14" font-size="13">{title}</text>',
            f'<text x="2" y="{sy(y1) + 4:.0f}" font-size="10">{y1:.3g}</text>',
            f'<text x="2" y="{sy(y0) + 4:.0f}" font-size="10">{y0:.3g}</text>',
            f'<line x1="40" y1="{sy(y0):.0f}" x2="{width - 20}" y2="{sy(y0):.0f}" stroke="#999"/>']
    for i, (label, s) in enumerate(series.items()):
        c = colors[i % len(colors)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s)
        body.append(f'<polyline fill="none" stroke="{c}" stroke-width="1.5" points="{path}"/>')
        body.append(f'<text x="{60 + 110 * i}" y="{height - 5}" font-size="11" fill="{c}">{label}</text>')
    return f'<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">{"".join(body)}</svg>'


def curves_page(out, path):
    def rows(p):
        return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []
    sft, grpo = rows(out / "sft" / "metrics.jsonl"), rows(out / "grpo" / "metrics.jsonl")
    charts = [svg_curve("SFT loss", {"loss": [(r["step"], r["loss"]) for r in sft]}),
              svg_curve("GRPO reward and accuracy", {
                  "reward": [(r["step"], r["reward"]) for r in grpo],
                  "train correct": [(r["step"], r["correct"]) for r in grpo],
                  "val acc (greedy)": [(r["step"], r["eval_acc"]) for r in grpo if "eval_acc" in r]}),
              svg_curve("GRPO tool calls per trajectory", {
                  t: [(r["step"], r[f"calls_{t}"]) for r in grpo] for t in ("crop", "image_search", "visit")}),
              svg_curve("GRPO masked and uninformative", {
                  "over-turn": [(r["step"], r["masked_over_turn"]) for r in grpo],
                  "anomaly": [(r["step"], r["masked_anomaly"]) for r in grpo],
                  "zero-var groups": [(r["step"], r["zero_var_groups"]) for r in grpo]})]
    path.write_text("<!doctype html><html><head><meta charset='utf-8'><title>toy world training curves</title>"
                    "</head><body style='font-family:sans-serif'><h1>Training curves</h1>"
                    + "".join(f"<div>{c}</div>" for c in charts) + "</body></html>", encoding="utf-8")


def main(argv=None):
    args = parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):   # (Ctrl-C reaches the stage itself: its process group)
        signal.signal(sig, stop_on_signal)
    out = (ROOT / args.out) if not Path(args.out).is_absolute() else Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    check_settings(out, args)
    world, log = out / "world", out / "log.txt"
    py = sys.executable
    t_start = time.time()
    size = ["--entities", "40", "--tasks", "240"] if args.fast else []
    if (world / "sft.jsonl").exists() and not (world / "sft_pages" / "images_0.jsonl").exists():
        raise SystemExit(f"{world} was made by an older prepare.py (before the renumbered SFT pages, "
                         "sft_pages/images_0.jsonl, of 2026-11-30): give this run another --out, or delete the "
                         "folder to start over.")
    if not (world / "sft.jsonl").exists():
        run([("world", [py, HERE / "prepare.py", "--out", world, "--seed", args.seed, "--k", args.k, "--visit-chars",
                        args.visit_chars, "--crop-upscale", args.crop_upscale, *size, *args.world_args.split()])], log)
    system = ["--system", (world / "system.txt").read_text(encoding="utf-8")]

    def tool_flags(corpus=world / "corpus.jsonl"):
        return ["--backend", "local", "--corpus", corpus, "--image-index", world / "images.jsonl", "--k", args.k,
                "--visit-chars", args.visit_chars, "--crop-upscale", args.crop_upscale, "--cache", "",
                "--max-new-tokens", "96", "--max-context", "4096"]

    def evaluate(stage, model):
        variants = [("", [*tool_flags(), "--html", out / f"eval_{stage}" / "report.html", *system]),
                    ("_notools", [*tool_flags(), "--no-tools"])]
        if stage != "init":   # does it read the page? (the world's pages with every year moved)
            variants.append(("_moved", [*tool_flags(world / "corpus_moved.jsonl"), *system]))
        # the whole test split in one batch: a quarter less time than batches of 64, the same answers
        jobs = [(f"eval {stage}{suffix.replace('_', ' ')}",
                 [py, ROOT / "eval.py", "--model", model, "--data", world / "test.jsonl", "--out", out / f"eval_{stage}{suffix}",
                  "--batch", "320", "--resume", "--temperature", "0", "--max-turns", args.eval_turns, *extra])
                for suffix, extra in variants if not (out / f"eval_{stage}{suffix}" / "summary.json").exists()]
        if jobs:
            run(jobs, log)

    evaluate("init", world / "model")
    if not (out / "sft" / "final" / "config.json").exists():
        run([("sft", [py, ROOT / "train_sft.py", "--model", world / "model", "--data", world / "sft.jsonl",
                      "--out", out / "sft", "--steps", args.sft_steps, "--lr", args.sft_lr, "--warmup", "20",
                      "--min-lr-ratio", args.sft_min_lr_ratio, "--batch-tokens", args.sft_batch_tokens,
                      "--weight-decay", args.sft_weight_decay,
                      "--seed", args.seed, "--save-every", "100", "--keep-last", "1", "--quiet", "--resume"])], log)
    evaluate("sft", out / "sft" / "final")
    if not (out / "grpo" / "final" / "config.json").exists():   # (--rollout-batch: the 80 val tasks in one batch)
        run([("grpo", [py, ROOT / "train_grpo.py", "--model", out / "sft" / "final", "--tasks", world / "train.jsonl",
                       "--eval-tasks", world / "val.jsonl", "--out", out / "grpo", "--steps", args.grpo_steps,
                       "--lr", args.grpo_lr, "--temperature", args.temperature, "--tasks-per-step", "8",
                       "--group-size", "8", "--rollout-batch", "80", "--eval-every", math.ceil(args.grpo_steps / 4),
                       "--save-every", "10", "--keep-last", "1", "--seed", args.seed, "--quiet", "--resume",
                       "--max-turns", args.train_turns, *tool_flags(), *system, *args.grpo_args.split(),
                       *(["--expert-data", world / "expert.jsonl"] if args.ahpo else [])])], log)
    evaluate("grpo", out / "grpo" / "final")

    test = [json.loads(line) for line in (world / "test.jsonl").read_text().splitlines()]
    types = {t["id"]: t["type"] for t in test}
    shown = set()   # the landmarks the training tasks show
    for t in map(json.loads, (world / "train.jsonl").read_text().splitlines()):
        shown |= {t["entity"], *(t["corners"] or {}).values()}
    unseen = {t["id"] for t in test if t["type"] != "visual" and t["entity"] not in shown}
    def results(name):   # an eval's results.jsonl lines
        return [json.loads(line) for line in (out / name / "results.jsonl").read_text().splitlines()]
    rows, with_tools = [], {}
    for stage in ("init", "sft", "grpo"):
        with_tools[stage] = results(f"eval_{stage}")
        rows.append(stage_table(f"{stage} (tools)", with_tools[stage], types, unseen))
        rows.append(stage_table(f"{stage} (no tools)", results(f"eval_{stage}_notools"), types, unseen))
    by_id = {t["id"]: t for t in test}
    reading = [reading_line(stage, results(f"eval_{stage}_moved"), by_id) for stage in ("sft", "grpo")]
    hard = [hard_line(stage, with_tools[stage], by_id) for stage in ("sft", "grpo")]
    table = (markdown(rows) + "\n\nOn moved pages (every year moved by 311):\n" + "\n".join(f"- {line}" for line in reading)
             + "\n\nWhat the model does after an image search on hard (a miss: the top hit is of another kind):\n"
             + "\n".join(f"- {line}" for line in hard))
    minutes = (time.time() - t_start) / 60
    (out / "results.md").write_text(f"{table}\n\n{len(types)} held-out test tasks ({len(unseen)} knowledge questions "
                                    f"about landmarks no training task shows: acc unseen), greedy; this run {minutes:.1f} min\n")
    curves_page(out, out / "curves.html")
    print(f"\n{table}\n\ntest tasks: {len(types)} (greedy). Report: {out / 'eval_grpo' / 'report.html'}; "
          f"curves: {out / 'curves.html'}; table: {out / 'results.md'}; {minutes:.1f} min")
    return rows


if __name__ == "__main__":
    main()
