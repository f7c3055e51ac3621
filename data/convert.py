"""Turn a benchmark in another layout into our task JSONL, with its images written as files.

    python data/convert.py hr_bench_4k.tsv --out data/hrbench            # TSV with base64 images
    python data/convert.py fvqa_test.parquet --out data/fvqa             # parquet, images as bytes
    python data/convert.py livevqa.json --out data/livevqa               # nested JSON (a list or {"data": [...]})
    python data/convert.py some/folder --out data/x                      # save_to_disk folder, or parquet files
    python data/convert.py org/dataset --split test --out data/x         # a Hugging Face hub dataset

Writes DIR/tasks.jsonl (one task per record: id, question, answers, image as paths relative to DIR,
options for multiple choice, and every other original key) and DIR/images/. Records that cannot be
used are listed in DIR/skipped.jsonl with the reason. Then:

    python eval.py --model ... --data DIR/tasks.jsonl ...

The fields are read as eval.py reads them (`core.task_from_record`: the aliases in the README's
"Real benchmarks" table). Parquet and Hugging Face datasets need optional packages, imported only
here: `pip install pyarrow` (parquet) or `pip install datasets` (hub ids, save_to_disk folders).
TSV, JSON and JSONL need nothing.
"""
import argparse
import base64
import csv
import io
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mmsearch_r1 as core  # noqa: E402


def need(module, what):
    try:
        return __import__(module)
    except ImportError:
        raise SystemExit(f"convert: {what} needs the optional package {module!r}: pip install {module}") from None


def plain(value):
    """A value from pyarrow / datasets / numpy -> JSON-able Python; images become {"bytes": ...}."""
    from PIL import Image
    if isinstance(value, Image.Image):
        buf = io.BytesIO()
        value.convert("RGB").save(buf, format="PNG")
        return {"bytes": buf.getvalue()}
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "tolist"):   # numpy arrays and scalars
        return plain(value.tolist())
    if isinstance(value, float) and value != value:   # NaN: an empty cell
        return None
    return value


def parse_json(text, where):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise SystemExit(f"convert: {where}: not valid JSON ({e.msg}, line {e.lineno} column {e.colno})") from None


def read_records(source, split, config):
    """(records, folder that relative image paths start from)."""
    path = Path(source)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            return [plain(r) for r in need_parquet().read_table(path).to_pylist()], path.parent
        if suffix in (".tsv", ".csv"):
            csv.field_size_limit(sys.maxsize)   # base64 images are long cells
            with open(path, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
            return [{k: (v if v != "" else None) for k, v in r.items()} for r in rows], path.parent
        if suffix == ".jsonl":
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
            return [parse_json(line, f"{path}:{n}") for n, line in enumerate(lines, 1) if line.strip()], path.parent
        if suffix == ".json":
            data = parse_json(path.read_text(encoding="utf-8", errors="replace"), str(path))
            if isinstance(data, dict):   # {"data": [...]} or {id: record, ...}
                lists = [v for v in data.values() if isinstance(v, list)]
                data = lists[0] if len(lists) == 1 else [dict(v, id=v.get("id", k)) for k, v in data.items()
                                                         if isinstance(v, dict)]
            return data, path.parent
        raise SystemExit(f"convert: {path}: unknown file type {suffix!r}; give .parquet, .tsv, .csv, .json or .jsonl")
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists() or (path / "dataset_dict.json").exists():
            datasets = need("datasets", "a save_to_disk folder")
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[split or next(iter(ds))]
            return [plain(r) for r in ds], path
        files = sorted(path.rglob("*.parquet"))
        if not files:
            raise SystemExit(f"convert: {path} has no parquet files and is not a save_to_disk folder")
        pq = need_parquet()
        return [plain(r) for f in files if not split or split in f.name for r in pq.read_table(f).to_pylist()], path
    if source.count("/") == 1 and not source.startswith((".", "/")):
        datasets = need("datasets", "a Hugging Face hub dataset")
        ds = datasets.load_dataset(source, config, split=split or "test")
        return [plain(r) for r in ds], Path(".")
    raise SystemExit(f"convert: {source}: no such file or folder, and not a hub id like org/name")


def need_parquet():
    need("pyarrow", "a parquet file")
    import pyarrow.parquet as pq
    return pq


def json_safe(value):
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode()
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def convert(records, root, out, image_root=None, limit=None):
    """Records -> out/tasks.jsonl (+ images/, skipped.jsonl). Returns (written, skipped)."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    tasks, skipped, seen = [], [], set()
    for n, record in enumerate(records[:limit], start=1):
        try:
            if not isinstance(record, dict):
                raise ValueError(f"a record must be an object, got {type(record).__name__}")
            task = core.task_from_record(record, root, image_root=image_root, inline_dir=out / "images",
                                         default_id=str(n))
        except ValueError as e:
            skipped.append({"record": n, "error": str(e)})
            continue
        if task["id"] in seen:
            skipped.append({"record": n, "error": f"repeats the id {task['id']!r}"})
            continue
        seen.add(task["id"])
        found = core.record_values(record, core.QUESTION_KEYS)
        row = {k: json_safe(v) for k, v in record.items() if k not in core.IMAGE_KEYS}
        row.update({f"source_{k}": v for k, v in record.items() if k in core.IMAGE_KEYS and isinstance(v, str)
                    and not core.looks_like_base64(v)})
        row.update(id=task["id"], question=core.question_text(found[0][1]), answers=task["answers"],
                   image=[os.path.relpath(p, out) for p in task["image"]])
        if "options" in task:
            row["options"] = task["options"]
        tasks.append(row)
    core.write_jsonl(out / "skipped.jsonl", skipped)
    core.write_jsonl(out / "tasks.jsonl", tasks)
    return len(tasks), skipped


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="a .parquet/.tsv/.csv/.json/.jsonl file, a folder, or a hub id (org/name)")
    ap.add_argument("--out", required=True, help="folder for tasks.jsonl and images/")
    ap.add_argument("--split", default=None, help="dataset split (hub ids and folders; default: test)")
    ap.add_argument("--config", default=None, help="dataset configuration name (hub ids)")
    ap.add_argument("--image-root", default=None, help="folder the records' image paths are relative to")
    ap.add_argument("--limit", type=int, default=None, help="convert only the first N records")
    args = ap.parse_args(argv)
    records, root = read_records(args.source, args.split, args.config)
    if not isinstance(records, list) or not records:
        raise SystemExit(f"convert: {args.source} holds no records")
    written, skipped = convert(records, root, args.out, args.image_root, args.limit)
    print(f"convert: {written} tasks -> {Path(args.out) / 'tasks.jsonl'}; {len(skipped)} skipped"
          + (f" (see skipped.jsonl; the first: record {skipped[0]['record']}: {skipped[0]['error']})" if skipped else ""))
    if not written:
        raise SystemExit("convert: no record could be used; check the layout against the README's "
                         "'Real benchmarks' table")
    return written, skipped


if __name__ == "__main__":
    main()
