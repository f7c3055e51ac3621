"""eval.py end to end on toy tasks, resume after a kill, broken examples, the judge, the HTML report."""
import json
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

import eval as ev
import mmsearch_r1 as core
import tools

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_dir):
    """Four tasks with images (in a subfolder, paths relative to the data file), a corpus and an
    image index: a miniature of data/toyworld."""
    d = tmp_path_factory.mktemp("world")
    (d / "img").mkdir()
    tasks, index = [], []
    for i, (name, rgb) in enumerate([("red", (220, 30, 30)), ("green", (30, 200, 60)),
                                     ("blue", (30, 60, 220)), ("gold", (230, 190, 40))]):
        Image.new("RGB", (96, 64), rgb).save(d / "img" / f"{name}.png")
        tasks.append({"id": f"q{i}", "image": f"img/{name}.png", "question": f"Which tower is painted {name}?",
                      "answers": [f"{name} tower"]})
        index.append({"image": f"img/{name}.png", "title": f"{name} tower", "url": f"http://local/{name}",
                      "snippet": f"The {name} tower."})
    (d / "tasks.jsonl").write_text("\n".join(json.dumps(t) for t in tasks) + "\n")
    (d / "images.jsonl").write_text("\n".join(json.dumps(t) for t in index) + "\n")
    (d / "corpus.jsonl").write_text("\n".join(json.dumps({"id": str(i), "title": t["title"], "url": t["url"],
                                                          "text": t["snippet"] + " It stands in Paris."})
                                              for i, t in enumerate(index)) + "\n")
    return d


def args(world, tiny_dir, out, *extra):
    return ["--model", str(tiny_dir), "--data", str(world / "tasks.jsonl"), "--backend", "local",
            "--corpus", str(world / "corpus.jsonl"), "--image-index", str(world / "images.jsonl"),
            "--out", str(out), "--cache", str(out / "cache.sqlite"), "--max-new-tokens", "6",
            "--max-turns", "2", "--batch", "2", *extra]


def test_end_to_end(world, tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    summary = ev.main(args(world, tiny_dir, out, "--n", "2", "--temperature", "1.0", "--html", str(out / "report.html")))
    printed = capsys.readouterr().out
    assert "| accuracy (avg@n) |" in printed and "| finish reasons |" in printed
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["id"] for r in lines] == ["q0", "q1", "q2", "q3"]
    samples = [s for r in lines for s in r["samples"]]
    assert len(samples) == 8
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["samples"] == 8 and summary["examples"] == 4
    assert summary["generated tokens"] == pytest.approx(sum(s["generated_tokens"] for s in samples) / 8)
    assert summary["accuracy (avg@n)"] == pytest.approx(sum(s["correct"] for s in samples) / 8)
    assert sum(summary["finish reasons"].values()) == 8
    assert summary["turns"] == pytest.approx(sum(s["turns"] for s in samples) / 8)
    for s in samples:
        traj = s["trajectory"]
        assert traj["messages"][0]["role"] == "system" and all(Path(p).exists() for p in traj["images"])
    page = (out / "report.html").read_text()
    for r in lines:
        assert f"{r['id']} sample 0" in page and f"{r['id']} sample 1" in page
    # settings on top, filters over collapsible cards, one per sample
    assert "Run settings" in page and '<div id="filters">' in page and page.count("<details class=\"card") == 8
    assert 'name="verdict"' in page and 'name="finish"' in page and 'name="tool"' in page
    assert page.count('<img src="data:image/png;base64,') == sum(len(s["trajectory"]["images"]) for s in samples)


def test_no_tools_baseline_and_other_key_names(world, tiny_dir, tmp_path):
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"qid": 7, "query": "Which tower?", "gold": "red tower",
                                 "image_path": str(world / "img" / "red.png")}) + "\n")
    tasks = ev.load_tasks(other)
    assert tasks[0]["id"] == "7" and tasks[0]["answers"] == ["red tower"] and tasks[0]["question"] == "Which tower?"
    out = tmp_path / "direct"
    a = args(world, tiny_dir, out, "--no-tools")
    a[a.index("--data") + 1] = str(other)
    summary = ev.main(a)
    assert summary["examples"] == 1 and summary["turns"] == 1.0
    line = json.loads((out / "results.jsonl").read_text())
    assert "No tools are available" in line["samples"][0]["trajectory"]["messages"][0]["content"]


def test_missing_image_is_an_error_line_and_the_run_goes_on(world, tiny_dir, tmp_path, capsys):
    data = tmp_path / "tasks.jsonl"
    rows = [json.loads(line) for line in (world / "tasks.jsonl").read_text().splitlines()][:2]
    rows.insert(1, {"id": "broken", "image": "img/nope.png", "question": "?", "answers": ["x"]})
    for r in rows:
        r["image"] = str(world / r["image"])
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    a = args(world, tiny_dir, tmp_path / "out")
    a[a.index("--data") + 1] = str(data)
    summary = ev.main(a)
    lines = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in lines) == ["broken", "q0", "q1"]
    broken = next(r for r in lines if r["id"] == "broken")
    assert "cannot read image" in broken["error"] and "nope.png" in broken["error"]
    assert summary["errors"] == 1 and summary["samples"] == 2
    said = capsys.readouterr().out   # and the terminal names it, not only the table's count
    assert "1 of 3 examples could not be run" in said and "'broken'" in said and "nope.png" in said


def test_resume_after_kill(world, tiny_dir, tmp_path):
    """Kill eval.py mid-run (after its first line), restart with --resume: no lost or doubled ids."""
    out = tmp_path / "killed"
    many = tmp_path / "many.jsonl"
    base = [json.loads(line) for line in (world / "tasks.jsonl").read_text().splitlines()]
    rows = [dict(base[i % 4], id=f"k{i}", image=str(world / base[i % 4]["image"])) for i in range(12)]
    many.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    a = args(world, tiny_dir, out, "--batch", "1", "--max-new-tokens", "24")
    a[a.index("--data") + 1] = str(many)
    proc = subprocess.Popen([sys.executable, str(ROOT / "eval.py"), *a], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = out / "results.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not results.exists() or results.read_text().count("\n") < 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with open(results, "a") as f:   # and a line cut short, as a kill during a write leaves it
        f.write('{"id": "k11", "samples": [{"answ')
    first = [json.loads(line)["id"] for line in results.read_text().splitlines()[:-1]]
    assert 2 <= len(first) < 12
    ev.main(a + ["--resume"])
    ids = [json.loads(line)["id"] for line in results.read_text().splitlines()]
    assert sorted(ids) == sorted(r["id"] for r in rows) and len(ids) == len(set(ids))
    assert ids[:len(first)] == first


def test_refuses_to_overwrite_without_resume(world, tiny_dir, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "results.jsonl").write_text("")
    with pytest.raises(SystemExit, match="--resume"):
        ev.main(args(world, tiny_dir, out))


# ---------------------------------------------------------------------------------------------- judge

class FakeJudge:
    """A loopback OpenAI-compatible /v1/chat/completions: replies from a queue of (status, content)."""

    def __init__(self):
        self.replies, self.requests = [], []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append((self.path, body, self.headers.get("Authorization")))
                status, content = outer.replies.pop(0) if len(outer.replies) > 1 else outer.replies[0]
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}
                                  if status == 200 else {"error": "x"}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def fake_judge():
    j = FakeJudge()
    yield j
    j.httpd.shutdown()


def test_judge_verdicts_retries_and_unscorable(fake_judge, tmp_path):
    ep = core.JudgeEndpoint(fake_judge.url, "judge-model", "KEY", timeout=2, retries=2)
    fake_judge.replies = [(200, "The prediction names the same tower.\nCORRECT")]
    assert core.judge("Which tower?", "Eiffel tower", ["Tour Eiffel"], ep) == 1.0
    path, body, auth = fake_judge.requests[-1]
    assert path == "/v1/chat/completions" and body["model"] == "judge-model" and auth == "Bearer KEY"
    assert "Tour Eiffel" in body["messages"][0]["content"] and body["temperature"] == 0.0
    fake_judge.replies = [(200, "**INCORRECT**")]
    assert core.judge("q", "Big Ben", ["Eiffel Tower"], ep) == 0.0
    fake_judge.replies = [(500, ""), (200, "CORRECT")]
    fake_judge.requests.clear()
    assert core.judge("q", "x", ["x"], ep) == 1.0 and len(fake_judge.requests) == 2
    for garbage in ["I think it might be correct", "CORRECT or INCORRECT", "", "correct-ish"]:
        fake_judge.replies = [(200, garbage)]
        assert core.judge("q", "y", ["x"], ep) is None, garbage
    fake_judge.replies = [(500, "")]
    fake_judge.requests.clear()
    assert core.judge("q", "z", ["x"], ep) is None and len(fake_judge.requests) == 3   # bounded retries
    # cached: a second identical question does not reach the server
    cache = tools.Cache(tmp_path / "c.sqlite")
    fake_judge.replies = [(200, "CORRECT")]
    assert core.judge("q2", "a", ["a"], ep, cache) == 1.0
    n = len(fake_judge.requests)
    assert core.judge("q2", "a", ["a"], ep, cache) == 1.0 and len(fake_judge.requests) == n
    with pytest.raises(ValueError, match="judge-url"):
        core.JudgeEndpoint("", "")


def test_parse_verdict():
    assert core.parse_verdict("CORRECT") == 1.0 and core.parse_verdict("Verdict: incorrect.") == 0.0
    assert core.parse_verdict("reasoning\n\n**Correct**\n") == 1.0
    assert core.parse_verdict("CORRECT\nbut wait") is None and core.parse_verdict("") is None


def test_unscorable_reward_is_none_not_zero(fake_judge):
    traj = core.Trajectory(messages=[{"role": "assistant", "content": "<think>x</think><answer>Paris</answer>"}])
    fake_judge.replies = [(200, "no idea")]
    ep = core.JudgeEndpoint(fake_judge.url, "m", retries=0)
    value, parts = core.reward(traj, {"question": "q", "answers": ["Paris"]}, metric="judge", endpoint=ep)
    assert value is None and parts["correct"] is None and parts["answer"] == "Paris"


# ---------------------------------------------------------------------------------------------- hostile files and careless flags

def test_corrupt_middle_line_keeps_every_valid_line(world, tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    ev.main(args(world, tiny_dir, out))
    lines = (out / "results.jsonl").read_text().splitlines()
    first_q0 = json.loads(lines[0])
    lines[1] = lines[1][:40] + "#garbage"                          # q1 corrupted in the middle
    (out / "results.jsonl").write_text("\n".join(lines) + "\n")
    ev.main(args(world, tiny_dir, out, "--resume"))
    assert "dropped 1 unreadable line(s) (2)" in capsys.readouterr().out
    again = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in again) == ["q0", "q1", "q2", "q3"] and again[0] == first_q0


def test_resume_with_other_settings_refuses(world, tiny_dir, tmp_path):
    out = tmp_path / "run"
    ev.main(args(world, tiny_dir, out, "--limit", "2"))
    with pytest.raises(SystemExit, match=r"--max-turns was 2, now 3.*--force"):
        ev.main(args(world, tiny_dir, out, "--limit", "2", "--resume", "--max-turns", "3"))
    ev.main(args(world, tiny_dir, out, "--limit", "2", "--resume", "--max-turns", "3", "--force"))
    assert json.loads((out / "summary.json").read_text())["settings"]["max_turns"] == 3


def huge_png(path, width=20000, height=20000):
    """A PNG whose header claims width x height (a decompression bomb), without the memory."""
    import struct
    import zlib
    Image.new("RGB", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = data[12:29]                                           # b"IHDR" + 13 bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    path.write_bytes(bytes(data))


def test_bad_data_lines_and_bombs_become_error_lines(world, tiny_dir, tmp_path):
    huge_png(tmp_path / "bomb.png")
    good = json.loads((world / "tasks.jsonl").read_text().splitlines()[0])
    good["image"] = str(world / good["image"])
    rows = [json.dumps(good), "[1, 2]", "{not json", json.dumps({"id": "q", "question": ["a", "list"]}),
            json.dumps(good), json.dumps({"id": "bomb", "question": "Q?", "answers": "x",
                                          "image": str(tmp_path / "bomb.png")})]
    rows += [json.dumps(dict(good, id=f"more{i}")) for i in range(3)]   # most records are fine
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    ev.main(args(world, tiny_dir, out) + ["--data", str(data)])
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    errors = {r["id"]: r["error"] for r in lines if "error" in r}
    assert len(lines) == 9 and len(errors) == 5
    # when most records fail, the run stops before loading the model, and says why
    data.write_text("\n".join(rows[:6]) + "\n")
    with pytest.raises(SystemExit, match="4 of 6 records .* cannot be used .*not valid JSON: 1"):
        ev.main(args(world, tiny_dir, tmp_path / "run2") + ["--data", str(data)])
    text = " | ".join(errors.values())
    for piece in ("line 2: a record must be a JSON object", "line 3: not valid JSON", "line 4: the question is a list",
                  "line 5: repeats the id 'q0'", "cannot read image", "bomb.png"):
        assert piece in text, piece


@pytest.mark.parametrize("extra, message", [
    (["--model", "/no/such/model"], "no such folder"),
    (["--metric", "judge"], "--metric judge: judge endpoint: set --judge-url"),
    (["--dtype", "banana"], "--dtype 'banana'"),
    (["--device", "cuda"], "no CUDA device"),
    (["--n", "4"], "--n 4 at temperature 0"),
    (["--temperature", "-1"], "eval: sampling: temperature -1.0: 0 is greedy"),
    (["--top-p", "0"], "top_p 0.0: the nucleus mass lies in (0, 1]"),
    (["--top-k", "-2", "--top-p", "2"], "top_p 2.0: the nucleus mass lies in (0, 1]; top_k -2: 0 is off"),
    (["--corpus", "/no/such/corpus.jsonl"], "--corpus /no/such/corpus.jsonl: no such file"),
    (["--backend", "serper"], "--backend serper: serper search is not configured: set SERPER_API_KEY"),
])
def test_bad_flags_say_what_to_do(world, tiny_dir, tmp_path, extra, message, monkeypatch):
    monkeypatch.delenv("JUDGE_BASE_URL", raising=False)
    monkeypatch.delenv("JUDGE_MODEL", raising=False)
    monkeypatch.delenv("SERPER_API_KEY", raising=False)
    with pytest.raises(SystemExit, match=re.escape(message)):
        ev.main(args(world, tiny_dir, tmp_path / "run") + extra)


def test_tool_and_sampling_flags_are_checked_before_the_model_loads(world, tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(core, "load_policy", lambda *a, **k: pytest.fail("the model was loaded first"))
    monkeypatch.delenv("SERPAPI_API_KEY", raising=False)
    broken = tmp_path / "corpus.jsonl"
    broken.write_text('{"id": "1", "title": "t", "url": "u", "text": "x"}\n{not json\n')
    for extra, message in [(["--corpus", "/no/such.jsonl"], "--corpus /no/such.jsonl: no such file"),
                           (["--corpus", str(broken)], "corpus.jsonl:2: not valid JSON"),   # read while indexing
                           (["--backend", "serpapi"], "set SERPAPI_API_KEY"),
                           (["--temperature", "-1"], "temperature -1.0")]:
        with pytest.raises(SystemExit, match=re.escape(message)):
            ev.main(args(world, tiny_dir, tmp_path / "run") + extra)


def test_out_and_html_paths_are_checked_first(world, tiny_dir, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match="is a file"):
        ev.main(args(world, tiny_dir, tmp_path / "file"))
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o500)
    try:
        if not __import__("os").access(tmp_path / "ro", __import__("os").W_OK):   # root can write anyway
            with pytest.raises(SystemExit, match="cannot write"):
                ev.main(args(world, tiny_dir, tmp_path / "run") + ["--html", str(tmp_path / "ro" / "r.html")])
    finally:
        (tmp_path / "ro").chmod(0o700)
    with pytest.raises(SystemExit, match="is a folder"):
        ev.main(args(world, tiny_dir, tmp_path / "run") + ["--html", str(tmp_path)])
