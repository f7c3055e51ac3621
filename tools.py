"""The agent's tools: parsing tool calls, the crop tool, search backends, page visits, the cache.

Read top to bottom:
  1. TOOL_SCHEMAS and `parse_tool_calls`: model text -> validated calls, or error messages
  2. `crop`: a region of an image, in the policy's box convention
  3. search backends, one small class each with `search(query_or_image, k) -> [{title, url, snippet}]`:
     LocalTextSearch (SQLite FTS5 BM25), LocalImageSearch (numpy descriptor), SerperSearch,
     SerpAPISearch, SearxngSearch (HTTP, with bounded retries)
  4. `visit`: fetch a page (http(s) only, public addresses only), HTML -> text, keep what fits `goal`
  5. `Cache`: one SQLite file of tool results, keyed by a hash of (backend, tool, arguments)
  6. `Toolbox.run(calls, images) -> Observation`: one turn's calls, concurrently; failures
     become error observations, never exceptions
  7. the tool flags shared by the scripts: `add_tool_arguments`, `toolbox_from_args`

The tool names and arguments are fixed by DESIGN.md: `crop`, `image_search`, `text_search`, `visit`.
"""
import copy
import hashlib
import html.parser
import io
import ipaddress
import json
import math
import os
import re
import socket
import sqlite3
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlparse

import numpy as np
import requests
from PIL import Image


class ToolError(Exception):
    """A failure the model should read about: the message is written for it, and is shown to it."""


# ----------------------------------------------------------------------------------------------
# 1. Schemas and parsing

# The JSON-schema of each tool's arguments, listed in the system prompt exactly as written here.
TOOL_SCHEMAS = [
    {
        "name": "crop",
        "description": "Zoom into a region of an image. `image` is 0 for the question image, then "
                       "1, 2, ... for every image received since, in order.",
        "parameters": {"type": "object", "properties": {
            "image": {"type": "integer", "default": 0},
            "bbox_2d": {"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4}},
            "required": ["bbox_2d"]},
    },
    {
        "name": "image_search",
        "description": "Reverse image search on an image, or on a region of it when `bbox_2d` is given.",
        "parameters": {"type": "object", "properties": {
            "image": {"type": "integer", "default": 0},
            "bbox_2d": {"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4}},
            "required": []},
    },
    {
        "name": "text_search",
        "description": "Web search for a text query; returns the top results (title, url, snippet).",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}},
                       "required": ["query"]},
    },
    {
        "name": "visit",
        "description": "Read a web page; returns the parts most relevant to `goal`.",
        "parameters": {"type": "object", "properties": {
            "url": {"type": "string"}, "goal": {"type": "string"}},
            "required": ["url", "goal"]},
    },
]


TOOL_NAMES = [t["name"] for t in TOOL_SCHEMAS]


def tool_schemas(grounding=False, multi_box=False):
    """The schemas shown to the model: TOOL_SCHEMAS, plus a `query` (a description of the region,
    found by a grounding model) on crop and image_search when one is configured, and several
    boxes in one image_search when multi_box is on (DeepMMSearch-R1, Vision-DeepResearch)."""
    schemas = copy.deepcopy(TOOL_SCHEMAS)
    for t in schemas:
        props = t["parameters"]["properties"]
        if grounding and t["name"] in ("crop", "image_search"):
            props["query"] = {"type": "string"}
            t["parameters"]["required"] = []
            t["description"] += " Give `bbox_2d`, or describe the region in `query` instead and it is found for you."
        if multi_box and t["name"] == "image_search":
            props["bbox_2d"] = {"type": "array", "items": {"type": ["number", "array"]}}
            t["description"] += " `bbox_2d` may be a list of boxes: each is searched, results per box."
    return schemas


ACCEPTED = {t["name"]: t["parameters"] for t in tool_schemas(grounding=True, multi_box=True)}   # what parses
EXAMPLES = {
    "crop": '{"name": "crop", "arguments": {"image": 0, "bbox_2d": [x1, y1, x2, y2]}}',
    "image_search": '{"name": "image_search", "arguments": {"image": 0}}',
    "text_search": '{"name": "text_search", "arguments": {"query": "..."}}',
    "visit": '{"name": "visit", "arguments": {"url": "https://...", "goal": "..."}}',
}
ALIASES = {"bbox": "bbox_2d"}   # other names models write for an argument
IGNORED = {"label"}             # Qwen-VL grounding writes a label beside bbox_2d
CALL_RE = re.compile(r"<tool_call>(.*?)(?:</tool_call>|(?=<tool_call>)|$)", re.DOTALL)
FENCE_RE = re.compile(r"^```[a-zA-Z]*\s*|\s*```$")


def _check_arguments(name, args):
    """Type-check one call's arguments against its schema; returns the cleaned arguments."""
    schema = ACCEPTED[name]   # a mode the run does not have is refused by the Toolbox, with a reason
    props, required = schema["properties"], schema["required"]
    args = {k: v for k, v in args.items() if k not in IGNORED}
    for alias, key in ALIASES.items():
        if alias in args and key in props:
            if key in args:
                raise ToolError(f"{name}: give {key!r} only, not both {key!r} and {alias!r}")
            args[key] = args.pop(alias)
    unknown = sorted(set(args) - set(props))
    if unknown:
        raise ToolError(f"{name} takes no argument(s) {unknown}; its arguments are {sorted(props)}")
    for key in required:
        if key not in args:
            raise ToolError(f"{name} needs the argument {key!r}")
    out = {}
    for key, value in args.items():
        kind = props[key]["type"]
        if kind == "integer" and not (isinstance(value, int) and not isinstance(value, bool)):
            raise ToolError(f"{name}: {key!r} must be an integer, got {json.dumps(value)}")
        if kind == "string" and not (isinstance(value, str) and value.strip()):
            raise ToolError(f"{name}: {key!r} must be a non-empty string, got {json.dumps(value)}")
        several = name == "image_search" and isinstance(value, list) and value and all(isinstance(b, list) for b in value)
        if kind == "array" and not (isinstance(value, list) and (len(value) == 4 or several)):
            raise ToolError(f"{name}: {key!r} must be a list of 4 numbers [x1, y1, x2, y2], got {json.dumps(value)}")
        out[key] = value
    if name == "crop" and ("bbox_2d" in out) == ("query" in out):
        raise ToolError("crop needs 'bbox_2d' (or, where a grounding model is configured, 'query'), not both")
    for key, prop in props.items():
        if key not in out and "default" in prop:
            out[key] = prop["default"]
    return out


def parse_tool_calls(text):
    """Every <tool_call>{...}</tool_call> block of an assistant turn, in order.

    Returns (calls, errors): calls are {"name", "arguments"} dicts that passed the schema check;
    errors are messages for the model saying what was wrong and the correct form. Tolerates
    whitespace and ``` fences inside a block; never raises."""
    calls, errors = [], []
    try:
        if text.count("</tool_call>") > text.count("<tool_call>"):
            errors.append("found </tool_call> without an opening <tool_call>")
        for i, m in enumerate(CALL_RE.finditer(text), start=1):
            body = FENCE_RE.sub("", m.group(1).strip()).strip()
            closed = m.group(0).endswith("</tool_call>")
            try:
                if not closed:
                    raise ToolError("the block is not closed with </tool_call>")
                try:
                    call = json.loads(body)
                except json.JSONDecodeError as e:
                    raise ToolError(f"the block is not valid JSON ({e.msg} at char {e.pos})") from None
                if not isinstance(call, dict) or not isinstance(call.get("name"), str):
                    raise ToolError('the block must be a JSON object with "name" and "arguments"')
                if call["name"] not in TOOL_NAMES:
                    raise ToolError(f"unknown tool {call['name']!r}; the tools are {', '.join(TOOL_NAMES)}")
                args = call.get("arguments", {})
                if isinstance(args, str):   # some models double-encode the arguments
                    try:
                        args = json.loads(args)
                    except json.JSONDecodeError:
                        raise ToolError('"arguments" must be a JSON object') from None
                if not isinstance(args, dict):
                    raise ToolError('"arguments" must be a JSON object')
                calls.append({"name": call["name"], "arguments": _check_arguments(call["name"], args)})
            except ToolError as e:
                name = re.search(r'"name"\s*:\s*"(\w+)"', body)
                example = EXAMPLES.get(name.group(1) if name else "", EXAMPLES["text_search"])
                errors.append(f"tool call {i}: {e}. Correct form: <tool_call>\n{example}\n</tool_call>")
    except Exception as e:   # belt and braces: parsing must never take a rollout down
        errors.append(f"could not parse tool calls: {type(e).__name__}")
    return calls, errors


# ----------------------------------------------------------------------------------------------
# 2. The crop tool


@dataclass
class CropSettings:
    """Limits on crops. Boxes smaller than `min_side` source pixels or more elongated than
    `max_aspect` are refused; crops shorter than `upscale_to` on their short side are upscaled
    to it (small regions are unreadable otherwise); crops are downscaled to at most `max_pixels`."""
    min_side: int = 4
    max_aspect: float = 50.0
    upscale_to: int = 224
    max_pixels: int = 1024 * 1024


def crop(image, bbox, convention, shown_size=None, settings=CropSettings()):
    """The region `bbox` = [x1, y1, x2, y2] of `image` (PIL) as a new PIL image.

    convention: "abs" (pixels of the image as shown to the model, `shown_size` = (w, h),
    default the image's own size), "rel1000" (0-1000) or "rel" (0-1). Corners may come in any
    order; the box is clamped to the image. Raises ToolError for a box that can't be used."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        raise ToolError(f"bbox must be [x1, y1, x2, y2], got {json.dumps(bbox, default=str)}")
    def finite(v):
        try:   # an int like 10**400 has no float: math.isfinite would raise OverflowError
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        except OverflowError:
            return False
    if not all(finite(v) for v in bbox):
        raise ToolError(f"bbox must hold 4 finite numbers, got {json.dumps(bbox, default=str)[:200]}")
    W, H = image.size
    sw, sh = {"abs": shown_size or (W, H), "rel1000": (1000, 1000), "rel": (1, 1)}[convention]
    x1, y1, x2, y2 = (float(v) for v in bbox)
    x1, x2 = sorted((x1 * W / sw, x2 * W / sw))
    y1, y2 = sorted((y1 * H / sh, y2 * H / sh))
    x1, x2 = max(0, min(W, x1)), max(0, min(W, x2))
    y1, y2 = max(0, min(H, y1)), max(0, min(H, y2))
    box = (round(x1), round(y1), round(x2), round(y2))
    w, h = box[2] - box[0], box[3] - box[1]
    if w <= 0 or h <= 0:
        raise ToolError(f"bbox {bbox} is empty after clamping to the image "
                        f"({sw}x{sh} in {convention} coordinates)")
    if min(w, h) < settings.min_side:
        raise ToolError(f"bbox {bbox} is too small ({w}x{h} px); make each side at least "
                        f"{settings.min_side} px of the original image")
    if max(w, h) / min(w, h) > settings.max_aspect:
        raise ToolError(f"bbox {bbox} is too thin (aspect {max(w, h) / min(w, h):.0f}:1, at most "
                        f"{settings.max_aspect:.0f}:1)")
    out = image.crop(box)
    scale = max(1.0, settings.upscale_to / min(w, h))
    scale = min(scale * 1.0, math.sqrt(settings.max_pixels / (w * h)))
    if abs(scale - 1.0) > 1e-6:
        out = out.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
    out.info = {}   # PIL copies info (our "path" of the source file): a crop is a new image
    return out


class Grounder:
    """Regions by description (DeepMMSearch-R1 crops with Grounding DINO): a transformers
    zero-shot object detector (Grounding DINO, OWLv2, OWL-ViT; AutoModelForZeroShotObjectDetection)
    with its tokenizer and PIL image processor (no torchvision). `locate(image, query)` -> the
    best box in the image's pixels and its score; below `threshold` it is a ToolError."""

    def __init__(self, path, threshold=0.3, device="cpu"):
        import torch
        from transformers import AutoImageProcessor, AutoModelForZeroShotObjectDetection, AutoTokenizer
        try:
            self.model = AutoModelForZeroShotObjectDetection.from_pretrained(path, use_kernels=False).to(device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.processor = AutoImageProcessor.from_pretrained(path, backend="pil")
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"--grounding-model {path}: cannot load a zero-shot object detector "
                             f"(Grounding DINO, OWLv2, OWL-ViT) from it: {str(e)[:300]}") from None
        self.torch, self.device, self.threshold = torch, device, threshold
        self.kind = self.model.config.model_type
        self.name = f"ground:{Path(str(path)).name}:{threshold:g}"
        self.lock = threading.Lock()   # one forward at a time: calls of a turn run on threads
        try:   # one dry run now: a missing package (OWLv2's processor needs scipy) stops the run here
            self.locate(Image.new("RGB", (32, 32)), "object")
        except ToolError:
            pass
        except ImportError as e:
            raise ValueError(f"--grounding-model {path}: {str(e).strip().splitlines()[0]} "
                             f"(its image processor needs a package that is missing: {e.name or 'see above'})") from None

    def locate(self, image, query):
        import inspect
        text = " ".join(query.lower().split())
        if self.kind == "grounding-dino" and not text.endswith("."):
            text += "."   # Grounding DINO's phrase format
        pixels = self.processor(images=image, return_tensors="pt")
        tokens = self.tokenizer([text], return_tensors="pt", padding=True, truncation=True)
        accepted = inspect.signature(self.model.forward).parameters
        inputs = {k: v.to(self.device) for k, v in {**tokens, **pixels}.items() if k in accepted}
        with self.lock, self.torch.no_grad():
            out = self.model(**inputs)
        logits = out.logits[0].float()                      # (boxes, text tokens or queries)
        if self.kind == "grounding-dino":                   # only the phrase's own tokens count
            logits = logits[:, :int(tokens["attention_mask"].sum())]
        scores = logits.sigmoid().max(-1).values
        best = int(scores.argmax())
        score = float(scores[best])
        if score < self.threshold:
            raise ToolError(f"no region matches {query!r} (best score {score:.2f}, threshold {self.threshold:g}); "
                            "describe it differently, or give bbox_2d")
        cx, cy, w, h = out.pred_boxes[0, best].float().tolist()   # normalized centre and size
        W, H = image.size
        sx, sy = (max(W, H), max(W, H)) if self.kind.startswith("owl") else (W, H)   # OWL pads to a square
        box = [max(0.0, (cx - w / 2) * sx), max(0.0, (cy - h / 2) * sy), min(W, (cx + w / 2) * sx), min(H, (cy + h / 2) * sy)]
        return [round(v) for v in box], score


def to_convention(box, image, convention, shown_size=None):
    """A box in the image's pixels -> the policy's convention (the inverse of crop's mapping)."""
    W, H = image.size
    sw, sh = {"abs": shown_size or (W, H), "rel1000": (1000, 1000), "rel": (1, 1)}[convention]
    digits = 3 if convention == "rel" else 0
    return [round(v * (sw / W if i % 2 == 0 else sh / H), digits) or 0 for i, v in enumerate(box)]


# ----------------------------------------------------------------------------------------------
# 3. Search backends: local (offline) and HTTP. Each has a `name` (part of the cache key) and
#    `search(query_or_image, k) -> [{"title", "url", "snippet"}]`, raising ToolError on failure.


def load_jsonl(path, bad=None):
    """A JSONL file -> list of dicts, each with `_root` (the file's folder, for relative image
    paths) and `_line`. A line that is not a UTF-8 JSON object is a ValueError naming the line,
    or, when `bad` is a list, appended to it as "<file>:<line>: <problem>" and skipped (a
    half-written last line of an interrupted writer, say)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no data file at {path}")
    rows = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8-sig"))   # -sig: a byte-order mark (Windows editors) is dropped
                problem = None if isinstance(row, dict) else f"a line must be a JSON object, got {type(row).__name__}"
            except UnicodeDecodeError:
                problem = "not UTF-8 text"
            except json.JSONDecodeError as e:
                problem = f"not valid JSON ({e.msg})"
            if problem is None:
                rows.append({**row, "_root": str(path.parent), "_line": n})
            elif bad is None:
                raise ValueError(f"{path}:{n}: {problem}")
            else:
                bad.append(f"{path}:{n}: {problem}")
    return rows


def write_jsonl(path, rows):
    """All rows or none: written to a temporary file, then renamed over `path`, so a run killed
    midway never leaves a half-written file that reads as finished."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")   # pid: two writers never share one
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)   # only there if the writing stopped midway
    return path


def words(text):
    return re.findall(r"\w+", text.lower())


class LocalTextSearch:
    """BM25 over a JSONL corpus (`id, title, url, text` a line) with SQLite FTS5. The index is
    built once into `<corpus>.fts.sqlite` beside the corpus (rebuilt when the corpus changes).
    Also the local page store that `visit` reads from."""
    name = "local"

    def __init__(self, corpus):
        self.corpus = Path(corpus)
        if not self.corpus.exists():
            raise FileNotFoundError(f"LocalTextSearch: no corpus at {str(self.corpus)!r} (JSONL of "
                                    "id, title, url, text); build one with data/toyworld/prepare.py")
        self.index = self.corpus.with_name(self.corpus.name + ".fts.sqlite")
        stamp = f"{self.corpus.stat().st_size}-{self.corpus.stat().st_mtime_ns}"
        self.name = f"local:{self.corpus.resolve()}:{stamp}"   # the cache key: this corpus, this version
        with self._connect() as db:
            db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            row = db.execute("SELECT value FROM meta WHERE key = 'stamp'").fetchone()
            if row is None or row[0] != stamp:
                self._build(db, stamp)

    def _connect(self):
        return sqlite3.connect(self.index, timeout=30)

    def _build(self, db, stamp):
        db.execute("DROP TABLE IF EXISTS docs")
        db.execute("CREATE VIRTUAL TABLE docs USING fts5(title, text, url UNINDEXED, id UNINDEXED)")
        rows = []
        for d in load_jsonl(self.corpus):
            if "text" not in d:
                raise ValueError(f"{self.corpus}:{d['_line']}: want a JSON object with at least 'text'")
            rows.append((d.get("title", ""), d["text"], d.get("url", ""), str(d.get("id", d["_line"]))))
        db.executemany("INSERT INTO docs (title, text, url, id) VALUES (?, ?, ?, ?)", rows)
        db.execute("INSERT OR REPLACE INTO meta VALUES ('stamp', ?)", (stamp,))

    def search(self, query, k=5):
        if not isinstance(query, str):
            raise ToolError("text search needs a text query")
        terms = words(query)
        if not terms:
            return []
        # Every term quoted: FTS5 operators, quotes and parentheses in the query lose their meaning.
        match = " OR ".join('"' + t.replace('"', '""') + '"' for t in terms)
        with self._connect() as db:
            rows = db.execute("SELECT title, url, snippet(docs, 1, '', '', '...', 24) FROM docs "
                              "WHERE docs MATCH ? ORDER BY bm25(docs) LIMIT ?", (match, k)).fetchall()
        return [{"title": t, "url": u, "snippet": s} for t, u, s in rows]

    def fetch(self, url):
        """The page store: (title, text) of the corpus document with this url."""
        with self._connect() as db:
            row = db.execute("SELECT title, text FROM docs WHERE url = ?", (url,)).fetchone()
        if row is None:
            raise ToolError(f"no page at {url} (local page store)")
        return row


def image_descriptor(image):
    """A fast deterministic descriptor: a 16x16 colour thumbnail (layout) and a 4x4x4 colour
    histogram (content), each L2-normalised, concatenated. Cosine similarity compares them."""
    rgb = np.asarray(image.convert("RGB").resize((16, 16), Image.BILINEAR), dtype=np.float32) / 255.0
    thumb = (rgb - rgb.mean(axis=(0, 1))).ravel()
    bins = (np.asarray(image.convert("RGB").resize((64, 64), Image.BILINEAR)) // 64).reshape(-1, 3)
    hist = np.bincount(bins[:, 0] * 16 + bins[:, 1] * 4 + bins[:, 2], minlength=64).astype(np.float32)
    parts = [v / (np.linalg.norm(v) + 1e-8) for v in (thumb, np.sqrt(hist))]
    out = np.concatenate(parts)
    return out / np.linalg.norm(out)


class LocalImageSearch:
    """Nearest neighbours over an on-disk image index: a JSONL of `image, title, url, snippet`
    (image paths relative to the index file). Descriptors are computed once and cached in
    `<index>.vectors.npz`, stamped with the index file's size and time and the descriptor.
    `embed_model` names a transformers image model (a folder or hub id with
    `get_image_features`, e.g. a CLIP) to use instead of the numpy descriptor. `vectors`: the
    entries' descriptors when the caller has them already (the same pictures under other urls),
    saved as the cache instead of computed again."""
    name = "local"

    def __init__(self, index, embed_model=None, vectors=None):
        self.index = Path(index)
        if not self.index.exists():
            raise FileNotFoundError(f"LocalImageSearch: no image index at {str(self.index)!r} (JSONL of "
                                    "image, title, url, snippet); build one with data/toyworld/prepare.py")
        self.entries = load_jsonl(self.index)
        for e in self.entries:
            if not isinstance(e.get("image"), str):
                raise ValueError(f"{self.index}:{e['_line']}: want at least 'image' (a path relative to the index)")
        self.embed = self._embedder(embed_model) if embed_model else image_descriptor
        stat = self.index.stat()
        # this index file's version and the descriptor: the tool cache's key, and the vectors cache's stamp
        stamp = f"{stat.st_size}-{stat.st_mtime_ns}" + (f":{embed_model}" if embed_model else "")
        self.name = f"local:{self.index.resolve()}:{stamp}"
        cache = self.index.with_name(self.index.name + ".vectors.npz")
        if vectors is not None:
            if len(vectors) != len(self.entries):
                raise ValueError(f"LocalImageSearch: {len(vectors)} vectors for {len(self.entries)} entries of {self.index}")
            self.vectors = np.asarray(vectors, np.float32)
            self._save(cache, stamp)
        elif (cached := self._load(cache, stamp)) is not None:
            self.vectors = cached
        else:
            root = self.index.parent
            vecs = []
            for e in self.entries:
                try:
                    with Image.open(root / e["image"]) as im:
                        vecs.append(self.embed(im))
                except OSError as err:   # missing or not an image
                    raise ValueError(f"{self.index}: cannot read the image of entry {e['image']!r}: {err}") from None
            self.vectors = np.stack(vecs) if vecs else np.zeros((0, 1), np.float32)
            self._save(cache, stamp)

    def _load(self, cache, stamp):
        """The cached vectors if they were computed for this version of the index with this
        descriptor (a replaced index or another embed_model computes them again), else None."""
        try:
            with np.load(cache) as saved:
                if str(saved["stamp"]) == stamp and len(saved["vectors"]) == len(self.entries):
                    return saved["vectors"]
        except (OSError, ValueError, KeyError):   # no cache yet, or an unreadable one
            pass
        return None

    def _save(self, cache, stamp):
        # written whole, then renamed: an evaluation running beside this one never reads half a file
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, vectors=self.vectors, stamp=np.array(stamp))
        os.replace(tmp, cache)

    @staticmethod
    def _embedder(name):
        import torch
        from transformers import AutoImageProcessor, AutoModel
        model = AutoModel.from_pretrained(name, use_kernels=False).eval()   # no hub kernels (see load_policy)
        processor = AutoImageProcessor.from_pretrained(name, backend="pil")

        def embed(image):
            with torch.no_grad():
                out = model.get_image_features(**processor(images=[image.convert("RGB")], return_tensors="pt"))
            v = (out.pooler_output if hasattr(out, "pooler_output") else out)[0].float().numpy()
            return v / (np.linalg.norm(v) + 1e-8)
        return embed

    def search(self, image, k=5):
        if not isinstance(image, Image.Image):
            raise ToolError("image search needs an image")
        if not self.entries:
            return []
        scores = self.vectors @ self.embed(image)
        top = np.argsort(-scores, kind="stable")[:k]
        return [{"title": self.entries[i].get("title", ""), "url": self.entries[i].get("url", ""),
                 "snippet": self.entries[i].get("snippet", "")} for i in top]


@dataclass
class HttpSettings:
    """Timeouts and retries for HTTP backends: 429, 5xx, timeouts and connection errors are
    retried `retries` times with exponential backoff (capped; a Retry-After header is honoured
    up to the cap); other failures are reported at once."""
    timeout: float = 15.0
    retries: int = 2
    backoff: float = 0.5
    max_backoff: float = 8.0
    max_bytes: int = 10_000_000   # an API answer larger than this is an error, not a memory spike


def http_json(method, url, provider, settings, **kwargs):
    """One JSON API request with bounded retries. Messages never include the URL or headers,
    which may carry an API key."""
    for attempt in range(settings.retries + 1):
        wait = settings.backoff * 2 ** attempt
        try:   # never follow a redirect: it could carry the API key to another host
            r = requests.request(method, url, timeout=settings.timeout, allow_redirects=False, stream=True, **kwargs)
            body = read_capped(r, settings.max_bytes, time.monotonic() + settings.timeout, provider)
        except requests.Timeout:
            problem = f"{provider} did not answer within {settings.timeout:g}s"
        except requests.RequestException as e:
            problem = f"{provider} could not be reached ({type(e).__name__})"
        else:
            if r.is_redirect or 300 <= r.status_code < 400:
                raise ToolError(f"{provider} answered with a redirect (HTTP {r.status_code}); API calls do not "
                                "follow redirects. Check the base URL.")
            if r.status_code == 429 or r.status_code >= 500:
                problem = f"{provider} answered HTTP {r.status_code}"
                retry_after = r.headers.get("Retry-After", "")
                wait = float(retry_after) if retry_after.isdigit() else wait
            elif r.status_code >= 400:
                hint = " (check the API key)" if r.status_code in (401, 403) else ""
                raise ToolError(f"{provider} answered HTTP {r.status_code}{hint}")
            else:
                try:
                    return json.loads(body)
                except (ValueError, RecursionError):
                    kind = "an HTML page" if "html" in r.headers.get("content-type", "") else "invalid JSON"
                    raise ToolError(f"{provider} returned {kind} instead of JSON") from None
        if attempt < settings.retries:
            time.sleep(min(wait, settings.max_backoff))
    raise ToolError(f"{problem} (gave up after {settings.retries + 1} tries)")


@dataclass
class ChatEndpoint:
    """An OpenAI-compatible chat-completions endpoint (vLLM, Ollama, OpenAI...), the one client
    behind the judge (core.JudgeEndpoint) and the page summarizer. Empty fields fall back to
    $<ENV>_BASE_URL, $<ENV>_MODEL, $<ENV>_API_KEY. The key goes in a header only: never in a
    cache key, a result or an error message."""
    base_url: str = ""
    model: str = ""
    api_key: str = ""
    timeout: float = 60.0
    retries: int = 2
    env = "CHAT"                 # class settings, not fields: the env prefix and the flags to name
    flags = "the endpoint URL and model"

    def __post_init__(self):
        self.base_url = (self.base_url or os.environ.get(f"{self.env}_BASE_URL", "")).rstrip("/")
        self.model = self.model or os.environ.get(f"{self.env}_MODEL", "")
        self.api_key = self.api_key or os.environ.get(f"{self.env}_API_KEY", "")
        if not self.base_url or not self.model:
            raise ValueError(f"{self.env.lower()} endpoint: set {self.flags} (or ${self.env}_BASE_URL and "
                             f"${self.env}_MODEL), e.g. http://localhost:8000/v1 and the served model name")

    @property
    def name(self):   # what cache keys use
        return f"{self.base_url}|{self.model}"

    def complete(self, prompt, max_tokens=512):
        """The reply's text for one user message (temperature 0). Raises ToolError."""
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        body = {"model": self.model, "temperature": 0.0, "max_tokens": max_tokens,
                "messages": [{"role": "user", "content": prompt}]}
        reply = http_json("POST", self.base_url + "/chat/completions", self.env.lower(),
                          HttpSettings(timeout=self.timeout, retries=self.retries), json=body, headers=headers)
        try:
            content = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise ToolError(f"{self.env.lower()} reply has no choices[0].message.content") from None
        if not isinstance(content, str):
            raise ToolError(f"{self.env.lower()} reply content is not text")
        return content


class SummarizerEndpoint(ChatEndpoint):
    env = "SUMMARIZER"
    flags = "--visit-summarizer and --visit-summarizer-model"


@dataclass
class ImageHost:
    """Where HTTP image search gets a public URL for an image: a folder you serve (any static
    web server) and the URL prefix it is served at. Images are written as <sha1>.png."""
    folder: str
    url_prefix: str

    def publish(self, image):
        data = png_bytes(image)
        name = hashlib.sha1(data).hexdigest() + ".png"
        path = Path(self.folder) / name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        return self.url_prefix.rstrip("/") + "/" + name


def png_bytes(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class _HttpSearch:
    """Shared plumbing of the HTTP providers: key from the environment, image URLs, result shape."""
    name = env_key = default_url = ""

    def __init__(self, base_url=None, api_key=None, image_host=None, http=None):
        self.base_url = (base_url or self.default_url).rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get(self.env_key, "")
        self.image_host, self.http = image_host, http or HttpSettings()

    def _need_key(self):
        if not self.api_key:
            raise ToolError(f"{self.name} search is not configured: set {self.env_key} or pass api_key")

    def _image_url(self, image):
        if self.image_host is None:
            raise ToolError(f"image search over {self.name} needs a public URL for the image: "
                            "configure image_host (a served folder and its URL prefix)")
        return self.image_host.publish(image)

    def search(self, query_or_image, k=5):
        self._need_key()
        if isinstance(query_or_image, str):
            items = self._text(query_or_image, k)
        else:
            url = self._image_url(query_or_image)
            items = self._image(url, k)
        if not isinstance(items, list):
            raise ToolError(f"{self.name} returned an unexpected response shape")
        items = [it for it in items if isinstance(it, dict)]
        out = []
        for it in items[:k]:
            if isinstance(it, dict):
                out.append({"title": str(it.get("title", "")), "url": str(it.get("link") or it.get("url") or ""),
                            "snippet": str(it.get("snippet") or it.get("content") or it.get("source") or "")})
        return out


def field(answer, key):
    """answer[key] of a JSON API answer, [] when absent; an answer that is not an object is an error."""
    if not isinstance(answer, dict):
        raise ToolError(f"the search API returned {type(answer).__name__} where a JSON object was expected")
    return answer.get(key) or []


class SerperSearch(_HttpSearch):
    """serper.dev: POST /search {"q"} -> organic[]; POST /lens {"url"} -> organic[]."""
    name, env_key, default_url = "serper", "SERPER_API_KEY", "https://google.serper.dev"

    def _post(self, path, body):
        headers = {"X-API-KEY": self.api_key, "Content-Type": "application/json"}
        return http_json("POST", self.base_url + path, self.name, self.http, json=body, headers=headers)

    def _text(self, query, k):
        return field(self._post("/search", {"q": query, "num": k}), "organic")

    def _image(self, url, k):
        return field(self._post("/lens", {"url": url}), "organic")


class SerpAPISearch(_HttpSearch):
    """serpapi.com: GET /search.json engine=google -> organic_results[]; engine=google_lens -> visual_matches[]."""
    name, env_key, default_url = "serpapi", "SERPAPI_API_KEY", "https://serpapi.com"

    def _get(self, params):
        params = dict(params, api_key=self.api_key)
        return http_json("GET", self.base_url + "/search.json", self.name, self.http, params=params)

    def _text(self, query, k):
        return field(self._get({"engine": "google", "q": query, "num": k}), "organic_results")

    def _image(self, url, k):
        return field(self._get({"engine": "google_lens", "url": url}), "visual_matches")


class SearxngSearch(_HttpSearch):
    """A SearXNG instance's JSON API: GET /search?q=...&format=json -> results[] (text only;
    the instance must have the json format enabled). base_url defaults to $SEARXNG_URL."""
    name = "searxng"

    def __init__(self, base_url=None, api_key=None, image_host=None, http=None):
        super().__init__(base_url or os.environ.get("SEARXNG_URL", ""), api_key or "", image_host, http)

    def _need_key(self):
        if not self.base_url:
            raise ToolError("searxng search is not configured: set SEARXNG_URL or pass base_url")

    def _text(self, query, k):
        return field(http_json("GET", self.base_url + "/search", self.name, self.http,
                               params={"q": query, "format": "json"}), "results")

    def _image_url(self, image):
        raise ToolError("searxng has no reverse image search; use text_search, or the serper/serpapi backend")


# ----------------------------------------------------------------------------------------------
# 4. Page visits: fetch (safely), HTML -> text, keep the passages most relevant to the goal


class _TextExtractor(html.parser.HTMLParser):
    """HTML -> paragraphs, dropping scripts, styles and page furniture (nav, header, footer...)."""
    SKIP = {"script", "style", "noscript", "nav", "header", "footer", "aside", "form", "svg", "iframe", "template"}
    BLOCK = {"p", "div", "li", "br", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "section", "article",
             "blockquote", "pre", "td", "th", "dd", "dt", "main", "table", "ul", "ol"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.skip, self.title, self.in_title = 0, "", False
        self.paragraphs, self.current = [], []

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skip += 1
        elif tag == "title":
            self.in_title = True
        elif tag in self.BLOCK:
            self._flush()

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.skip = max(0, self.skip - 1)
        elif tag == "title":
            self.in_title = False
        elif tag in self.BLOCK:
            self._flush()

    def handle_data(self, data):
        if self.in_title:
            self.title += data
        elif not self.skip:
            self.current.append(data)

    def _flush(self):
        text = " ".join("".join(self.current).split())
        if text:
            self.paragraphs.append(text)
        self.current = []


def html_to_text(page):
    """(title, text) of an HTML page; paragraphs separated by blank lines."""
    parser = _TextExtractor()
    # a "<" that does not open a tag closed before the next "<" is text: escaping it keeps
    # html.parser linear (it rescans from every "<" of an unclosed run like "<a<a<a...")
    page = re.sub(r"<(?=[^<>]*(?:<|$))", "&lt;", page)
    parser.feed(page)
    parser.close()
    parser._flush()
    return " ".join(parser.title.split()), "\n\n".join(parser.paragraphs)


def read_capped(response, max_bytes, deadline, what):
    """The body of a streamed response, at most `max_bytes`, read before `deadline` (monotonic
    seconds; checked between reads, each read bounded by the connection's timeout)."""
    body = bytearray()
    for chunk in response.iter_content(65536):
        body += chunk
        if len(body) > max_bytes:
            raise ToolError(f"{what} sent more than {max_bytes} bytes")
        if time.monotonic() > deadline:
            raise ToolError(f"{what} did not finish sending within its deadline")
    return bytes(body)


@dataclass
class Target:
    """Where a checked URL really goes: the connection is made to `ip`, with `host` as the Host
    header and TLS server name, so nothing resolves the name a second time (no DNS rebinding)."""
    scheme: str
    host: str      # IDNA-encoded
    port: int
    path: str      # path and query
    ip: str


def check_public_url(url, allow_private=False):
    """Validate a URL from model output and resolve its host once -> Target.

    Refused: anything but http(s); backslashes, whitespace and control characters; user info
    (`user@host`); a host or port that Python's and urllib3's URL parsers read differently; and,
    unless allow_private, hosts resolving to loopback, private, link-local or other non-public
    addresses."""
    from urllib3.util import parse_url
    if not isinstance(url, str) or not url.lower().startswith(("http://", "https://")):
        raise ToolError(f"visit only opens http(s) URLs, got {str(url)[:100]!r}")
    if "\\" in url or any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        raise ToolError(f"visit refuses {url[:100]!r}: backslashes, spaces and control characters are not allowed in a URL")
    try:
        parts, theirs = urlparse(url), parse_url(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as e:
        raise ToolError(f"visit refuses {url[:100]!r}: {e}") from None
    if not parts.hostname or "@" in parts.netloc or theirs.auth:
        raise ToolError(f"visit refuses {url[:100]!r}: no host, or user info before the host")
    try:
        host = parts.hostname.encode("idna").decode("ascii").lower()   # encoded once, used for DNS, Host and TLS
    except UnicodeError:
        raise ToolError(f"visit refuses {url[:100]!r}: the host name is not valid") from None
    if (theirs.host or "").strip("[]").lower() != host or (theirs.port or port) != port:
        raise ToolError(f"visit refuses {url[:100]!r}: its host is ambiguous")
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError):
        raise ToolError(f"cannot resolve host {parts.hostname!r}") from None
    ips = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    bad = [ip for ip in ips if not ip.is_global]
    if bad and not allow_private:
        raise ToolError(f"visit refuses {parts.hostname} ({bad[0]}): not a public address")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(parts.scheme, host, port, path, str(ips[0]))


class WebPages:
    """Fetches pages over HTTP: every hop checked and pinned to the checked address (redirects
    too), a wall-clock deadline on the whole response, a size cap, a content-type check.
    `allow_private` changes what may be fetched, so it is part of the name the cache keys on."""
    TYPES = ("text/html", "text/plain", "application/xhtml+xml")

    def __init__(self, timeout=15.0, max_bytes=2_000_000, allow_private=False, max_redirects=5):
        self.timeout, self.max_bytes = timeout, max_bytes
        self.allow_private, self.max_redirects = allow_private, max_redirects
        self.name = "web+private" if allow_private else "web"

    def _open(self, target, deadline):
        """GET target.path from target.ip, as target.host: (urllib3 response, pool)."""
        import certifi
        import urllib3
        left = max(0.1, deadline - time.monotonic())
        kw = dict(timeout=urllib3.Timeout(connect=min(left, self.timeout), read=min(left, self.timeout)),
                  retries=False, maxsize=1)
        if target.scheme == "https":
            pool = urllib3.HTTPSConnectionPool(target.ip, target.port, server_hostname=target.host,
                                               assert_hostname=target.host, cert_reqs="CERT_REQUIRED",
                                               ca_certs=certifi.where(), **kw)
        else:
            pool = urllib3.HTTPConnectionPool(target.ip, target.port, **kw)
        default = {"http": 80, "https": 443}[target.scheme]
        headers = {"Host": target.host if target.port == default else f"{target.host}:{target.port}",
                   "User-Agent": "mmsearch-r1/0.1 (research agent)"}
        return pool.urlopen("GET", target.path, headers=headers, redirect=False, preload_content=False,
                            assert_same_host=False, retries=False), pool

    def _get(self, url, accept, what):
        """GET `url` following checked redirects: (content type, body bytes, headers). `accept`:
        the content types (or "image/" prefix) allowed; `what`: the word used in errors."""
        import urllib3
        deadline = time.monotonic() + self.timeout
        for _ in range(self.max_redirects + 1):
            target = check_public_url(url, self.allow_private)
            try:
                r, pool = self._open(target, deadline)
            except urllib3.exceptions.TimeoutError:
                raise ToolError(f"{url} did not answer within {self.timeout:g}s") from None
            except urllib3.exceptions.HTTPError as e:
                raise ToolError(f"could not fetch {url} ({type(e).__name__})") from None
            try:
                if r.status in (301, 302, 303, 307, 308) and r.headers.get("location"):
                    url = urljoin(url, r.headers["location"])
                    continue
                if r.status >= 400:
                    raise ToolError(f"{url} answered HTTP {r.status}")
                ctype = r.headers.get("content-type", "text/html").split(";")[0].strip().lower()
                if not ctype.startswith(accept):
                    raise ToolError(f"{url} is {ctype}, not {what}")
                body = bytearray()
                while len(body) < self.max_bytes:
                    chunk = r.read1(65536)
                    if not chunk:
                        break
                    body += chunk
                    if time.monotonic() > deadline:
                        raise ToolError(f"{url} did not finish sending within {self.timeout:g}s")
            except urllib3.exceptions.HTTPError as e:
                raise ToolError(f"{url}: the connection failed while reading ({type(e).__name__}); "
                                f"gave up within {self.timeout:g}s") from None
            finally:
                r.release_conn()
                pool.close()
            return ctype, bytes(body[:self.max_bytes]), r.headers
        raise ToolError(f"{url}: more than {self.max_redirects} redirects")

    def fetch(self, url):
        """A web page as (title, text)."""
        ctype, body, headers = self._get(url, self.TYPES, "a web page")
        charset = re.search(r"charset=([\w-]+)", headers.get("content-type", ""))
        try:
            text = body.decode(charset.group(1) if charset else "utf-8", errors="replace")
        except LookupError:   # an unknown charset name
            text = body.decode("utf-8", errors="replace")
        return html_to_text(text) if ctype != "text/plain" else ("", text)

    def fetch_image(self, url):
        """An image's bytes (a benchmark record's image URL), with the same checks as pages.
        Errors are ValueErrors, as for any unreadable image."""
        try:
            return self._get(url, "image/", "an image")[1]
        except ToolError as e:
            raise ValueError(str(e)) from None


def bm25_rank(query, passages, k1=1.5, b=0.75):
    """Indices of `passages` from most to least relevant to `query` (Okapi BM25; ties keep order)."""
    docs = [Counter(words(p)) for p in passages]
    n = len(docs)
    avg = sum(sum(d.values()) for d in docs) / max(n, 1) or 1.0
    df = Counter(t for d in docs for t in d)
    q = set(words(query))

    def score(d):
        length = sum(d.values())
        return sum(math.log(1 + (n - df[t] + 0.5) / (df[t] + 0.5)) * d[t] * (k1 + 1)
                   / (d[t] + k1 * (1 - b + b * length / avg)) for t in q if t in d)
    return sorted(range(n), key=lambda i: -score(docs[i]))


def select_passages(text, goal, max_chars=3000):
    """The paragraphs most relevant to `goal` (BM25), in page order, within `max_chars`."""
    paragraphs = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    chosen, used = [], 0
    for i in bm25_rank(goal, paragraphs):
        p = paragraphs[i]
        if used + len(p) > max_chars:
            if not chosen:   # one huge paragraph: cut it rather than return nothing
                chosen.append(i)
                paragraphs[i] = p[:max_chars] + "..."
            continue
        chosen.append(i)
        used += len(p) + 2
    return "\n\n".join(paragraphs[i] for i in sorted(chosen))


def visit(url, goal, pages=None, max_chars=3000, allow_private=False):
    """The page at `url` as clean text, cut to the passages most relevant to `goal`.
    pages: where pages come from (WebPages by default; a LocalTextSearch serves its corpus)."""
    pages = pages or WebPages(allow_private=allow_private)
    return format_page(url, *pages.fetch(url), goal, max_chars)


def format_page(url, title, text, goal, max_chars):
    body = select_passages(text, goal, max_chars)
    return (f"Title: {title}\n" if title else "") + f"URL: {url}\n\n{body}"


SUMMARY_PROMPT = """Below is the text of a web page and a goal. Write down the evidence on the page
that is relevant to the goal: the facts, names, numbers and dates, quoted or closely paraphrased,
in at most {words} words. Add nothing the page does not say. If the page holds nothing relevant
to the goal, reply exactly: not found

Goal: {goal}

Page ({url}):
{text}"""


def summarize_page(endpoint, url, title, text, goal, max_chars, page_chars=24000):
    """Vision-DeepResearch / MMSearch-R1 visits: an LLM's summary of the page for `goal`, cut to
    `max_chars`. Raises ToolError when the endpoint fails (the caller falls back to passages)."""
    prompt = SUMMARY_PROMPT.format(words=max(20, max_chars // 7), goal=goal, url=url,
                                   text=(f"{title}\n\n" if title else "") + text[:page_chars])
    summary = " ".join(endpoint.complete(prompt, max_tokens=max(64, max_chars // 3)).split())
    if not summary:
        raise ToolError("the summarizer returned an empty reply")
    summary = summary if len(summary) <= max_chars else summary[:max_chars] + "..."
    return (f"Title: {title}\n" if title else "") + f"URL: {url}\n\nSummary for the goal \"{goal}\": {summary}"


# ----------------------------------------------------------------------------------------------
# 5. The cache: one SQLite file (WAL), shared by threads and processes


class Cache:
    """Tool results keyed by a hash of (backend, tool, normalized arguments[, image bytes]).

    max_age: seconds after which an entry is ignored (None: forever). cache_only: replay mode,
    a miss is an error (for reproducible offline runs). Values are results only: API keys never
    enter the key or the value."""

    def __init__(self, path, max_age=None, cache_only=False):
        self.path, self.max_age, self.cache_only = str(path), max_age, cache_only
        self.local = threading.local()
        p = Path(self.path)
        if p.is_dir():
            raise ValueError(f"cache {self.path} is a folder; give a file path like {p / 'tool_cache.sqlite'}")
        if cache_only and not p.exists():
            raise ValueError(f"cache_only (replay mode) but there is no cache at {self.path}")
        # a cache we cannot write (a read-only file or folder) still replays what it holds
        self.read_only = p.exists() and not os.access(self.path, os.W_OK) or \
            not p.exists() and not os.access(next(q for q in [p.parent, *p.parent.parents] if q.exists()), os.W_OK)
        if self.read_only and not p.exists():
            raise ValueError(f"cannot create the cache {self.path}: its folder is not writable; pass another --cache")
        try:
            if not self.read_only:
                p.parent.mkdir(parents=True, exist_ok=True)
                db = self._db()
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("CREATE TABLE IF NOT EXISTS results (key TEXT PRIMARY KEY, value TEXT, time REAL)")
                db.commit()
            else:
                self._db().execute("SELECT 1 FROM results LIMIT 1").fetchall()
        except sqlite3.Error as e:
            raise ValueError(f"cannot use the cache {self.path} ({e}); is it a tool cache, and not locked "
                             "by another program? Pass another --cache, or --cache '' for none") from None

    def _db(self):
        if getattr(self.local, "db", None) is None:
            uri = f"file:{Path(self.path).resolve()}" + ("?mode=ro" if self.read_only else "")
            self.local.db = sqlite3.connect(uri, uri=True, timeout=30)
        return self.local.db

    @staticmethod
    def key(backend, tool, args, image=None):
        h = hashlib.sha256(json.dumps([backend, tool, args], sort_keys=True).encode())
        if image is not None:
            h.update(png_bytes(image))
        return h.hexdigest()

    def get(self, key):
        try:
            row = self._db().execute("SELECT value, time FROM results WHERE key = ?", (key,)).fetchone()
        except sqlite3.Error as e:
            raise ToolError(f"the tool cache could not be read ({e})") from None
        if row is None or (self.max_age is not None and time.time() - row[1] > self.max_age):
            return None
        return json.loads(row[0])

    def put(self, key, value):
        if self.read_only:
            return
        try:
            db = self._db()
            db.execute("INSERT OR REPLACE INTO results VALUES (?, ?, ?)", (key, json.dumps(value), time.time()))
            db.commit()
        except sqlite3.Error:   # a locked or full cache costs a cache entry, never the result
            pass

    def fetch(self, key, compute):
        """The cached value, or compute() stored; in replay mode a miss is a ToolError."""
        value = self.get(key)
        if value is not None:
            return value
        if self.cache_only:
            raise ToolError("this call is not in the cache (replay mode: cache_only is set)")
        value = compute()
        self.put(key, value)
        return value


# ----------------------------------------------------------------------------------------------
# 6. The toolbox: one turn's calls, run concurrently, formatted as one observation


@dataclass
class Observation:
    """A tool-response turn: `responses`, one content list ({"type": "text"} / {"type": "image"}
    parts) per call or parse error, each shown in its own <tool_response>; the new `images`
    (crops) in order; a result per call for logging."""
    responses: list
    images: list
    results: list
    errors: int = 0


class Toolbox:
    """The configured tools. `run(calls, images)` executes one turn's calls concurrently (threads),
    each bounded by `call_timeout` seconds; any failure becomes an error observation.

    text_search / image_search: backends (see section 3); pages: where `visit` reads pages
    (WebPages, or a LocalTextSearch's corpus); convention / shown_size: the policy's crop-box
    convention and image size as the model sees it; k: results per search; obs_chars: the
    observation's text budget."""

    def __init__(self, text_search=None, image_search=None, pages=None, cache=None, convention="abs",
                 shown_size=None, k=5, call_timeout=60.0, obs_chars=4000, visit_chars=3000,
                 crop_settings=CropSettings(), max_workers=8, grounder=None, multi_box=False, summarizer=None):
        self.text_search, self.image_search, self.pages, self.cache = text_search, image_search, pages, cache
        self.convention, self.shown_size = convention, shown_size
        self.k, self.call_timeout, self.obs_chars, self.visit_chars = k, call_timeout, obs_chars, visit_chars
        self.crop_settings = crop_settings
        self.grounder, self.multi_box, self.summarizer = grounder, multi_box, summarizer
        self.pool = ThreadPoolExecutor(max_workers=max_workers)
        self.box_pool = ThreadPoolExecutor(max_workers=4) if multi_box else None   # one call's boxes
        self.lock = threading.Lock()
        self.stats = {name: Counter() for name in TOOL_NAMES}

    def for_policy(self, policy):
        """Crop boxes in this policy's convention, read on images as it is shown them. The scripts
        build the toolbox before the model loads (a bad --corpus stops them in seconds), then this."""
        self.convention, self.shown_size = policy.crop_convention, policy.shown_size
        return self

    @property
    def schemas(self):
        """The tool schemas this run offers (what the system prompt shows)."""
        return tool_schemas(grounding=self.grounder is not None, multi_box=self.multi_box)

    def _cached(self, backend, tool, args, compute, image=None):
        if self.cache is None:
            return compute()
        return self.cache.fetch(Cache.key(backend.name, tool, args, image), compute)

    def _region(self, images, args, bbox=None):
        """(image or region, note): args' image cut to `bbox` (default args' bbox_2d), or to the
        region a grounding model finds for args' query (the note says which box it chose)."""
        i = args.get("image", 0)
        if not 0 <= i < len(images):
            raise ToolError(f"image {i} does not exist; images are numbered 0 to {len(images) - 1}")
        image = images[i]
        shown = self.shown_size(image) if (self.shown_size and self.convention == "abs") else None
        if "query" in args:
            if self.grounder is None:
                raise ToolError("this run has no grounding model to find a region by description; give bbox_2d")
            if "bbox_2d" in args:
                raise ToolError("give bbox_2d or query, not both")
            query = " ".join(args["query"].split())
            box, score = self._cached(self.grounder, "ground", {"query": query.lower()},
                                      lambda: list(self.grounder.locate(image, query)), image)
            shown_box = to_convention(box, image, self.convention, shown)
            note = f"Found {query!r} at bbox_2d {json.dumps(shown_box)} (score {score:.2f})."
            return crop(image, box, "abs", None, self.crop_settings), note
        bbox = bbox if bbox is not None else args.get("bbox_2d")
        if bbox is None:
            return image, ""
        return crop(image, bbox, self.convention, shown, self.crop_settings), ""

    def _image_search(self, images, args, bbox=None):
        region, note = self._region(images, args, bbox)
        hits = self._cached(self.image_search, "image_search", {"k": self.k},
                            lambda: self.image_search.search(region, self.k), region)
        return (note + "\n" if note else "") + format_results(hits)

    def _call(self, call, images):
        """One call -> (text, image or None). Raises ToolError on failure."""
        name, args = call["name"], call["arguments"]
        if name == "crop":
            region, note = self._region(images, args)
            return note, region
        if name == "image_search":
            if self.image_search is None:
                raise ToolError("image_search is not available in this run")
            boxes = args.get("bbox_2d")
            if not (isinstance(boxes, list) and boxes and all(isinstance(b, list) for b in boxes)):
                return self._image_search(images, args), None
            if not self.multi_box:
                raise ToolError("image_search takes one box in this run: bbox_2d [x1, y1, x2, y2]")
            futures = [self.box_pool.submit(self._image_search, images, args, b) for b in boxes]
            parts = []   # one box failing is an entry in the list, not the call's failure
            for n, (b, fut) in enumerate(zip(boxes, futures), start=1):
                try:
                    parts.append(f"Box {n} {json.dumps(b)}:\n{fut.result()}")
                except ToolError as e:
                    parts.append(f"Box {n} {json.dumps(b)}: Error: {e}")
            return "\n\n".join(parts), None
        if name == "text_search":
            if self.text_search is None:
                raise ToolError("text_search is not available in this run")
            query = " ".join(args["query"].split())
            hits = self._cached(self.text_search, name, {"query": query.lower(), "k": self.k},
                                lambda: self.text_search.search(query, self.k))
            return format_results(hits), None
        if name == "visit":
            pages = self.pages or WebPages()
            title, text = self._cached(pages, name, {"url": args["url"]}, lambda: list(pages.fetch(args["url"])))
            if self.summarizer is not None:
                try:
                    return self._cached(self.summarizer, "summarize", {"url": args["url"], "goal": args["goal"]},
                                        lambda: summarize_page(self.summarizer, args["url"], title, text, args["goal"],
                                                               self.visit_chars)), None
                except ToolError as e:   # the passages remain: the observation says why
                    note = f"(The page summarizer failed: {e}. The passages most relevant to the goal follow.)\n"
                    return note + format_page(args["url"], title, text, args["goal"], self.visit_chars), None
            return format_page(args["url"], title, text, args["goal"], self.visit_chars), None
        raise ToolError(f"unknown tool {name!r}")

    def run(self, calls, images, parse_errors=()):
        """Execute one turn's calls. `images`: every image the agent has so far (0 = the question
        image); crops are numbered after them. `parse_errors` (from parse_tool_calls) are shown too,
        each as its own response."""
        futures = [self.pool.submit(self._call, call, list(images)) for call in calls]
        deadline = time.monotonic() + self.call_timeout
        responses, new_images, results, errors = [], [], [], 0
        budget = self.obs_chars // max(1, len(calls))
        for call, fut in zip(calls, futures):
            head = f"{call['name']} {json.dumps(call['arguments'], ensure_ascii=False)}"
            try:
                text, image = fut.result(timeout=max(0.0, deadline - time.monotonic()))
                ok, err = True, None
            except FutureTimeout:
                fut.cancel()   # a call still queued never starts; a running one ends at its own deadline
                ok, err = False, f"timed out after {self.call_timeout:g}s"
            except ToolError as e:
                ok, err = False, str(e)
            except Exception as e:   # a bug or an odd backend: still an observation, never a crash
                ok, err = False, f"{type(e).__name__}: {str(e)[:200]}"
            with self.lock:
                self.stats[call["name"]]["calls"] += 1
                self.stats[call["name"]]["errors"] += not ok
            results.append({"name": call["name"], "arguments": call["arguments"], "ok": ok, "error": err})
            if not ok:
                errors += 1
                responses.append([{"type": "text", "text": f"{head}\nError: {err}"}])
            elif image is not None:
                new_images.append(image)
                number = len(images) + len(new_images) - 1
                note = f"{text}\n" if text else ""
                responses.append([{"type": "text", "text": f"{head}\n{note}Image {number} ({image.width}x{image.height}):"},
                                  {"type": "image"}])
            else:
                text = text if len(text) <= budget else text[:budget] + "..."
                responses.append([{"type": "text", "text": f"{head}\n{text}"}])
        for err in parse_errors:
            errors += 1
            responses.append([{"type": "text", "text": f"Error: {err}"}])
        if not calls and not parse_errors:
            responses.append([{"type": "text", "text": "No tool call found. Call a tool or give <answer>...</answer>."}])
        return Observation(responses, new_images, results, errors)


def format_results(hits):
    if not hits:
        return "No results."
    return "\n".join(f"{i}. {h['title']} ({h['url']})\n   {h['snippet']}" for i, h in enumerate(hits, 1))


# ----------------------------------------------------------------------------------------------
# 7. Command-line flags for the tools, shared by eval.py, train_sft.py and train_grpo.py


def add_tool_arguments(ap):
    """The tool flags (backend, local corpus and image index, HTTP engines, cache) as one group."""
    g = ap.add_argument_group("tools")
    g.add_argument("--backend", default="local", choices=["local", "serper", "serpapi", "searxng"], help="search engine")
    g.add_argument("--corpus", default=None, help="local backend: JSONL corpus (id, title, url, text)")
    g.add_argument("--image-index", default=None, help="local backend: JSONL image index (image, title, url, snippet)")
    g.add_argument("--embed-model", default=None,
                   help="local image search: a transformers image model instead of the numpy descriptor")
    g.add_argument("--search-url", default=None, help="HTTP backend base URL (default: the provider's; SearXNG: $SEARXNG_URL)")
    g.add_argument("--image-host-dir", default=None, help="HTTP image search: folder served at --image-host-url")
    g.add_argument("--image-host-url", default=None, help="HTTP image search: public URL prefix of --image-host-dir")
    g.add_argument("--allow-private-urls", action="store_true", help="let visit open loopback/private addresses")
    g.add_argument("--k", type=int, default=5, help="results per search")
    g.add_argument("--visit-chars", type=int, default=3000, help="visit keeps the passages most relevant to the goal "
                   "within this many characters")
    g.add_argument("--cache", default="runs/tool_cache.sqlite", help="SQLite cache of tool results ('' to disable)")
    g.add_argument("--cache-only", action="store_true", help="replay mode: a cache miss is an error observation")
    g.add_argument("--cache-max-age", type=float, default=None, help="ignore cache entries older than this (s)")
    g.add_argument("--grounding-model", default=None, help="crop/image_search by description: a zero-shot object "
                   "detector (Grounding DINO, OWLv2) hub id or folder; off by default")
    g.add_argument("--grounding-threshold", type=float, default=0.3, help="lowest detector score accepted")
    g.add_argument("--crop-upscale", type=int, default=CropSettings.upscale_to,
                   help="crops shorter than this (pixels) are upscaled to it before the model sees them")
    g.add_argument("--multi-box", action="store_true", help="image_search takes a list of boxes (results per box)")
    g.add_argument("--visit-summarizer", default=None, help="visit returns an LLM's summary for the goal: an "
                   "OpenAI-compatible base URL (or $SUMMARIZER_BASE_URL); key from $SUMMARIZER_API_KEY")
    g.add_argument("--visit-summarizer-model", default=None, help="the summarizer's model name (or $SUMMARIZER_MODEL)")
    return g


def cache_from_args(args):
    try:
        return Cache(args.cache, max_age=args.cache_max_age, cache_only=args.cache_only) if args.cache else None
    except ValueError as e:
        raise SystemExit(f"--cache: {e}") from None


HTTP_BACKENDS = {"serper": SerperSearch, "serpapi": SerpAPISearch, "searxng": SearxngSearch}


def check_tool_args(args):
    """The tool flags' quick checks, for the scripts to run before any slow work (loading a model):
    the local backend's files exist; an HTTP backend has its key, unless --cache-only replays a cache."""
    if args.backend == "local":
        if not args.corpus:
            raise SystemExit("--backend local needs --corpus (JSONL of id, title, url, text)")
        for flag, path in (("--corpus", args.corpus), ("--image-index", args.image_index)):
            if path and not Path(path).is_file():
                raise SystemExit(f"{flag} {path}: no such file (build a world with data/toyworld/prepare.py)")
    elif not args.cache_only:   # every search would fail: say so now, not in each tool observation
        try:
            HTTP_BACKENDS[args.backend](base_url=args.search_url)._need_key()
        except ToolError as e:
            raise SystemExit(f"--backend {args.backend}: {e} (or replay cached results with --cache-only)") from None


def toolbox_from_args(args):
    """The Toolbox the tool flags describe (with --no-tools, one that only caches); built before the
    model loads, it reads crop boxes in pixels of the image as given until `Toolbox.for_policy`."""
    if getattr(args, "no_tools", False):
        return Toolbox(cache=cache_from_args(args))
    check_tool_args(args)
    host = ImageHost(args.image_host_dir, args.image_host_url) if args.image_host_dir else None
    if args.backend == "local":
        try:
            text = LocalTextSearch(args.corpus)
            image = LocalImageSearch(args.image_index, args.embed_model) if args.image_index else None
        except (OSError, ValueError) as e:
            raise SystemExit(f"--corpus / --image-index: {e}") from None
        pages = text
    else:
        text = image = HTTP_BACKENDS[args.backend](base_url=args.search_url, image_host=host)
        pages = WebPages(allow_private=args.allow_private_urls)
    try:
        grounder = Grounder(args.grounding_model, args.grounding_threshold) if args.grounding_model else None
        summarizer = SummarizerEndpoint(args.visit_summarizer, args.visit_summarizer_model or "") \
            if args.visit_summarizer or args.visit_summarizer_model else None
    except ValueError as e:
        raise SystemExit(str(e)) from None
    return Toolbox(text_search=text, image_search=image, pages=pages, cache=cache_from_args(args),
                   k=args.k, grounder=grounder,
                   visit_chars=args.visit_chars, multi_box=args.multi_box, summarizer=summarizer,
                   crop_settings=CropSettings(upscale_to=args.crop_upscale))
