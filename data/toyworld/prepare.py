"""Build the offline toy world that the quick start, the main command and the tests run on.

    python data/toyworld/prepare.py                       # -> data/toyworld/out/ (about a minute, CPU)
    python data/toyworld/prepare.py --entities 40 --tasks 120 --out /tmp/toyworld   # a small one

A world of made-up landmarks (towers, bridges, gates, ...). Each has its own procedural picture,
a wiki page (its city, architect and year among distractor sentences) and an entry in an
image-search index whose title names its kind ("Kalomi Tower"). Questions, tagged by `type`:

    visual   one landmark fills the image; "What shape is drawn on this tower?"   (no search needed)
    whole    one landmark fills the image; "In what year was this tower completed?"
             (image_search on the image -> visit -> answer)
    crop     two to four landmarks in the corners; "In what year was the gate in the image's
             top-left corner completed?"  (crop the corner -> image_search on the crop -> visit -> answer)
    twohop   one landmark fills the image; "In what year was the twin of this tower completed?"
             (image_search -> visit for its twin -> text_search the twin's name -> visit -> answer;
             in --typos of the oracle's, the first text_search misspells the name, finds nothing
             and is revised)
    hard     three landmarks in three corners, among clutter: the asked one and two of one other kind
             (--hard-decoys, default fountains); "In what year was the statue in this image
             completed?" (crop a corner -> image_search -> if the top hit is of another kind, try
             another corner -> visit -> answer: trial and error, as in Mini-o3). The oracle gives up
             after a first miss in --hard-memory of them (answers from memory), a cold start that
             explores too little, as Mini-o3's: GRPO finds the next corner. With --scene-scale 2
             the corner scenes are twice as large and their landmarks not: small targets the model
             sees at half their pixels, which a crop (cut from the full image) shows whole (measured,
             not the default: NOTES.md)

--mix picks the types and their shares (default: all five, the main command's world; the README's
three-type world, --mix visual:0.2,whole:0.3,crop:0.5, was the default until 2026-11-30).

The oracle that writes the SFT data knows every landmark. On a share of the knowledge questions
(--direct, default half the whole and twohop questions, a quarter of the crop ones) it answers
from that knowledge without searching, as a strong model that recognises famous landmarks would
(MMSearch-R1's on-demand search); on the rest it searches,
opens the top hit and copies the year. Every oracle trajectory ends with the right answer. The
policy learns both habits in SFT, but a 600K-parameter model cannot remember 160 landmarks'
years: when to search is the decision left for GRPO to learn from the reward, and the one the
papers report RL learning. Test scenes are never seen in training, and a share of the landmarks
(--unseen) appear only in test questions.

Memory and the page agree on every landmark, so an SFT model may learn to answer a searched
question from the picture and never read the page (the README's moved-pages check found five SFT
models of six doing so). On a share of the searched trajectories (--redated, default all) the
oracle searches the same way but reads re-dated pages, where every landmark's year is drawn anew
(REDATED copies of the corpus, one drawn per trajectory; --views K reads each task on K of
them and repeats the other trajectories K times), and answers the page's year: there,
copying the page is the only way to be right, as no landmark keeps one year a model could learn.
(A fixed re-dating, one moved year per landmark, was tried first: the SFT and GRPO models learned
both years of a landmark and chose between them, and read nothing on unseen landmarks.) The eval's
check, corpus_moved.jsonl, moves every year by 311 (moved_year), a year no trajectory shows.
The same holds for the page id the agent visits: a model can learn each landmark's id by heart
and never copy it from the search results (it then opens wrong pages on landmarks it never saw);
so each re-dated copy also shuffles the page ids among the landmarks (--renumber, default on).

Made so that a tiny model can copy what it needs out of a tool's answer (a 2-layer model copies
the way an induction head does, we believe: find the token before the one to copy elsewhere in the
context, take the token after it; so that token should be rare there). README has the measurements:
- what it copies is digits, not made-up names: a page's URL is a short number
  (http://toyworld.local/page/482) and a search shows one result (--k 1), so the id to copy
  is the latest one in the context (with 3 results, seed 2's SFT model never formed that copy);
  `visit` keeps only the sentence that answers the oracle's goal (--visit-chars), as the papers'
  page summarizer does, so the year is the page's only number;
- the words before a copy are rare in the context: the corner follows "image's", and the
  memory answers' thinks do not say "completed in", the words before the year that the search
  path's think copies from the page. Writes to --out:

    images/            landmark pictures and question scenes (PNG)
    corpus.jsonl       the pages: id, title, url, text (the local text search and page store)
    corpus_moved.jsonl the same pages with every year moved (moved_year): the main command's check
                       that a model reads the page (an agent that recalls answers the true year)
    sft_pages/         corpus_0.jsonl ... : the re-dated pages the --redated trajectories read, and
                       images_0.jsonl ...: their image indexes (the urls differ with --renumber)
    images.jsonl       the image index: image, title, url, snippet (the local image search)
    train.jsonl        tasks: id, type, image, question, answers (GRPO prompts), moved_answers (the
                       answer on corpus_moved.jsonl; knowledge questions)
    val.jsonl, test.jsonl   held-out tasks (new scenes; test also has the unseen landmarks)
    sft.jsonl          oracle trajectories for train tasks, made by forcing the oracle's text
                       through the real rollout loop and tools (kept where the answer is right);
                       those that read re-dated pages carry "pages" (the corpus) and "answers"
    expert.jsonl       for hard train tasks, the direct path (the right corner first): AHPO's expert data
    system.txt         the world's short system prompt (used by the SFT data, eval and GRPO)
    model/             a tiny random Qwen2.5-VL (2 layers, hidden 128, tied embeddings) and its BPE
                       tokenizer (build_tiny_policy)
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
RECOGNISABLE = ("whole", "crop", "twohop")   # knowledge questions --direct answers from memory
QUESTIONS = {"visual": "What shape is drawn on this {kind}?",
             "whole": "In what year was this {kind} completed?",
             "crop": "In what year was the {kind} in the image's {corner} corner completed?",
             "twohop": "In what year was the twin of this {kind} completed?",
             "hard": "In what year was the {kind} in this image completed?"}
TILE, SCENE, MARGIN = 64, (224, 160), 8
URL = "http://toyworld.local/page/{page}"
REDATED = 8   # re-dated copies of the corpus for the --redated trajectories
GOAL = "when was it completed"   # the oracle's visit goal: visit keeps the sentence that answers it
TWIN_GOAL = "its twin"           # the first visit of a two-hop question keeps "Its twin is the X."
# The world's system prompt, one line: the full tools prompt (core.system_prompt, ~400 tokens of
# this tokenizer) would be most of every row, and a tiny model trained for minutes on a CPU learns to
# read the question far faster without it; the SFT data teaches the format. Against the longer prompt
# before (113 tokens, the tags and the tools' arguments spelled out) SFT rows are a fifth shorter and
# the main command about two minutes quicker (data/toyworld/NOTES.md). Written to system.txt; the
# main command passes it to every stage.
SYSTEM = "Answer the question about the image, or call a tool: crop, image_search, text_search or visit."


def moved_year(year):
    """The year a moved page gives: 311 years off, inside the world's range of years."""
    return str(int(year) + (311 if int(year) < 1500 else -311))


def name(rng, parts=2):
    return "".join(rng.choice(SYLLABLES) for _ in range(parts)).capitalize()


def make_entities(n, rng, twins=False):
    """n landmarks, each with its own picture (colours and shape), kind and facts; with `twins`,
    each also names another landmark as its twin (what a two-hop question asks about)."""
    looks = [(bg, fg, s) for bg in range(len(PALETTE)) for fg in range(len(PALETTE)) for s in range(len(SHAPES))
             if bg != fg]
    if n > len(looks):
        raise SystemExit(f"--entities {n}: the world has {len(looks)} distinct pictures (background, colour, "
                         "shape); ask for at most that many landmarks")
    rng.shuffle(looks)
    pages = rng.sample(range(100, 1000), n)   # page ids: a URL the policy copies digit by digit
    entities, used = [], set()
    for i in range(n):
        title = name(rng)
        while title in used:
            title = name(rng, 3)
        used.add(title)
        kind = rng.choice(KINDS)
        entities.append({"title": f"{title} {kind.capitalize()}", "kind": kind, "look": looks[i],
                         "shape": SHAPES[looks[i][2]], "city": f"{name(rng)}ville",
                         "architect": f"{name(rng)} {name(rng)}", "year": str(rng.randint(1200, 2020)),
                         "page": pages[i]})
    for i, e in enumerate(entities if twins else []):
        e["twin"] = rng.choice([j for j in range(n) if j != i])
    return entities


def draw_entity(look, size=TILE):
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
    return img if size == TILE else img.resize((size, size), Image.NEAREST)


def page_text(e, rng, others, twin=None):
    facts = [f"The {e['title']} is a {e['kind']} in {e['city']}.",
             f"It was designed by the architect {e['architect']}.",
             f"Construction was completed in {e['year']}."] + ([f"Its twin is the {twin['title']}."] if twin else [])
    filler = [f"Visitors often compare it with the {o['title']} in {o['city']}." for o in rng.sample(others, 2)]
    filler.append(f"The {e['kind']} is lit at night and appears on local postcards.")
    paragraphs = facts + filler
    rng.shuffle(paragraphs)
    return "\n\n".join(paragraphs)


def corner_box(corner, size=SCENE):
    """The fixed box the oracle crops for a corner of a scene of `size` (its pixels): the tile's slot plus a margin."""
    cx, cy = CORNERS[corner]
    x = MARGIN if cx == 0 else size[0] - MARGIN - TILE
    y = MARGIN if cy == 0 else size[1] - MARGIN - TILE
    return [x - 4, y - 4, x + TILE + 4, y + TILE + 4]


def make_task(t, kind_of_task, entities, pool, rng, out, decoy=None, scale=1):
    """One question with its image: a scene of corner landmarks for `crop` and `hard`, the
    landmark's picture for the others. `decoy`: a kind; a hard scene is then the asked landmark
    (of another kind) and two of this kind (--hard-decoys). `scale`: the scene is SCENE times it,
    its landmarks TILE (--scene-scale)."""
    corner = None
    if kind_of_task in ("crop", "hard"):
        if kind_of_task == "crop":   # two to four landmarks, full size; the question names the corner
            corners = rng.sample(list(CORNERS), rng.randint(2, 4))
            members = rng.sample(pool, len(corners))
        elif decoy is None:   # three landmarks of different kinds among clutter; the question names only the kind
            corners, members = rng.sample(list(CORNERS), 3), []
            for m in rng.sample(pool, len(pool)):
                if entities[m]["kind"] not in {entities[x]["kind"] for x in members}:
                    members.append(m)
                if len(members) == len(corners):
                    break
        else:   # the asked landmark first, then two decoys
            corners = rng.sample(list(CORNERS), 3)
            members = [rng.choice([m for m in pool if entities[m]["kind"] != decoy])]
            members += rng.sample([m for m in pool if entities[m]["kind"] == decoy], 2)
        size = (SCENE[0] * scale, SCENE[1] * scale)
        scene = Image.new("RGB", size, (200, 200, 200))
        if kind_of_task == "hard":
            draw = ImageDraw.Draw(scene)
            for _ in range(8 * scale * scale):   # clutter between the corners
                x, y, r = rng.randint(84, size[0] - 84), rng.randint(10, size[1] - 10), rng.randint(3, 8)
                draw.rectangle((x - r, y - r, x + r, y + r), fill=PALETTE[rng.randrange(len(PALETTE))])
        for c, m in zip(corners, members):
            box = corner_box(c, size)
            scene.paste(draw_entity(entities[m]["look"]), (box[0] + 4 + rng.randint(-2, 2), box[1] + 4 + rng.randint(-2, 2)))
        target = rng.randrange(len(corners)) if decoy is None or kind_of_task == "crop" else 0
        corner, m = corners[target], members[target]
        corners = dict(zip(corners, members))
    else:
        m = rng.choice(pool)
        scene, corners = draw_entity(entities[m]["look"], size=160), None
    e = entities[m]
    scene.save(out / "images" / f"scene_{t:04d}.png")
    answer = e["shape"] if kind_of_task == "visual" else entities[e["twin"]]["year"] if kind_of_task == "twohop" else e["year"]
    task = {"id": f"toy{t:04d}", "type": kind_of_task, "image": f"images/scene_{t:04d}.png",
            "question": QUESTIONS[kind_of_task].format(kind=e["kind"], corner=corner),
            "answers": [answer], "entity": m, "corner": corner, "corners": corners}
    return task if kind_of_task == "visual" else dict(task, moved_answers=[moved_year(answer)])


def oracle_box(corner, convention, shown, size=SCENE):
    """The corner's fixed box in the policy's convention (`shown`: the scene of `size` as the model sees it)."""
    W, H = size
    scale = {"abs": (shown[0] / W, shown[1] / H), "rel1000": (1000 / W, 1000 / H)}[convention]
    return [round(v * scale[i % 2]) for i, v in enumerate(corner_box(corner, size))]


def misspelled(title):
    """The name with each word's middle letter dropped ("Prami Lighthouse" -> "Prmi Lightouse")."""
    return " ".join(w[:len(w) // 2] + w[len(w) // 2 + 1:] for w in title.split())


def oracle_turns(task, entities, by_url, box, see, find, order=(), typo=False, give_up=False,
                 say_url=False):
    """The oracle's assistant turns for one task: answer from the image (`visual`), from what it
    knows (task["direct"]), or search and answer with what the page it opened says:
        whole    image_search -> visit the top hit
        crop     crop the asked corner -> image_search on the crop -> visit the top hit
        twohop   image_search -> visit the top hit for its twin -> text_search the twin's name -> visit;
                 with `typo`, a first text_search for the name misspelled finds nothing and is revised
        hard     crop the corners in `order` (image search on each) until the top hit is of the asked
                 kind, then visit it: a wrong crop followed by a recovery (Mini-o3's trial and error)
    The oracle sees what the tools will return: box(corner) is a corner's box in the policy's
    convention, see(corner or None) the image search's results on that crop (or the whole image),
    find(query) the text search's; by_url maps a url to its landmark as the pages read tell it
    (their year: a re-dated copy's own). `give_up`: after a first corner whose top hit is of another
    kind, answer from memory instead of trying the next corner (see --hard-memory). With `say_url`, the
    think before each visit names the url it will open, copied from the search result (the call then
    repeats it a few tokens on)."""
    call = core.format_tool_call

    def read(think, url, goal=None):   # the think and the visit call that opens a search hit
        think += f" It is at {url}." if say_url else ""
        return f"<think>{think}</think>\n" + call("visit", {"url": url, "goal": goal or GOAL})
    e = entities[task["entity"]]
    kind = e["kind"]
    if task["type"] == "visual":
        return [f"<think>I can see the {kind}: it shows a {e['shape']}.</think>\n<answer>{e['shape']}</answer>"]
    if task["direct"]:
        return [f"<think>I know this {kind}: it is the {e['title']}.</think>\n<answer>{task['answers'][0]}</answer>"]
    turns, hits = [], None
    if task["type"] == "hard":
        think = f"I will look for the {kind}, starting with the image's {order[0]} corner."
        for n, corner in enumerate(order, 1):
            turns.append(f"<think>{think}</think>\n" + call("crop", {"image": 0, "bbox_2d": box(corner)}))
            turns.append("<think>I will search for this part of the image.</think>\n" + call("image_search", {"image": n}))
            hits = see(corner)
            found = by_url[hits[0]["url"]]["kind"]
            if found == kind or n == len(order):   # no corner left: the answer will be wrong and dropped
                break
            think = f"The top result is a {found}, not a {kind}."
            if give_up:
                return turns + [f"<think>{think} I know the {kind} in this image: it is the {e['title']}.</think>\n"
                                f"<answer>{task['answers'][0]}</answer>"]
            think += f" I will try the image's {order[n]} corner."
        turns.append(read(f"The top result is a {kind}. I will read it.", hits[0]["url"]))
    else:
        if task["type"] == "crop":
            turns.append(f"<think>The question is about the image's {task['corner']} corner. I will zoom in there.</think>\n"
                         + call("crop", {"image": 0, "bbox_2d": box(task["corner"])}))
        turns.append(f"<think>I do not know this {kind}. I will search for the image.</think>\n"
                     + call("image_search", {"image": 1 if task["type"] == "crop" else 0}))
        hits = see(task["corner"])
        if task["type"] == "twohop":
            turns.append(read("I will read the top result to find its twin.", hits[0]["url"], TWIN_GOAL))
            twin = entities[by_url[hits[0]["url"]]["twin"]]["title"]
            think = f"The page says: Its twin is the {twin}. I will search for it."
            wrong = misspelled(twin)
            if typo and not find(wrong):   # an empty search, then a revised query
                turns.append(f"<think>{think}</think>\n" + call("text_search", {"query": wrong}))
                think = f"No results. I will search for the name as the page writes it: {twin}."
            turns.append(f"<think>{think}</think>\n" + call("text_search", {"query": twin}))
            hits = find(twin)
        turns.append(read("I will read the top result.", hits[0]["url"]))
    year = by_url[hits[0]["url"]]["year"]
    turns.append(f"<think>The page says: Construction was completed in {year}.</think>\n<answer>{year}</answer>")
    return turns


def type_shares(text):
    """'visual:0.2,whole:0.3' -> {"visual": 0.2, "whole": 0.3} (--mix, --direct); ValueError if malformed."""
    return {k: float(v) for k, v in (part.split(":") for part in text.split(","))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).parent / "out"), help="output folder")
    ap.add_argument("--entities", type=int, default=200, help="landmarks in the world")
    ap.add_argument("--tasks", type=int, default=1600, help="questions (train + val + test)")
    ap.add_argument("--test-fraction", type=float, default=0.2, help="share of questions held out for test")
    ap.add_argument("--val-fraction", type=float, default=0.05, help="share of questions held out for validation")
    ap.add_argument("--unseen", type=float, default=0.2, help="share of landmarks asked about in test only")
    ap.add_argument("--mix", default="visual:0.15,whole:0.25,crop:0.3,twohop:0.15,hard:0.15",
                    help="question types and their shares, of visual, whole, crop, twohop, hard")
    ap.add_argument("--direct", default="whole:0.5,crop:0.25,twohop:0.5", help="share of knowledge questions the "
                    "oracle answers from memory, without searching: one share for whole, crop and twohop, or one "
                    "each (a type not named: always searched; until 2026-12-03 the default was 0.5)")
    ap.add_argument("--redated", type=float, default=1.0, help="share of the searched oracle trajectories that read "
                    "re-dated pages (each landmark's year drawn anew) and answer the page's year: reading is the only "
                    "way to be right")
    ap.add_argument("--views", type=int, default=1, help="re-dated copies each re-dated task is replayed on (one SFT "
                    "trajectory each, at most REDATED; the other trajectories are repeated as often): more views, "
                    "fewer passes over any one trajectory's page id and year")
    ap.add_argument("--renumber", action=argparse.BooleanOptionalAction, default=True, help="the re-dated copies "
                    "also give the pages new ids (the ids shuffled among the landmarks): the page to visit must be "
                    "copied from the search results, as no landmark keeps one id a model could learn")
    ap.add_argument("--typos", type=float, default=0.3, help="share of two-hop oracle trajectories whose first "
                    "text search misspells the name, finds nothing and is revised")
    ap.add_argument("--hard-direct", type=float, default=0.0, help="share of hard oracle trajectories answered "
                    "from memory at once, as --direct does for the other knowledge questions (off by default: "
                    "the hard path's trial and error is then all the SFT data shows)")
    ap.add_argument("--hard-memory", type=float, default=0.65, help="share of hard oracle trajectories whose first "
                    "corner shows another kind that answer from memory there instead of trying the next corner: a "
                    "cold start that explores too little, as Mini-o3's does, for GRPO to find the next corner "
                    "(0 before 2026-12-03, night; NOTES.md)")
    ap.add_argument("--say-url", action=argparse.BooleanOptionalAction, default=True, help="the think before each "
                    "visit names the url it opens, copied from the search result, and the call repeats it a few "
                    "tokens on: with it the page id's copy formed on every seed measured (NOTES.md)")
    ap.add_argument("--hard-decoys", default="fountain", choices=KINDS + ["none"], help="a hard scene shows the "
                    "asked landmark and two of this kind (never asked about in hard questions); none: three "
                    "landmarks of different kinds (before 2026-12-03, night). A miss is then one fixed word in the "
                    "search result, which a tiny model can spot, where telling two kinds apart needs it to compare "
                    "two words (NOTES.md)")
    ap.add_argument("--scene-scale", type=int, default=1, help="corner scenes (crop, hard) drawn this many times "
                    "larger, their landmarks not: small targets, shown to the model at 1/scale of their pixels, "
                    "that a crop (cut from the full image) shows whole")
    ap.add_argument("--k", type=int, default=1, help="search results the oracle sees (use the same --k in eval and GRPO)")
    ap.add_argument("--visit-chars", type=int, default=60, help="visit keeps the passage most relevant to its goal "
                    "within this many characters (the oracle's and the policy's; one fact, like the papers' summarizer)")
    ap.add_argument("--crop-upscale", type=int, default=112, help="crops are upscaled to this short side (the "
                    "oracle's and the policy's; small: fewer visual tokens, and the search tool needs no more)")
    ap.add_argument("--vocab", type=int, default=2048, help="BPE vocabulary of the tiny tokenizer")
    ap.add_argument("--hidden", type=int, default=128, help="tiny model's width (2 layers)")
    ap.add_argument("--init-std", type=float, default=None, help="tiny model's initial weight scale (default "
                    "the fan-in scale, hidden ** -0.5, where a tiny model learns to copy words out of the question; "
                    "the configs' 0.02 before 2026-12-03, night: NOTES.md)")
    ap.add_argument("--max-pixels", type=int, default=224 * 168, help="tiny model's image budget (pixels)")
    ap.add_argument("--vision-window", type=int, default=112, help="tiny model's vision attention windows in pixels "
                    "(Qwen2.5-VL's 112; worlds before 2026-12-01, evening, used 56)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (the world is deterministic)")
    args = ap.parse_args(argv)
    args.hard_decoys = None if args.hard_decoys == "none" else args.hard_decoys
    args.init_std = args.hidden ** -0.5 if args.init_std is None else args.init_std
    shares = {"--test-fraction": args.test_fraction, "--val-fraction": args.val_fraction, "--unseen": args.unseen,
              "--redated": args.redated, "--typos": args.typos,
              "--hard-direct": args.hard_direct, "--hard-memory": args.hard_memory}
    try:
        from_memory = (type_shares(args.direct) if ":" in args.direct
                       else dict.fromkeys(RECOGNISABLE, float(args.direct)))
    except ValueError:
        raise SystemExit(f"--direct {args.direct!r}: want a share, or type:share pairs, e.g. whole:0.5,crop:0.25") from None
    if not set(from_memory) <= set(RECOGNISABLE):
        raise SystemExit(f"--direct: only whole, crop and twohop are answered from memory (hard: --hard-direct), "
                         f"not {sorted(set(from_memory) - set(RECOGNISABLE))}")
    shares.update({f"--direct {k}": v for k, v in from_memory.items()})
    for flag, value in shares.items():
        if not 0 <= value <= 1:
            raise SystemExit(f"{flag} {value}: a share, want 0 to 1")
    if args.test_fraction + args.val_fraction >= 1 or args.unseen >= 1:
        raise SystemExit("--test-fraction plus --val-fraction, and --unseen, must stay below 1: training needs tasks")
    if args.entities < 4 or args.tasks < 1:
        raise SystemExit(f"--entities {args.entities} / --tasks {args.tasks}: want at least 4 landmarks (a hard "
                         "scene shows four) and 1 task")
    if args.scene_scale < 1:
        raise SystemExit(f"--scene-scale {args.scene_scale}: want 1 (scenes of {SCENE[0]}x{SCENE[1]}) or more")
    if args.hidden % 8 or args.hidden < 8:
        raise SystemExit(f"--hidden {args.hidden}: want a multiple of 8 (4 heads of an even width)")
    if args.init_std <= 0:
        raise SystemExit(f"--init-std {args.init_std}: want a positive scale (e.g. 0.02, the configs' own)")
    if not 1 <= args.views <= REDATED:
        raise SystemExit(f"--views {args.views}: want 1 to {REDATED} (the re-dated copies of the corpus)")
    try:
        mix = type_shares(args.mix)
    except ValueError:
        raise SystemExit(f"--mix {args.mix!r}: want type:share pairs, e.g. visual:0.2,whole:0.3,crop:0.5") from None
    if not set(mix) <= set(QUESTIONS):
        raise SystemExit(f"--mix: unknown question type(s) {sorted(set(mix) - set(QUESTIONS))}; known: {list(QUESTIONS)}")
    if min(mix.values()) < 0 or sum(mix.values()) <= 0:
        raise SystemExit(f"--mix {args.mix!r}: shares must be 0 or more, and not all 0")

    rng = random.Random(args.seed)
    out = Path(args.out).resolve()   # records hold image paths: absolute, whatever the working directory
    (out / "images").mkdir(parents=True, exist_ok=True)

    # 1. landmarks: pictures, pages, the image index
    entities = make_entities(args.entities, rng, twins="twohop" in mix)
    corpus, index = [], []
    for i, e in enumerate(entities):
        draw_entity(e["look"]).save(out / "images" / f"entity_{i:03d}.png")
        corpus.append({"id": str(i), "title": e["title"], "url": URL.format(page=e["page"]),
                       "text": page_text(e, rng, entities[:i] + entities[i + 1:], entities[e["twin"]] if "twin" in e else None)})
        index.append({"image": f"images/entity_{i:03d}.png", "title": e["title"], "url": URL.format(page=e["page"]),
                      "snippet": f"{e['title']}, a {e['kind']} in {e['city']}."})
    core.write_jsonl(out / "corpus.jsonl", corpus)

    ids = [e["page"] for e in entities]

    def version(years, pages):   # the corpus with landmark i's year years[i], at page id pages[i]
        return [dict(d, url=URL.format(page=p), text=d["text"].replace(f"completed in {e['year']}.", f"completed in {y}."))
                for d, e, y, p in zip(corpus, entities, years, pages)]
    core.write_jsonl(out / "corpus_moved.jsonl", version([moved_year(e["year"]) for e in entities], ids))
    core.write_jsonl(out / "images.jsonl", index)

    # 2. tasks: train/val on the seen landmarks; test on seen and unseen ones (new scenes in any case)
    order = list(range(len(entities)))
    rng.shuffle(order)
    n_unseen = int(len(order) * args.unseen)
    unseen, seen = order[:n_unseen], order[n_unseen:]
    n_test, n_val = int(args.tasks * args.test_fraction), int(args.tasks * args.val_fraction)
    if args.hard_decoys and sum(entities[m]["kind"] == args.hard_decoys for m in seen) < 2:
        raise SystemExit(f"--hard-decoys {args.hard_decoys}: fewer than two such landmarks in training; "
                         "ask for more --entities")
    tasks = []
    for t in range(args.tasks):
        j = t if t < n_test else t - n_test if t < n_test + n_val else t - n_test - n_val   # index in its split
        kind_of_task = list(mix)[j] if j < len(mix) else rng.choices(list(mix), weights=list(mix.values()))[0]
        pool = (seen + unseen) if t < n_test else seen
        tasks.append(make_task(t, kind_of_task, entities, pool, rng, out, args.hard_decoys, args.scene_scale))
    test, val, train = tasks[:n_test], tasks[n_test:n_test + n_val], tasks[n_test + n_val:]
    hard_rng = random.Random(args.seed + 5)   # --hard-direct's own stream: the world's other draws stay as they were
    for task in train:   # the oracle answers these knowledge questions from memory (a hard one: --hard-direct)
        task["direct"] = (task["type"] not in ("visual", "hard") and rng.random() < from_memory.get(task["type"], 0.0)
                          or task["type"] == "hard" and hard_rng.random() < args.hard_direct)
    for split, rows in [("test", test), ("val", val), ("train", train)]:
        core.write_jsonl(out / f"{split}.jsonl", rows)

    # 3. the tiny model, with a tokenizer trained on the world's text and the system prompt
    texts = [d["text"] for d in corpus] + [t["question"] for t in tasks] + [json.dumps(h) for h in index]
    texts += [SYSTEM] * 20
    (out / "system.txt").write_text(SYSTEM, encoding="utf-8")
    texts += [core.format_tool_call("visit", {"url": URL.format(page=e["page"]), "goal": g}) for e in entities
              for g in ((GOAL, TWIN_GOAL) if "twin" in e else (GOAL,))]
    core.build_tiny_policy(out / "model", texts, vocab_size=args.vocab, hidden=args.hidden, max_pixels=args.max_pixels,
                           tie_embeddings=True, vision_window=args.vision_window,   # as small Qwen models do
                           init_std=args.init_std)
    policy = core.load_policy(out / "model")

    # 4. oracle trajectories through the real loop and tools, kept where the answer is right
    crop_settings = tools.CropSettings(upscale_to=args.crop_upscale)

    def toolbox(view):
        return tools.Toolbox(text_search=view["text"], image_search=view["images"], pages=view["text"],
                             convention=policy.crop_convention, shown_size=policy.shown_size, k=args.k,
                             visit_chars=args.visit_chars, crop_settings=crop_settings)
    # A view of the web the oracle reads: its search tools, and each url's landmark as its page tells it.
    real = {"text": tools.LocalTextSearch(out / "corpus.jsonl"), "images": tools.LocalImageSearch(out / "images.jsonl"),
            "by_url": {URL.format(page=e["page"]): e for e in entities}}
    redated_rng = random.Random(args.seed + 2)   # its own stream: the world's other draws stay as they were
    renumber_rng = random.Random(args.seed + 3)  # and --renumber's
    redated = []   # REDATED views with the years drawn anew (and with --renumber, the page ids shuffled)
    (out / "sft_pages").mkdir(exist_ok=True)
    # each landmark's choice of re-dated years (not its own, not its moved one), listed once for all views
    choices = [[y for y in map(str, range(1200, 2021)) if y not in (e["year"], moved_year(e["year"]))] for e in entities]
    for v in range(REDATED):
        years = [redated_rng.choice(c) for c in choices]
        pages = renumber_rng.sample(ids, len(ids)) if args.renumber else ids
        core.write_jsonl(out / "sft_pages" / f"corpus_{v}.jsonl", version(years, pages))
        core.write_jsonl(out / "sft_pages" / f"images_{v}.jsonl",   # image paths are relative to the index
                    [dict(h, image=f"../{h['image']}", url=URL.format(page=p)) for h, p in zip(index, pages)])
        redated.append({"text": tools.LocalTextSearch(out / "sft_pages" / f"corpus_{v}.jsonl"),
                        "images": tools.LocalImageSearch(out / "sft_pages" / f"images_{v}.jsonl",   # same pictures
                                                         vectors=real["images"].vectors), "years": years,
                        "by_url": {URL.format(page=p): dict(e, year=y) for e, y, p in zip(entities, years, pages)}})
    rows = [dict(t, _root=str(out)) for t in train]
    scripts, experts, variant = {}, {}, {}   # scripts/experts[task id, view]; variant[view][task id]: the answer there
    typo_rng = random.Random(args.seed + 1)   # its own stream too
    memory_rng = random.Random(args.seed + 4)  # and --hard-memory's
    shown_sizes = {}
    for task in rows:   # the oracle sees what the tools will return: the same crops, the same searches
        image = core.load_image(out / task["image"])
        if image.size not in shown_sizes:   # (the image processor run once per scene size, not per scene)
            shown_sizes[image.size] = policy.shown_size(image)
        shown = shown_sizes[image.size]

        def box(corner):
            return oracle_box(corner, policy.crop_convention, shown, image.size)

        def oracle(view, order=(), typo=False, give_up=False):   # the oracle's turns, reading this view of the web
            def see(corner):
                query = tools.crop(image, box(corner), policy.crop_convention, shown, crop_settings) if corner else image
                return view["images"].search(query, args.k)
            return oracle_turns(task, entities, view["by_url"], box, see, lambda q: view["text"].search(q, args.k),
                                order, typo, give_up, args.say_url)
        order = ()
        if task["type"] == "hard":   # SFT: the corners in a random order; AHPO's expert: the right one first
            order = rng.sample(list(task["corners"]), len(task["corners"]))
            experts[task["id"], None] = oracle(real, order=(task["corner"],))
        typo = task["type"] == "twohop" and typo_rng.random() < args.typos
        # a miss answered from memory reads no page, so it answers the true year (no re-dated view)
        give_up = bool(order) and order[0] != task["corner"] and memory_rng.random() < args.hard_memory
        searched = task["type"] != "visual" and not task["direct"] and not give_up
        if searched and redated_rng.random() < args.redated:
            first = redated_rng.randrange(REDATED)
            views = [first] + redated_rng.sample([v for v in range(REDATED) if v != first], args.views - 1)
            asked = entities[task["entity"]]["twin"] if task["type"] == "twohop" else task["entity"]
            for v in views:
                variant.setdefault(v, {})[task["id"]] = redated[v]["years"][asked]
                scripts[task["id"], v] = oracle(redated[v], order, typo)
        else:
            scripts[task["id"], None] = oracle(real, order, typo, give_up)

    def replay(rows, scripts, crops, v=None):
        """The scripted turns (scripts[task id, v]) through the real rollout loop and tools on view v
        (None: the real web); records of the right answers."""
        trajs = core.rollout(policy, rows, toolbox(real if v is None else redated[v]), max_turns=10, max_images=6,
                             max_context=8192, system=SYSTEM, forced=lambda task, turn: scripts[task["id"], v][turn],
                             score_forced=False, progress=False)
        records, stats = [], {k: [0, 0] for k in mix}
        for task, traj in zip(rows, trajs):
            value, parts = core.reward(traj, task)
            stats[task["type"]][1] += 1
            if parts["correct"] == 1.0:   # a search whose top hit is not the landmark is dropped
                stats[task["type"]][0] += 1
                records.append(core.trajectory_to_record(traj, image_dir=out / "images" / crops))
        return records, stats
    records, stats = replay([r for r in rows if (r["id"], None) in scripts], scripts, "crops")
    redated_records = []
    for v, years in sorted(variant.items()):   # the right answer is the re-dated page's year
        kept, seen = replay([dict(r, answers=[years[r["id"]]]) for r in rows if r["id"] in years], scripts, "crops", v)
        for k, (right, n) in seen.items():
            stats[k] = [stats[k][0] + right, stats[k][1] + n]
        redated_records += [dict(r, pages=f"sft_pages/corpus_{v}.jsonl", answers=[years[r["id"]]]) for r in kept]
    records = sorted(records * args.views + redated_records, key=lambda r: r["id"])   # each habit keeps its share
    expert_records, _ = replay([r for r in rows if (r["id"], None) in experts], experts, "expert_crops")
    core.write_jsonl(out / "expert.jsonl", expert_records)
    core.write_jsonl(out / "sft.jsonl", records)   # last: run.py takes it as the sign that the world is complete
    print(f"toy world in {out}: {len(entities)} landmarks ({len(unseen)} only in test), "
          f"{len(train)} train / {len(val)} val / {len(test)} test tasks")
    direct = sum(t["direct"] for t in train)
    recovered = sum(sum(m["role"] == "assistant" and '"name": "crop"' in str(m["content"]) for m in r["messages"]) > 1
                    for r in records)
    revised = sum(any(m["role"] == "tool" and "No results." in str(m["content"]) for m in r["messages"]) for r in records)
    print("oracle: " + ", ".join(f"{k} {a}/{b}" for k, (a, b) in stats.items())
          + f" correct ({direct} answered from memory, {recovered} recover from a wrong crop, "
          f"{revised} revise an empty search, {len(redated_records)} read re-dated pages); "
          f"{len(records)} SFT trajectories, {len(expert_records)} expert (AHPO) trajectories")
    return {"train": len(train), "val": len(val), "test": len(test), "sft": len(records), "direct": direct,
            "expert": len(expert_records), "redated": len(redated_records), "recovered": recovered, "revised": revised, "oracle": {k: tuple(v) for k, v in stats.items()}}


if __name__ == "__main__":
    main()
