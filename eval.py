"""Run the agent on a benchmark file, score it, and write results, a summary table and an HTML report.

    # the toy world, offline, on CPU: the model of train_grpo.py's toy example, with the tools and
    # the prompt the world's SFT data showed: the main command's evaluation (its scores: the README's results)
    python eval.py --model runs/grpo_toy/final --data data/toyworld/out/test.jsonl \
        --backend local --corpus data/toyworld/out/corpus.jsonl --image-index data/toyworld/out/images.jsonl \
        --k 1 --visit-chars 60 --crop-upscale 112 --system "$(cat data/toyworld/out/system.txt)" \
        --max-new-tokens 96 --max-context 4096 --max-turns 8 --batch 320 --out runs/eval_toy --html runs/eval_toy/report.html
    # a real model and engine, judged by an LLM, 4 samples each (avg@4, pass@4)
    SERPER_API_KEY=... python eval.py --model Qwen/Qwen2.5-VL-7B-Instruct --data infoseek.jsonl \
        --backend serper --image-host-dir /srv/www/q --image-host-url https://example.org/q \
        --metric judge --judge-url http://localhost:8000/v1 --judge-model Qwen2.5-72B-Instruct --n 4 --temperature 0.7

Writes to --out: results.jsonl (one line per example, flushed as it goes), summary.json, images/
(crops the agent made), and prints a markdown table. --resume skips the ids already in
results.jsonl (a line cut short by a kill is dropped and redone).

Data: JSONL (or a JSON list) of records; see `core.task_from_record` and the README's "Real
benchmarks" section for the keys read (question, answers merged from every alias, image paths,
URLs, base64 or {"bytes"}, multiple-choice options). Other layouts (parquet, TSV, Hugging Face
datasets, nested JSON): convert them first with data/convert.py.
"""
import argparse
import json
import os
from collections import Counter
from pathlib import Path

import mmsearch_r1 as core
import tools

def load_tasks(path, image_root=None, image_ext=None, allow_no_image=False, inline_dir=None, fetch=None):
    """Benchmark records -> our task dicts {id, question, answers, image, _root} (extra keys kept),
    via `core.task_from_record` (the keyword arguments are its). A record that can't be used (bad
    JSON, not an object, no question or answers, no image, a repeated id) becomes {id, question,
    answers, error}: an error line in the results, and the run goes on; when most records fail,
    the run stops before it starts and says why. Line numbers are the file's own."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"eval: no data file at {path}")
    text = path.read_text(encoding="utf-8", errors="replace")
    if text.lstrip().startswith("["):
        try:
            records = [(n, r) for n, r in enumerate(json.loads(text), start=1)]
        except json.JSONDecodeError as e:
            raise SystemExit(f"eval: {path} is not a valid JSON list: {e}") from None
        where = "record"
    else:
        records = []
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append((n, json.loads(line)))
                except json.JSONDecodeError as e:
                    records.append((n, ValueError(f"not valid JSON ({e.msg})")))
        where = "line"
    tasks, seen, problems = [], set(), Counter()
    for n, r in records:
        try:
            if isinstance(r, ValueError):
                raise r
            if not isinstance(r, dict):
                raise ValueError(f"a record must be a JSON object, got {type(r).__name__}")
            task = core.task_from_record(r, path.parent, image_root, image_ext, allow_no_image, inline_dir, fetch,
                                         default_id=str(n))
            if task["id"] in seen:
                raise ValueError(f"repeats the id {task['id']!r} of an earlier record")
        except ValueError as e:
            ids = core.record_values(r, core.ID_KEYS) if isinstance(r, dict) else []
            rid = str(ids[0][1]) if ids and str(ids[0][1]) not in seen else f"{where}{n}"
            problems[str(e).split(" (")[0].split(":")[0]] += 1
            task = {"id": rid, "question": "", "answers": [], "error": f"{path.name} {where} {n}: {e}"}
        seen.add(task["id"])
        tasks.append(task)
    if sum(problems.values()) > len(records) / 2:
        first_error = next(t["error"] for t in tasks if "error" in t)
        raise SystemExit(f"eval: {sum(problems.values())} of {len(records)} records in {path} cannot be used ("
                         + "; ".join(f"{k}: {v}" for k, v in problems.most_common(3))
                         + f"). The first: {first_error}. Check the layout against the README's "
                         "'Real benchmarks' table, or convert the file with data/convert.py.")
    return tasks


def read_results(path):
    """Finished lines of results.jsonl. Every valid line is kept, whatever is around it; a corrupt
    line (or one cut short by a kill) is reported and dropped, and the file is rewritten with the
    valid lines only, so that what is missing is redone."""
    if not path.exists():
        return []
    good, bad, raw = [], [], path.read_bytes()
    for n, line in enumerate(raw.splitlines(keepends=True), start=1):
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or "id" not in row or not line.endswith(b"\n"):
                raise ValueError
            good.append(row)
        except ValueError:
            bad.append(n)
    if bad:
        print(f"eval: {path}: dropped {len(bad)} unreadable line(s) ({', '.join(map(str, bad[:10]))}); they are redone")
        core.write_jsonl(path, good)
    return good


RUN_SETTINGS = ("model", "data", "n", "temperature", "top_p", "top_k", "max_turns", "max_new_tokens", "max_context", "max_images", "no_tools", "system",
                "backend", "corpus", "image_index", "k", "metric", "judge_model", "seed", "limit", "min_pixels",
                "max_pixels", "crop_max_pixels", "crop_upscale", "visit_chars", "allow_private_urls")


def check_args(args):
    """Wrong flags get one line saying what is wrong and what to do, before any work."""
    import torch
    out, html = Path(args.out), Path(args.html) if args.html else None
    if out.exists() and not out.is_dir():
        raise SystemExit(f"eval: --out {out} is a file; give a folder")
    if html is not None:
        if html.is_dir():
            raise SystemExit(f"eval: --html {html} is a folder; give a file name like {html / 'report.html'}")
        parent = next((p for p in [html.parent, *html.parent.parents] if p.exists()), Path("."))
        if not os.access(parent, os.W_OK):
            raise SystemExit(f"eval: --html {html}: cannot write under {parent}")
    if args.dtype and args.dtype not in ("bf16", "bfloat16", "fp16", "float16", "fp32", "float32"):
        raise SystemExit(f"eval: --dtype {args.dtype!r}: use bf16, fp16 or fp32")
    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("eval: --device cuda, but this torch has no CUDA device; use --device cpu")
    if args.device and args.device not in ("cpu", "mps") and not args.device.startswith("cuda"):
        raise SystemExit(f"eval: --device {args.device!r}: use cuda, mps or cpu")
    if core.missing_local_model(args.model):
        raise SystemExit(f"eval: --model {args.model}: no such folder (a local model folder, or a hub id like Qwen/Qwen2.5-VL-3B-Instruct)")
    if args.metric == "judge":
        try:
            core.JudgeEndpoint(args.judge_url, args.judge_model, args.judge_key)
        except ValueError as e:
            raise SystemExit(f"eval: --metric judge: {e}") from None
    if args.n < 1 or args.batch < 1 or args.max_turns < 1:
        raise SystemExit("eval: --n, --batch and --max-turns must be at least 1")
    if not args.no_tools:
        tools.check_tool_args(args)
    given = {k: getattr(args, k) for k in ("temperature", "top_p", "top_k") if getattr(args, k) is not None}
    try:   # the flags given; the checkpoint's own values are checked once it is loaded
        core.check_sampling(**{"temperature": 0.0, "top_p": 1.0, "top_k": 0, **given})
    except ValueError as e:
        raise SystemExit(f"eval: {e}") from None


def sampling_settings(args, policy):
    """temperature / top_p / top_k: the flag if given, else the checkpoint's generation_config.json,
    else greedy."""
    fallback = {"temperature": 0.0, "top_p": 1.0, "top_k": 0}
    flags = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}
    return {k: flags[k] if flags[k] is not None else policy.sampling.get(k, fallback[k]) for k in fallback}


NO_TOOLS_PROMPT = ("You answer questions about images. Think inside <think>...</think>, then give the "
                   "final answer inside <answer>...</answer>. No tools are available.")


def markdown_table(summary):
    rows = ["| metric | value |", "|---|---|"]
    for k, v in summary.items():
        if isinstance(v, float):
            v = f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
        elif isinstance(v, dict):
            v = ", ".join(f"{a}: {b}" for a, b in sorted(v.items()))
        rows.append(f"| {k} | {v} |")
    return "\n".join(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # model and data
    ap.add_argument("--model", required=True, help="hub id or local folder of a Qwen2/2.5/3-VL model")
    ap.add_argument("--data", required=True, help="benchmark JSONL (see the keys above)")
    ap.add_argument("--out", default="runs/eval", help="folder for results.jsonl, summary.json, images/")
    ap.add_argument("--limit", type=int, default=None, help="evaluate only the first N examples")
    ap.add_argument("--resume", action="store_true", help="skip examples already in results.jsonl")
    ap.add_argument("--force", action="store_true", help="with --resume: continue even if the settings changed")
    ap.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    ap.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: bf16 on a GPU, else fp32)")
    # agent
    ap.add_argument("--n", type=int, default=1, help="samples per example (avg@n, pass@n)")
    ap.add_argument("--max-turns", type=int, default=6, help="assistant turns (raise it to measure turn scaling)")
    ap.add_argument("--max-new-tokens", type=int, default=1024, help="tokens per assistant turn")
    ap.add_argument("--max-context", type=int, default=16384, help="tokens per trajectory")
    ap.add_argument("--max-images", type=int, default=12, help="question images plus crops")
    ap.add_argument("--temperature", type=float, default=None,
                    help="0 is greedy (default: the checkpoint's generation_config.json, else 0)")
    ap.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (default: the checkpoint's, else 1)")
    ap.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest ids (default: the checkpoint's, else 0 = off)")
    ap.add_argument("--min-pixels", type=int, default=None, help="smallest image after resizing (default: the processor's)")
    ap.add_argument("--max-pixels", type=int, default=None,
                    help="question images resized to at most this many pixels (default: about 1024 visual tokens)")
    ap.add_argument("--crop-max-pixels", type=int, default=None,
                    help="crops resized to at most this many pixels (default: about 1024 visual tokens)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    ap.add_argument("--batch", type=int, default=8, help="examples rolled out together (x n rows)")
    ap.add_argument("--no-tools", action="store_true", help="direct-answer baseline: one turn, no tools")
    ap.add_argument("--system", default=None, help="system prompt text (default: the tools prompt, core.system_prompt; "
                    "with --no-tools, the direct-answer prompt)")
    tools.add_tool_arguments(ap)
    # scoring
    ap.add_argument("--metric", default="em", choices=core.METRICS,
                    help="correctness metric (numeric: InfoSeek's 10%% tolerance; recall: DynVQA's token recall; "
                         "multiple-choice tasks are scored by letter)")
    ap.add_argument("--image-root", default=None, help="folder the records' image paths or ids are relative to "
                    "(default: the data file's folder)")
    ap.add_argument("--image-ext", default=None, help="extension added to image ids without one, e.g. jpg (InfoSeek)")
    ap.add_argument("--allow-no-image", action="store_true", help="run records that have no image (text-only)")
    ap.add_argument("--fetch-images", action="store_true", help="download image URLs in the records "
                    "(public addresses only) into OUT/inputs/")
    ap.add_argument("--judge-url", default="", help="OpenAI-compatible base URL (or $JUDGE_BASE_URL)")
    ap.add_argument("--judge-model", default="", help="judge model name (or $JUDGE_MODEL)")
    ap.add_argument("--judge-key", default="", help="judge API key (or $JUDGE_API_KEY)")
    ap.add_argument("--html", default=None, help="write a self-contained HTML report here")
    args = ap.parse_args(argv)
    check_args(args)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fetch = tools.WebPages(timeout=30, max_bytes=20_000_000, allow_private=args.allow_private_urls).fetch_image \
        if args.fetch_images else None
    tasks = load_tasks(args.data, args.image_root, args.image_ext, args.allow_no_image, out / "inputs", fetch)[:args.limit]
    results_path = out / "results.jsonl"
    if results_path.exists() and not args.resume:
        raise SystemExit(f"eval: {results_path} exists; pass --resume to continue it or choose another --out")
    settings = {k: getattr(args, k) for k in RUN_SETTINGS}
    settings_path = out / "settings.json"
    if args.resume and settings_path.exists() and not args.force:
        before = json.loads(settings_path.read_text())
        changed = {k: (before.get(k), v) for k, v in settings.items() if before.get(k) != v}
        if changed:
            raise SystemExit("eval: --resume with other settings than the run in " + str(out) + ": " +
                             "; ".join(f"--{k.replace('_', '-')} was {a!r}, now {b!r}" for k, (a, b) in changed.items())
                             + ". Use the same flags, another --out, or --force to mix them anyway.")
    settings_path.write_text(json.dumps(settings, indent=2))
    done = read_results(results_path)
    done_ids = {r["id"] for r in done}
    todo = [t for t in tasks if t["id"] not in done_ids]
    endpoint = core.JudgeEndpoint(args.judge_url, args.judge_model, args.judge_key) if args.metric == "judge" else None
    toolbox = tools.toolbox_from_args(args)   # before the model: a bad corpus or index stops the run in seconds
    with core.stop_on_bad_input("eval"):
        policy = core.load_policy(args.model, device=args.device, dtype=args.dtype, min_pixels=args.min_pixels,
                                  max_pixels=args.max_pixels, crop_max_pixels=args.crop_max_pixels)
    sampling = sampling_settings(args, policy)
    try:
        core.check_sampling(**sampling)
    except ValueError as e:
        raise SystemExit(f"eval: {e} (flags --temperature / --top-p / --top-k, else the checkpoint's "
                         "generation_config.json)") from None
    if args.n > 1 and sampling["temperature"] == 0:
        raise SystemExit(f"eval: --n {args.n} at temperature 0 gives {args.n} identical samples (pass@n == avg@n); "
                         "pass --temperature, e.g. 0.7")
    toolbox.for_policy(policy)
    print(f"eval: {len(tasks)} examples, {len(done_ids & {t['id'] for t in tasks})} already done, {len(todo)} to run")

    with open(results_path, "a", encoding="utf-8") as f:
        for start in range(0, len(todo), args.batch):
            chunk = []
            for task in todo[start:start + args.batch]:
                if "error" in task:   # a record that could not be read
                    f.write(json.dumps(task, ensure_ascii=False) + "\n")
                    continue
                try:   # load images up front: a broken example is an error line, not a crash
                    task = dict(task, image=core.task_images(task))
                    chunk.append(task)
                except ValueError as e:
                    line = {"id": task["id"], "question": task["question"], "answers": task["answers"], "error": str(e)}
                    f.write(json.dumps(line, ensure_ascii=False) + "\n")
                    f.flush()
            if not chunk:
                continue
            lines = core.evaluate(policy, chunk, toolbox, n=args.n, metric=args.metric, endpoint=endpoint,
                                  cache=toolbox.cache, image_dir=(out / "images").resolve(),
                                  max_turns=1 if args.no_tools else args.max_turns, max_new_tokens=args.max_new_tokens,
                                  max_context=args.max_context, max_images=args.max_images, **sampling,
                                  seed=args.seed + start, max_batch=args.batch * args.n,
                                  system=args.system or (NO_TOOLS_PROMPT if args.no_tools else None))
            for line in lines:
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
    results = [r for r in read_results(results_path) if r["id"] in {t["id"] for t in tasks}]
    summary = core.summarize(results)
    summary["sampling"] = sampling
    summary["settings"] = settings
    summary["image budgets (pixels)"] = {"min": policy.min_pixels, "question": policy.max_pixels,
                                         "crop": policy.crop_max_pixels}
    if args.html:
        core.write_report(args.html, results, summary)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))   # last: run.py's sign of a finished eval
    print(markdown_table(summary))
    failed = [r for r in results if "error" in r]
    if failed:   # the table counts them; say which, so nobody has to dig through results.jsonl
        print(f"eval: {len(failed)} of {len(results)} examples could not be run and are left out of accuracy "
              f"and pass@n ('error' in {results_path}); the first, {failed[0]['id']!r}: {failed[0]['error']}")
    if args.html:
        print(f"eval: report written to {args.html}")
    return summary


if __name__ == "__main__":
    main()
