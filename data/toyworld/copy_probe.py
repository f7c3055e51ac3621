"""Does an SFT model copy what a tool answer shows? A teacher-forced probe of its checkpoints.

    python data/toyworld/copy_probe.py runs/toy/sft runs/toy/world     # every step_* checkpoint, then final/

The toy world's agent must copy two things out of tool answers: the page id from the search
result into its `visit` call, and the year from the page into its thought ("The page says:
Construction was completed in 1830."), from where the answer repeats it. A greedy evaluation
only shows a copy the model also decides to use; this scores it directly. For each checkpoint,
the world's expert trajectories (the hard training tasks on the *real* pages, whose page ids no
SFT trajectory shows: those all read renumbered copies, prepare.py --renumber) are run through
the model teacher-forced, and it prints the mean probability the model gives each digit it writes
in a visited url and in the year it quotes from the page (about 0.1 is a guess among ten digits;
the answer's digits, which repeat the quote a few tokens back, are not counted). In our runs the copy
forms as a jump within a few hundred steps, the year before the id (README, lab notes). run.py
keeps one checkpoint; for a curve, train with `train_sft.py --save-every 250 --keep-last 20`.
Appends one JSON line per checkpoint to copy_probe.jsonl in the run folder (re-running skips
those done).
"""
import argparse
import json
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import mmsearch_r1 as core  # noqa: E402

URL_DIGIT = re.compile(r"page/\d*$")           # the text before a digit of a visited page's id
YEAR_DIGIT = re.compile(r"completed in \d*$")  # ... before a digit of the year quoted from the page


def copy_probabilities(policy, records, root, batch=16):
    """(url digit probabilities, quoted year digit probabilities) of the written digits, teacher-forced."""
    url, year = [], []
    trajs = [core.trajectory_from_record(policy, r, root) for r in records]
    for i in range(0, len(trajs), batch):
        chunk = trajs[i:i + batch]
        with torch.no_grad():
            logp, _ = core.sequence_logprobs(policy, core.collate(policy, chunk))
        for b, traj in enumerate(chunk):
            text = ""
            for j, token in enumerate(traj.input_ids):
                piece = policy.tokenizer.decode([token])
                if traj.loss_mask[j] and piece.isdigit():
                    which = url if URL_DIGIT.search(text) else year if YEAR_DIGIT.search(text) else None
                    if which is not None:
                        which.append(float(logp[b, j].exp()))
                text += piece
    return url, year


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="an SFT output folder (step_* checkpoints and/or final/)")
    ap.add_argument("world", help="the toy world it was trained on (its expert.jsonl is scored)")
    args = ap.parse_args(argv)
    run, world = Path(args.run), Path(args.world)
    expert = world / "expert.jsonl"
    records = core.load_jsonl(expert) if expert.exists() else []
    if not records:
        raise SystemExit(f"copy_probe: no trajectories in {expert} (a world without hard questions?): nothing to score")
    checkpoints = [c for c in sorted(run.glob("step_*")) + [run / "final"] if (c / "config.json").exists()]
    if not checkpoints:
        raise SystemExit(f"copy_probe: no checkpoints in {run} (step_*/ or final/ with a config.json)")
    out = run / "copy_probe.jsonl"
    done = {json.loads(line)["checkpoint"] for line in out.read_text().splitlines()} if out.exists() else set()
    rows = []
    for ckpt in checkpoints:
        if ckpt.name in done:
            continue
        url, year = copy_probabilities(core.load_policy(ckpt), records, world)
        row = {"checkpoint": ckpt.name, "url_p": sum(url) / max(1, len(url)), "url_digits": len(url),
               "year_p": sum(year) / max(1, len(year)), "year_digits": len(year)}
        print(f"{ckpt.name}: url digits p {row['url_p']:.3f} (of {len(url)}), quoted year digits p "
              f"{row['year_p']:.3f} (of {len(year)})", flush=True)
        with open(out, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        rows.append(row)
    return rows


if __name__ == "__main__":
    main()
