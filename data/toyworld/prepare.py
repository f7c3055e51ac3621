"""Build the offline toy world that the quick start, the demo and the tests run on.

    python data/toyworld/prepare.py                       # -> data/toyworld/out/ (seconds, CPU)
    python data/toyworld/prepare.py --entities 60 --tasks 400 --out /tmp/toyworld

A world of made-up landmarks. Each has a procedural picture, a wiki page (title, url, facts
among distractor sentences) and an entry in an image-search index. A question image shows two to
four landmarks in the corners of a grey canvas; the question asks a fact (city, architect, year)
about the one in a named corner, so the agent has to crop, search the crop by image, read the
page, and answer. Writes to --out:

    images/            entity pictures and question scenes (PNG)
    corpus.jsonl       the pages: id, title, url, text (the local text search and page store)
    images.jsonl       the image index: image, title, url, snippet (the local image search)
    train.jsonl        tasks: id, image, question, answers (GRPO prompts)
    test.jsonl         held-out tasks (eval)
    sft.jsonl          oracle trajectories for the train tasks (crop -> image_search -> visit -> answer),
                       made by forcing the oracle's text through the real rollout loop and tools
    model/             a tiny random Qwen2.5-VL and its BPE tokenizer (build_tiny_policy)
"""
import argparse
import json
import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import mmsearch_r1 as core  # noqa: E402
import tools  # noqa: E402

SYLLABLES = "ka lo mi ren tas vor bel dun ish pra tem zol qui nor fa gel sun ard".split()
KINDS = ["tower", "bridge", "statue", "gate", "fountain", "lighthouse"]
SHAPES = ["circle", "square", "triangle", "stripes", "cross", "ring"]
PALETTE = [(220, 40, 40), (40, 170, 70), (40, 80, 220), (230, 190, 40), (150, 60, 200), (30, 190, 200),
           (240, 120, 30), (120, 120, 120), (250, 250, 250), (20, 20, 20)]
CORNERS = {"top-left": (0, 0), "top-right": (1, 0), "bottom-left": (0, 1), "bottom-right": (1, 1)}
QUESTIONS = {"city": "In which city is the {kind} in the {corner} corner of the image?",
             "architect": "Who designed the {kind} in the {corner} corner of the image?",
             "year": "In what year was the {kind} in the {corner} corner of the image completed?"}
TILE, SCENE = 64, (224, 160)


def name(rng, parts=2):
    return "".join(rng.choice(SYLLABLES) for _ in range(parts)).capitalize()


def make_entities(n, rng):
    combos = [(bg, fg, s) for bg in range(len(PALETTE)) for fg in range(len(PALETTE)) for s in range(len(SHAPES)) if bg != fg]
    rng.shuffle(combos)
    entities, used = [], set()
    for i in range(n):
        title = name(rng)
        while title in used:
            title = name(rng, 3)
        used.add(title)
        kind = KINDS[i % len(KINDS)]
        entities.append({"title": f"{title} {kind.capitalize()}", "kind": kind, "look": combos[i],
                         "city": f"{name(rng)}ville", "architect": f"{name(rng)} {name(rng)}",
                         "year": str(rng.randint(1200, 2020)), "slug": f"{title.lower()}_{kind}"})
    return entities


def draw_entity(look):
    bg, fg, shape = PALETTE[look[0]], PALETTE[look[1]], SHAPES[look[2]]
    img = Image.new("RGB", (TILE, TILE), bg)
    d = ImageDraw.Draw(img)
    if shape == "circle":
        d.ellipse((12, 12, 52, 52), fill=fg)
    elif shape == "square":
        d.rectangle((16, 16, 48, 48), fill=fg)
    elif shape == "triangle":
        d.polygon([(32, 8), (56, 56), (8, 56)], fill=fg)
    elif shape == "stripes":
        for y in range(0, TILE, 16):
            d.rectangle((0, y, TILE, y + 7), fill=fg)
    elif shape == "cross":
        d.rectangle((26, 6, 38, 58), fill=fg)
        d.rectangle((6, 26, 58, 38), fill=fg)
    else:
        d.ellipse((8, 8, 56, 56), outline=fg, width=9)
    return img


def page_text(e, rng, others):
    facts = [f"The {e['title']} is a {e['kind']} in {e['city']}.",
             f"It was designed by the architect {e['architect']}.",
             f"Construction was completed in {e['year']}."]
    filler = [f"Visitors often compare it with the {o['title']} in {o['city']}." for o in rng.sample(others, 2)]
    filler.append(f"The {e['kind']} is lit at night and appears on local postcards.")
    paragraphs = facts + filler
    rng.shuffle(paragraphs)
    return "\n\n".join(paragraphs)


def oracle_turns(task, e, convention, shown):
    """The oracle's four assistant turns for a task: crop the landmark, search it, read, answer."""
    W, H = SCENE
    box = task["box"]                                                               # pixels of the scene
    scale = {"abs": (shown[0] / W, shown[1] / H), "rel1000": (1000 / W, 1000 / H), "rel": (1 / W, 1 / H)}[convention]
    bbox = [round(v * scale[i % 2], 3 if convention == "rel" else None) for i, v in enumerate(box)]
    call = core.format_tool_call
    return [f"<think>The question is about the {task['corner']} corner. I will zoom in there.</think>\n"
            + call("crop", {"image": 0, "bbox_2d": bbox}),
            "<think>I do not recognise this landmark. I will search for the crop.</think>\n"
            + call("image_search", {"image": 1}),
            f"<think>The top result is the {e['title']}. I will read its page.</think>\n"
            + call("visit", {"url": f"http://toyworld.local/wiki/{e['slug']}", "goal": task["field"]}),
            f"<think>The page answers it.</think>\n<answer>{task['answers'][0]}</answer>"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).parent / "out"), help="output folder")
    ap.add_argument("--entities", type=int, default=40, help="landmarks in the world")
    ap.add_argument("--tasks", type=int, default=240, help="questions (train + test)")
    ap.add_argument("--test-fraction", type=float, default=0.25, help="share of questions held out")
    ap.add_argument("--seed", type=int, default=0, help="random seed (the world is deterministic)")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    out = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)

    # 1. entities: pictures, pages, the image index
    entities = make_entities(args.entities, rng)
    corpus, index = [], []
    for i, e in enumerate(entities):
        draw_entity(e["look"]).save(out / "images" / f"entity_{i:03d}.png")
        url = f"http://toyworld.local/wiki/{e['slug']}"
        corpus.append({"id": str(i), "title": e["title"], "url": url,
                       "text": page_text(e, rng, entities[:i] + entities[i + 1:])})
        index.append({"image": f"images/entity_{i:03d}.png", "title": e["title"], "url": url,
                      "snippet": f"{e['title']}, a {e['kind']}."})
    write_jsonl(out / "corpus.jsonl", corpus)
    write_jsonl(out / "images.jsonl", index)

    # 2. tasks: scenes with 2-4 landmarks in corners, a question about one of them
    tasks = []
    for t in range(args.tasks):
        corners = rng.sample(list(CORNERS), rng.randint(2, 4))
        members = rng.sample(range(len(entities)), len(corners))
        scene = Image.new("RGB", SCENE, (200, 200, 200))
        boxes = []
        for corner, m in zip(corners, members):
            cx, cy = CORNERS[corner]
            x = cx * SCENE[0] // 2 + rng.randint(4, SCENE[0] // 2 - TILE - 4)
            y = cy * SCENE[1] // 2 + rng.randint(4, SCENE[1] // 2 - TILE - 4)
            scene.paste(Image.open(out / "images" / f"entity_{m:03d}.png"), (x, y))
            boxes.append([x, y, x + TILE, y + TILE])
        scene.save(out / "images" / f"scene_{t:04d}.png")
        target = rng.randrange(len(corners))
        e, field = entities[members[target]], rng.choice(list(QUESTIONS))
        tasks.append({"id": f"toy{t:04d}", "image": f"images/scene_{t:04d}.png",
                      "question": QUESTIONS[field].format(kind=e["kind"], corner=corners[target]),
                      "answers": [e[field]], "corner": corners[target], "field": field, "entity": members[target],
                      "box": boxes[target]})
    n_test = int(len(tasks) * args.test_fraction)
    write_jsonl(out / "test.jsonl", tasks[:n_test])
    write_jsonl(out / "train.jsonl", tasks[n_test:])

    # 3. the tiny model, with a tokenizer trained on the world's text
    texts = [d["text"] for d in corpus] + [t["question"] for t in tasks] + [core.system_prompt(c) for c in core.CONVENTION_TEXT]
    shown = (SCENE[0], SCENE[1])
    sample_turns = oracle_turns(tasks[0], entities[tasks[0]["entity"]], "abs", shown)
    core.build_tiny_policy(out / "model", texts + sample_turns * 20)
    policy = core.load_policy(out / "model")

    # 4. oracle trajectories through the real loop and tools
    text = tools.LocalTextSearch(out / "corpus.jsonl")
    toolbox = tools.Toolbox(text_search=text, image_search=tools.LocalImageSearch(out / "images.jsonl"), pages=text,
                            convention=policy.crop_convention, shown_size=policy.shown_size, k=3)
    train = [dict(t, _root=str(out)) for t in tasks[n_test:]]
    shown = policy.shown_size(Image.open(out / train[0]["image"]))
    scripts = {t["id"]: oracle_turns(t, entities[t["entity"]], policy.crop_convention, shown) for t in train}
    trajs = core.rollout(policy, train, toolbox, max_turns=4, max_images=4, max_context=8192,
                         forced=lambda task, turn: scripts[task["id"]][turn], progress=False)
    records, correct, found = [], 0, 0
    for task, traj in zip(train, trajs):
        value, parts = core.reward(traj, task)
        correct += parts["correct"] == 1.0
        search = next((c for c in traj.tool_calls if c["name"] == "image_search"), None)
        tool_turns = [m["content"] for m in traj.messages if m["role"] == "tool"]
        found += search is not None and entities[task["entity"]]["title"] in str(tool_turns[1])
        records.append(core.trajectory_to_record(traj, image_dir=out / "images" / "crops"))
    write_jsonl(out / "sft.jsonl", records)
    print(f"toy world in {out}: {len(entities)} landmarks, {len(train)} train / {n_test} test tasks, "
          f"{len(records)} oracle trajectories")
    print(f"oracle: image search on the crop finds the landmark in {found}/{len(train)}; "
          f"final answer correct in {correct}/{len(train)}")
    return {"train": len(train), "test": n_test, "search_found": found, "correct": correct}


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
