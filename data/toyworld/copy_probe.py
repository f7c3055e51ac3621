"""Does an SFT model copy what a tool answer shows? A teacher-forced probe of its checkpoints.

    python data/toyworld/copy_probe.py runs/toy/sft runs/toy/world     # every step_* checkpoint, then final/

The toy world's agent must copy two things out of tool answers: the page id from the search
result into its `visit` call, and the year from the page into its thought ("The page says:
Construction was completed in 1830."), from where the answer repeats it. A greedy evaluation
only shows a copy the model also decides to use; this scores it directly. For each checkpoint,
the world's expert trajectories (the hard training tasks on the *real* pages, whose page ids no
SFT trajectory shows: those all read renumbered copies, prepare.py --renumber) are run through
the model teacher-forced, and it prints the mean probability the model gives each digit it writes
in a visited url (also apart: in the think that names it, copied from the search result, and in
the visit call, copied from the think) and in the year it quotes from the page (about 0.1 is a
guess among ten digits; the answer's digits, which repeat the quote a few tokens back, are not
counted). In our runs the copy
forms as a jump within a few hundred steps, the year before the id (README, lab notes).
On the hard questions' SFT trajectories it also scores the kind check: after each image search
the think copies the top hit's kind ("The top result is a gate") and the next token decides,
"." to read that page (the asked kind) or "," to try another corner; it prints the mean
probability of the kind copied and of the decision, apart for a match and a miss (a model that
does not compare the kinds gives both about the same). On the crop questions' searched SFT
trajectories (the first 200) it scores the corner the first think copies from the question ("The question is
about the image's bottom-right corner": " bottom" and "-right"; a guess is about 0.5). On the
two-hop questions' searched SFT trajectories without a misspelled query it scores the first word of
the twin's name, copied from the page into the think ("Its twin is the Zolgelnor Tower.") and then
into the text search's query (these landmarks' twins are the same in every SFT trajectory, so a
model can also have learned some by heart). run.py
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
URL_IN_CALL = re.compile(r'"url": "\S*$')         # ... in the visit call (else in the think before it)
YEAR_DIGIT = re.compile(r"completed in \d*$")  # ... before a digit of the year quoted from the page
HIT_KIND = re.compile(r"<think>The top result is a$")      # before the kind copied from the hit
DECISION = re.compile(r"<think>The top result is a \w+$")  # before "." (read it) or "," (another corner)
TWIN_THINK = re.compile(r"The page says: Its twin is the$")   # before the name's first word, in the think
TWIN_QUERY = re.compile(r'"query": "$')                      # ... in the text search's query
CORNER = re.compile(r"<think>The question is about the image's(?: top| bottom)?$")   # before " top", "-left" ...


def written_probabilities(policy, records, root, batch=16):
    """Each record's written tokens, teacher-forced: [(text before the token, token, its probability)]."""
    out = []
    trajs = [core.trajectory_from_record(policy, r, root) for r in records]
    for i in range(0, len(trajs), batch):
        chunk = trajs[i:i + batch]
        with torch.no_grad():
            logp, _ = core.sequence_logprobs(policy, core.collate(policy, chunk))
        for b, traj in enumerate(chunk):
            text, tokens = "", []
            for j, token in enumerate(traj.input_ids):
                piece = policy.tokenizer.decode([token])
                if traj.loss_mask[j]:
                    tokens.append((text, piece, float(logp[b, j].exp())))
                text += piece
            out.append(tokens)
    return out


def copy_probabilities(policy, records, root):
    """The written digits' probabilities, teacher-forced: (page id digits in the think, in the visit
    call, quoted year digits). The think's copy is from the search result, the call's from the think."""
    url_think, url_call, year = [], [], []
    for tokens in written_probabilities(policy, records, root):
        for text, piece, p in tokens:
            if not piece.isdigit():
                continue
            if URL_DIGIT.search(text):
                (url_call if URL_IN_CALL.search(text) else url_think).append(p)
            elif YEAR_DIGIT.search(text):
                year.append(p)
    return url_think, url_call, year


def kind_check(policy, records, root):
    """On hard trajectories: the probabilities of the hit's kind copied, and of the decision after
    it on a match ("." read it) and on a miss ("," another corner)."""
    kind, match, miss = [], [], []
    for tokens in written_probabilities(policy, records, root):
        for text, piece, p in tokens:
            if HIT_KIND.search(text):
                kind.append(p)
            elif DECISION.search(text):
                (match if piece.startswith(".") else miss).append(p)
    return kind, match, miss


def corner_copy(policy, records, root):
    """On crop trajectories: the probabilities of the corner's words the first think copies from the question."""
    return [p for tokens in written_probabilities(policy, records, root) for text, piece, p in tokens
            if CORNER.search(text)]


def twin_copy(policy, records, root):
    """On two-hop trajectories: the probabilities of the twin's first word in the think and in the query."""
    think, query = [], []
    for tokens in written_probabilities(policy, records, root):
        for text, piece, p in tokens:
            if TWIN_THINK.search(text):
                think.append(p)
            elif TWIN_QUERY.search(text):
                query.append(p)
    return think, query


def mean(xs):
    return sum(xs) / max(1, len(xs))


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
    types = {t["id"]: t["type"] for t in core.load_jsonl(world / "train.jsonl")}
    sft = core.load_jsonl(world / "sft.jsonl")
    hard = [r for r in sft if types[r["id"]] == "hard"]
    crop = [r for r in sft if types[r["id"]] == "crop" and len(r["messages"]) > 3][:200]   # searched (a memory answer: one turn)
    twohop = [r for r in sft if types[r["id"]] == "twohop" and
              sum('"text_search"' in m["content"] for m in r["messages"] if m["role"] == "assistant") == 1][:200]
    checkpoints = [c for c in sorted(run.glob("step_*")) + [run / "final"] if (c / "config.json").exists()]
    if not checkpoints:
        raise SystemExit(f"copy_probe: no checkpoints in {run} (step_*/ or final/ with a config.json)")
    out = run / "copy_probe.jsonl"
    done = {json.loads(line)["checkpoint"] for line in out.read_text().splitlines()} if out.exists() else set()
    rows = []
    for ckpt in checkpoints:
        if ckpt.name in done:
            continue
        policy = core.load_policy(ckpt)
        url_think, url_call, year = copy_probabilities(policy, records, world)
        url = url_think + url_call
        kind, match, miss = kind_check(policy, hard, world)
        corner = corner_copy(policy, crop, world)
        twin_think, twin_query = twin_copy(policy, twohop, world)
        row = {"checkpoint": ckpt.name, "url_p": mean(url), "url_digits": len(url), "url_think_p": mean(url_think),
               "url_call_p": mean(url_call), "year_p": mean(year),
               "year_digits": len(year), "kind_p": mean(kind), "kinds": len(kind), "read_on_match_p": mean(match),
               "matches": len(match), "go_on_after_miss_p": mean(miss), "misses": len(miss),
               "corner_p": mean(corner), "corner_tokens": len(corner), "twin_think_p": mean(twin_think),
               "twin_query_p": mean(twin_query), "twins": len(twin_query)}
        print(f"{ckpt.name}: url digits p {row['url_p']:.3f} (of {len(url)}: think {row['url_think_p']:.3f}, call "
              f"{row['url_call_p']:.3f}), quoted year digits p "
              f"{row['year_p']:.3f} (of {len(year)}); hard: the hit's kind p {row['kind_p']:.3f} (of {len(kind)}), "
              f"read it on a match p {row['read_on_match_p']:.3f} (of {len(match)}), another corner after a miss p "
              f"{row['go_on_after_miss_p']:.3f} (of {len(miss)}); crop: the question's corner p "
              f"{row['corner_p']:.3f} (of {len(corner)}); twohop: the twin's name in the think p "
              f"{row['twin_think_p']:.3f}, in the query p {row['twin_query_p']:.3f} (of {len(twin_query)})", flush=True)
        with open(out, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        rows.append(row)
    return rows


if __name__ == "__main__":
    main()
