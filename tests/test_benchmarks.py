"""Real benchmark layouts: each loads with its image and its full answer list (directly or after
data/convert.py), or fails with a message naming the record and the key; the benchmark metrics."""
import base64
import importlib.util
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

import eval as ev
import mmsearch_r1 as core
import tools

ROOT = Path(__file__).resolve().parents[1]


def png(rgb=(200, 30, 30), size=(40, 30)):
    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, format="PNG")
    return buf.getvalue()


def write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def converter():
    spec = importlib.util.spec_from_file_location("convert", ROOT / "data" / "convert.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def image_server():
    """A loopback server: /img.png is a PNG, /page is HTML."""
    body = png((10, 200, 10))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            data, ctype = (body, "image/png") if self.path == "/img.png" else (b"<p>hi</p>", "text/html")
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *a):
            pass
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_infoseek_ids_and_merged_answers(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "oven_01.jpg").write_bytes(png())
    (tmp_path / "imgs" / "oven_02.jpg").write_bytes(png())
    data = write(tmp_path / "infoseek_val.jsonl", [
        {"data_id": "d1", "image_id": "oven_01", "question": "Which city?", "answer": ["Paris"],
         "answer_eval": ["Paris", "City of Light"]},
        {"data_id": "d2", "image_id": "oven_02", "question": "When built?", "answer": ["1889"],
         "answer_eval": [{"wikidata": 1889, "range": [1880, 1898]}]}])
    with pytest.raises(SystemExit, match="cannot read image .*oven_01.*--image-root FOLDER and --image-ext"):
        ev.load_tasks(data)
    tasks = ev.load_tasks(data, image_root=tmp_path / "imgs", image_ext="jpg")
    assert [t["id"] for t in tasks] == ["d1", "d2"]
    assert tasks[0]["answers"] == ["Paris", "City of Light"]
    assert tasks[1]["answers"] == ["1889"] and tasks[1]["answer_ranges"] == [[1880.0, 1898.0]]
    assert core.task_images(tasks[0])[0].size == (40, 30)


def test_url_images_fail_clearly_or_are_fetched(tmp_path, image_server):
    rows = [{"prompt": "Who made it?", "answers": ["Ann"], "file_path": f"{image_server}/img.png", "id": "m1"},   # MMSearch-style
            {"question": "What year?", "answer": ["2021", "2022"], "image_url": f"{image_server}/img.png"}]      # DynVQA
    data = write(tmp_path / "mm.jsonl", rows)
    with pytest.raises(SystemExit, match="the image under 'file_path': it is a URL .*--fetch-images"):
        ev.load_tasks(data)
    fetch = tools.WebPages(allow_private=True).fetch_image
    tasks = ev.load_tasks(data, inline_dir=tmp_path / "in", fetch=fetch)
    assert tasks[0]["question"] == "Who made it?" and tasks[1]["answers"] == ["2021", "2022"]
    assert [core.task_images(t)[0].getpixel((0, 0)) for t in tasks] == [(10, 200, 10)] * 2


def test_private_urls_are_refused_when_fetching(tmp_path, image_server):
    rows = [{"id": "u", "question": "q", "answers": ["a"], "image_url": f"{image_server}/img.png"},
            {"id": "p", "question": "q", "answers": ["a"], "image_url": f"{image_server}/page"},
            {"id": "b1", "question": "q", "answers": ["a"], "image": {"bytes": base64.b64encode(png()).decode()}},
            {"id": "b2", "question": "q", "answers": ["a"], "image": "data:image/png;base64," + base64.b64encode(png()).decode()}]
    tasks = {t["id"]: t for t in ev.load_tasks(write(tmp_path / "d.jsonl", rows), inline_dir=tmp_path / "in",
                                                fetch=tools.WebPages().fetch_image)}
    assert "127.0.0.1" in tasks["u"]["error"] and "line 1" in tasks["u"]["error"]   # not a public address
    tasks = {t["id"]: t for t in ev.load_tasks(write(tmp_path / "d.jsonl", rows), inline_dir=tmp_path / "in",
                                                fetch=tools.WebPages(allow_private=True).fetch_image)}
    assert "not an image" in tasks["p"]["error"] and "line 2" in tasks["p"]["error"]
    for rid in ("b1", "b2"):   # {"bytes": base64} and a data: URI are decoded and written as files
        assert Path(tasks[rid]["image"][0]).parent == tmp_path / "in" and core.task_images(tasks[rid])[0].size == (40, 30)


def test_visualprobe_and_livevqa_layouts(tmp_path):
    base = tmp_path / "vp"
    (base / "images").mkdir(parents=True)
    (base / "images" / "a.png").write_bytes(png())
    data = tmp_path / "visualprobe.json"
    data.write_text(json.dumps([{"problem": "What colour is the sign?", "solution": "<answer>red</answer>",
                                 "images": ["images/a.png"]}]))
    (task,) = ev.load_tasks(data, image_root=base)
    assert task["question"] == "What colour is the sign?" and task["answers"] == ["red"] and task["id"] == "1"
    live = tmp_path / "livevqa.json"
    (tmp_path / "img.png").write_bytes(png())
    live.write_text(json.dumps([{"id": "lv1", "img_path": "img.png",
                                 "level1_qa": {"question": "Who is shown?", "Ground_Truth": "Bo",
                                               "Ground_Truth_List": ["Bo", "Bo Li"]}}]))
    (task,) = ev.load_tasks(live)
    assert task["question"] == "Who is shown?" and task["answers"] == ["Bo", "Bo Li"] and task["id"] == "lv1"


def test_bad_records_name_the_record_and_the_key(tmp_path):
    (tmp_path / "a.png").write_bytes(png())
    good = {"question": "q?", "answers": ["x"], "image": "a.png"}
    rows = [dict(good, id=f"g{i}") for i in range(6)] + [
        {"id": "noimg", "question": "q?", "answers": ["x"]},
        {"id": "dict", "question": "q?", "answers": {"text": "x"}, "image": "a.png"},
        {"id": "empty", "question": "q?", "answers": [], "image": "a.png"},
        {"id": "qnum", "question": 7, "answers": ["x"], "image": "a.png"},
        {"id": "b64", "question": "q?", "answers": ["x"], "image": {"bytes": "not base64!"}}]
    tasks = {t["id"]: t for t in ev.load_tasks(write(tmp_path / "d.jsonl", rows))}
    assert "line 7: no image" in tasks["noimg"]["error"] and "--allow-no-image" in tasks["noimg"]["error"]
    assert "answers under 'answers' hold a dict" in tasks["dict"]["error"]
    assert "no answers" in tasks["empty"]["error"]
    assert "the question is a int" in tasks["qnum"]["error"]
    assert "the image under 'image'" in tasks["b64"]["error"] and "base64" in tasks["b64"]["error"]
    assert all("error" not in tasks[f"g{i}"] for i in range(6))
    tasks = {t["id"]: t for t in ev.load_tasks(write(tmp_path / "d.jsonl", rows), allow_no_image=True)}
    assert "error" not in tasks["noimg"] and tasks["noimg"]["image"] == []


def test_a_record_without_image_never_reaches_the_rollout(tmp_path, tiny_dir):
    (tmp_path / "a.png").write_bytes(png())
    data = write(tmp_path / "d.jsonl", [{"id": "ok", "question": "q?", "answers": ["x"], "image": "a.png"},
                                        {"id": "ok2", "question": "q?", "answers": ["x"], "image": "a.png"},
                                        {"id": "noimg", "question": "q?", "answers": ["x"]}])
    out = tmp_path / "run"
    ev.main(["--model", str(tiny_dir), "--data", str(data), "--out", str(out), "--no-tools", "--max-new-tokens", "4"])
    lines = {r["id"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert "no image" in lines["noimg"]["error"] and "samples" not in lines["noimg"]
    assert len(lines["ok"]["samples"]) == 1


def test_multiple_choice_options_and_letter_scoring(tmp_path):
    (tmp_path / "a.png").write_bytes(png())
    data = write(tmp_path / "mc.jsonl", [
        {"id": "1", "question": "Which animal?", "A": "cat", "B": "dog", "C": "owl", "D": "ant", "answer": "B",
         "image": "a.png"},
        {"id": "2", "question": "Which city?", "options": ["Rome", "Oslo"], "answer": "Oslo", "image": "a.png"}])
    t1, t2 = ev.load_tasks(data)
    assert t1["question"].endswith("Options:\nA. cat\nB. dog\nC. owl\nD. ant\nAnswer with the option's letter.")
    assert t1["answers"] == ["B"] and t2["answers"] == ["B"] and t2["options"] == {"A": "Rome", "B": "Oslo"}
    for pred, right in [("B", 1.0), ("(B)", 1.0), ("B. dog", 1.0), ("dog", 1.0), ("Dog", 1.0), ("A", 0.0),
                        ("cat", 0.0), ("Because", 0.0)]:
        traj = core.Trajectory(messages=[{"role": "assistant", "content": f"<answer>{pred}</answer>"}])
        assert core.reward(traj, t1, metric="em")[1]["correct"] == right, pred
    with pytest.raises(SystemExit, match="neither an option letter"):
        ev.load_tasks(write(tmp_path / "bad.jsonl", [{"question": "q", "A": "x", "B": "y", "answer": "Z",
                                                      "image": "a.png"}]))


def test_benchmark_metrics():
    assert core.numeric_match("about 1,950 m", ["2000"]) == 1.0 and core.numeric_match("1700", ["2000"]) == 0.0
    assert core.numeric_match("It was 1885", ["1889"], ranges=[[1880, 1898]]) == 1.0
    assert core.numeric_match("Paris", ["paris"]) == 1.0   # not a number: exact match
    assert core.token_recall("the Eiffel tower in Paris", ["Eiffel Tower"]) == 1.0
    assert core.token_recall("Eiffel", ["Eiffel Tower"]) == 0.5
    traj = core.Trajectory(messages=[{"role": "assistant", "content": "<answer>1950</answer>"}])
    assert core.reward(traj, {"answers": ["2000"]}, metric="numeric")[1]["correct"] == 1.0
    assert core.reward(traj, {"answers": ["2000"]}, metric="em")[1]["correct"] == 0.0
    for pred, right in [("A", 1.0), ("(A) red", 1.0), ("B", 0.0), ("the", 0.0)]:   # V*: options in the text only
        traj = core.Trajectory(messages=[{"role": "assistant", "content": f"<answer>{pred}</answer>"}])
        assert core.reward(traj, {"answers": ["A"]}, metric="choice")[1]["correct"] == right, pred
    assert core.exact_match("the", ["A"]) == 0.0 and core.exact_match("a", ["A"]) == 1.0


def test_convert_tsv_parquet_json_and_datasets(tmp_path):
    convert = converter()
    b64 = base64.b64encode(png((1, 2, 3))).decode()
    tsv = tmp_path / "hrbench.tsv"   # HR-Bench: question, A-D, letter answer, base64 image
    tsv.write_text("index\tquestion\tA\tB\tC\tD\tanswer\tcategory\timage\n"
                   f"7\tWhat is on the sign?\tstop\tgo\tslow\tyield\tC\tsingle\t{b64}\n"
                   f"8\tBroken row\tx\ty\t\t\tA\tsingle\tnot-an-image\n")
    written, skipped = convert.main([str(tsv), "--out", str(tmp_path / "hr")])
    assert written == 1 and [s["record"] for s in skipped] == [2] and "not-an-image" in skipped[0]["error"]
    (task,) = ev.load_tasks(tmp_path / "hr" / "tasks.jsonl")
    assert task["id"] == "7" and task["answers"] == ["C"] and task["category"] == "single"
    assert task["question"].count("Options:") == 1 and core.task_images(task)[0].getpixel((0, 0)) == (1, 2, 3)

    import pyarrow as pa   # optional for users; CI installs it, so this test runs
    import pyarrow.parquet as pq
    rows = [{"data_id": "f1", "prompt": [{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": "<image>\nWhat bridge is this?"}],
             "reward_model": {"ground_truth": "Tower Bridge", "candidate_answers": ["Tower Bridge", "the Tower Bridge"]},
             "images": [{"bytes": png((9, 9, 9)), "path": None}], "data_source": "fvqa"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "fvqa.parquet")
    convert.main([str(tmp_path / "fvqa.parquet"), "--out", str(tmp_path / "fv")])
    (task,) = ev.load_tasks(tmp_path / "fv" / "tasks.jsonl")
    assert task["question"] == "What bridge is this?" and task["answers"] == ["Tower Bridge", "the Tower Bridge"]
    assert task["data_source"] == "fvqa" and core.task_images(task)[0].getpixel((0, 0)) == (9, 9, 9)

    nested = tmp_path / "live.json"   # a nested JSON object of records
    (tmp_path / "p.png").write_bytes(png())
    nested.write_text(json.dumps({"data": [{"id": "x", "img_path": "p.png",
                                            "level1_qa": {"question": "Who?", "Ground_Truth_List": ["Al"]}}]}))
    convert.main([str(nested), "--out", str(tmp_path / "lv")])
    (task,) = ev.load_tasks(tmp_path / "lv" / "tasks.jsonl")
    assert task["answers"] == ["Al"] and task["level1_qa"]["question"] == "Who?" and core.task_images(task)

    import datasets
    ds = datasets.Dataset.from_dict({"question": ["Which lake?"], "answer": ["Bled"],
                                     "image": [Image.new("RGB", (20, 10), (5, 6, 7))]})
    ds = ds.cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "hf"))
    convert.main([str(tmp_path / "hf"), "--out", str(tmp_path / "hfout")])
    (task,) = ev.load_tasks(tmp_path / "hfout" / "tasks.jsonl")
    assert task["answers"] == ["Bled"] and core.task_images(task)[0].size == (20, 10)


def test_convert_says_what_is_missing(tmp_path):
    convert = converter()
    with pytest.raises(SystemExit, match="unknown file type"):
        convert.main([str(write(tmp_path / "x.txt", [{}])), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="no record could be used"):
        convert.main([str(write(tmp_path / "x.jsonl", [{"question": "q"}])), "--out", str(tmp_path / "o")])
    (tmp_path / "bad.jsonl").write_text('{"question": "q"}\n{"question": \n')
    with pytest.raises(SystemExit, match=r"bad.jsonl:2: not valid JSON \(Expecting value"):
        convert.main([str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "o")])
    (tmp_path / "bad.json").write_text('{"data": [1,]}')
    with pytest.raises(SystemExit, match=r"bad.json: not valid JSON .*line 1 column 13"):
        convert.main([str(tmp_path / "bad.json"), "--out", str(tmp_path / "o")])
