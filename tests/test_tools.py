"""tools.py: parsing, crop, local and HTTP search (against a loopback server), visit, cache, Toolbox."""
import argparse
import json
import math
import os
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest
from PIL import Image

import tools
from tools import (Cache, CropSettings, HttpSettings, ImageHost, LocalImageSearch, LocalTextSearch,
                   SearxngSearch, SerpAPISearch, SerperSearch, Toolbox, ToolError, WebPages, crop,
                   parse_tool_calls, visit)

FAST = HttpSettings(timeout=0.5, retries=2, backoff=0.01)


# ---------------------------------------------------------------------------------------------- parsing

GOOD = '<tool_call>{"name": "text_search", "arguments": {"query": "eiffel tower"}}</tool_call>'


@pytest.mark.parametrize("text, n_calls, error", [
    (GOOD, 1, None),
    ("<tool_call>\n```json\n" + '{"name": "crop", "arguments": {"bbox": [1, 2, 3, 4]}}' + "\n```\n</tool_call>", 1, None),
    (GOOD + " and " + GOOD, 2, None),
    ('<tool_call>{"name": "text_search", "arguments": {"query": "x"}</tool_call>', 0, "not valid JSON"),
    ('<tool_call>{"name": "fly", "arguments": {}}</tool_call>', 0, "unknown tool 'fly'"),
    ('<tool_call>{"name": "text_search", "arguments": {}}</tool_call>', 0, "needs the argument 'query'"),
    ('<tool_call>{"name": "text_search", "arguments": {"query": 3}}</tool_call>', 0, "must be a non-empty string"),
    ('<tool_call>{"name": "crop", "arguments": {"bbox": [1, 2, 3]}}</tool_call>', 0, "list of 4 numbers"),
    ('<tool_call>{"name": "crop", "arguments": {"image": "0", "bbox": [1, 2, 3, 4]}}</tool_call>', 0, "must be an integer"),
    ('<tool_call>{"name": "crop", "arguments": {"image": true, "bbox": [1, 2, 3, 4]}}</tool_call>', 0, "must be an integer"),
    ('<tool_call>{"name": "visit", "arguments": {"url": "http://a.b"}}</tool_call>', 0, "needs the argument 'goal'"),
    ('<tool_call>{"name": "text_search", "arguments": {"query": "a", "page": 2}}</tool_call>', 0, "takes no argument"),
    ('<tool_call>{"name": "text_search", "arguments": {"query": "a"}}', 0, "not closed"),
    ('<tool_call>["text_search"]</tool_call>', 0, "JSON object"),
    ('<tool_call>{"name": "text_search", "arguments": "[1]"}</tool_call>', 0, "must be a JSON object"),
    ('</tool_call>', 0, "without an opening"),
    ('<tool_call>' + GOOD, 1, "not closed"),
    ("", 0, None),
    ("<answer>Paris</answer>", 0, None),
])
def test_parse_tool_calls_table(text, n_calls, error):
    calls, errors = parse_tool_calls(text)
    assert len(calls) == n_calls
    if error is None:
        assert errors == []
    else:
        assert any(error in e for e in errors), errors
        assert all("Correct form: <tool_call>\n{" in e for e in errors if e.startswith("tool call"))


def test_parse_tool_calls_defaults_and_double_encoded_arguments():
    calls, errors = parse_tool_calls('<tool_call>{"name": "image_search", "arguments": "{}"}</tool_call>')
    assert errors == [] and calls == [{"name": "image_search", "arguments": {"image": 0}}]


@pytest.mark.parametrize("text", ["<tool_call>" * 50, "<tool_call>{" + "[" * 5000 + "</tool_call>",
                                  "\x00\ud800<tool_call>\n</tool_call>", "<tool_call>null</tool_call>"])
def test_parse_tool_calls_never_raises(text):
    calls, errors = parse_tool_calls(text)
    assert calls == [] and errors


# ---------------------------------------------------------------------------------------------- crop

def grid_image(w=200, h=100):
    img = Image.new("RGB", (w, h), "white")
    img.paste((255, 0, 0), (0, 0, w // 2, h // 2))   # red top-left quarter
    return img


NO_RESIZE = CropSettings(upscale_to=1, max_pixels=10**9)


@pytest.mark.parametrize("convention, bbox, shown", [
    ("abs", [0, 0, 100, 50], None), ("abs", [0, 0, 50, 25], (100, 50)),
    ("rel1000", [0, 0, 500, 500], None), ("rel", [0, 0, 0.5, 0.5], None),
    ("rel", [0.5, 0.5, 0, 0], None),                           # inverted corners are reordered
    ("abs", [-50, -10, 100, 50], None),                        # clamped to the image
])
def test_crop_conventions(convention, bbox, shown):
    out = crop(grid_image(), bbox, convention, shown, NO_RESIZE)
    assert out.size == (100, 50)
    assert out.getpixel((10, 10)) == (255, 0, 0) and out.getpixel((99, 49)) == (255, 0, 0)


@pytest.mark.parametrize("bbox, message", [
    ([1, 2, 3], "bbox must be"), ("0,0,1,1", "bbox must be"), ([0, 0, "a", 5], "finite numbers"),
    ([0, 0, math.nan, 5], "finite numbers"), ([0, 0, math.inf, 5], "finite numbers"),
    ([True, 0, 5, 5], "finite numbers"), ([300, 300, 400, 400], "empty after clamping"),
    ([10, 10, 10, 50], "empty"), ([10, 10, 12, 50], "too small"), ([0, 0, 199, 5], "too thin"),
])
def test_crop_bad_boxes(bbox, message):
    with pytest.raises(ToolError, match=message):
        crop(grid_image(), bbox, "abs", None, CropSettings(min_side=4, max_aspect=20))


def test_crop_upscales_small_and_caps_pixels():
    small = crop(grid_image(), [0, 0, 20, 10], "abs", None, CropSettings(upscale_to=56))
    assert min(small.size) == 56 and small.size == (112, 56)
    big = crop(grid_image(2000, 1000), [0, 0, 2000, 1000], "abs", None, CropSettings(max_pixels=200 * 100))
    assert big.size[0] * big.size[1] <= 200 * 100 + 300 and big.size[0] / big.size[1] == pytest.approx(2, rel=0.02)


# ---------------------------------------------------------------------------------------------- local search

def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


CORPUS = [{"id": "1", "title": "Eiffel Tower", "url": "http://local/eiffel", "text": "The Eiffel Tower is a lattice tower in Paris, built 1889."},
          {"id": "2", "title": "Big Ben", "url": "http://local/bigben", "text": "Big Ben is the bell of the clock tower in London."},
          {"id": "3", "title": "Kölner Dom", "url": "http://local/koeln", "text": "Der Kölner Dom ist eine Kathedrale in Köln."}]


def test_fts5_search_and_hostile_queries(tmp_path):
    search = LocalTextSearch(write_jsonl(tmp_path / "corpus.jsonl", CORPUS))
    assert search.search("eiffel tower paris", 2)[0]["title"] == "Eiffel Tower"
    assert search.search("Köln", 3)[0]["title"] == "Kölner Dom"
    for q in ['"', "'", 'tower"', "AND OR NOT", "NEAR(tower london)", "tower*", "title:london", "(", ")",
              "^tower", "-", "", "   ", "💥", "a\x00b", "DROP TABLE docs;--", "{tower}", "tower + london"]:
        hits = search.search(q, 3)
        assert isinstance(hits, list)
    assert search.search("title:london", 1)[0]["title"] == "Big Ben"   # operators are plain words
    assert (tmp_path / "corpus.jsonl.fts.sqlite").exists()
    again = LocalTextSearch(tmp_path / "corpus.jsonl")                 # index reused, not rebuilt
    assert again.search("bell", 1)[0]["url"] == "http://local/bigben"
    assert again.fetch("http://local/bigben")[0] == "Big Ben"
    with pytest.raises(ToolError, match="no page"):
        again.fetch("http://local/nope")


def test_local_image_search_finds_crops(tmp_path):
    colours = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (30, 60, 220), "stripes": None}
    rows = []
    for name, rgb in colours.items():
        img = Image.new("RGB", (64, 64), rgb or "white")
        if rgb is None:
            for y in range(0, 64, 8):
                img.paste((0, 0, 0), (0, y, 64, y + 4))
        img.save(tmp_path / f"{name}.png")
        rows.append({"image": f"{name}.png", "title": name, "url": f"http://local/{name}", "snippet": name})
    search = LocalImageSearch(write_jsonl(tmp_path / "images.jsonl", rows))
    scene = Image.new("RGB", (128, 64), "gray")
    scene.paste(Image.open(tmp_path / "green.png"), (0, 0))
    scene.paste(Image.open(tmp_path / "stripes.png"), (64, 0))
    assert search.search(crop(scene, [0, 0, 64, 64], "abs"), 1)[0]["title"] == "green"
    assert search.search(crop(scene, [64, 0, 128, 64], "abs"), 1)[0]["title"] == "stripes"
    assert (tmp_path / "images.jsonl.vectors.npz").exists()
    assert LocalImageSearch(tmp_path / "images.jsonl").search(Image.open(tmp_path / "blue.png"), 1)[0]["title"] == "blue"
    # the same pictures under other urls: the descriptors given, not computed (nor read from a cache)
    renamed = write_jsonl(tmp_path / "renamed.jsonl", [dict(r, url=r["url"] + "/2") for r in rows])
    given = LocalImageSearch(renamed, vectors=search.vectors)
    assert given.search(Image.open(tmp_path / "red.png"), 1)[0]["url"] == "http://local/red/2"
    assert np.array_equal(LocalImageSearch(renamed).vectors, search.vectors)   # read back from its cache
    # an index replaced by another, even one with an older file time (cp -p, rsync): computed again
    index = tmp_path / "images.jsonl"
    old_time = index.stat().st_mtime_ns - 10**9
    write_jsonl(index, rows[::-1])
    os.utime(index, ns=(old_time, old_time))
    assert LocalImageSearch(index).search(Image.open(tmp_path / "red.png"), 1)[0]["title"] == "red"
    (tmp_path / "images.jsonl.vectors.npz").write_bytes(b"half a file")   # an unreadable cache: computed again
    assert LocalImageSearch(index).search(Image.open(tmp_path / "green.png"), 1)[0]["title"] == "green"
    with pytest.raises(ValueError, match="3 vectors for 4 entries"):
        LocalImageSearch(renamed, vectors=search.vectors[:3])


def test_local_image_search_with_an_embedding_model(tmp_path):
    """embed_model: a transformers image model (here a tiny random CLIP saved locally)."""
    from transformers import CLIPConfig, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    cfg = CLIPConfig(text_config=dict(small, vocab_size=64, bos_token_id=0, eos_token_id=1, pad_token_id=1),
                     vision_config=dict(small, image_size=32, patch_size=8), projection_dim=8)
    CLIPModel(cfg).save_pretrained(tmp_path / "clip")
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path / "clip")
    rows = []
    for name, rgb in {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (30, 60, 220)}.items():
        Image.new("RGB", (40, 40), rgb).save(tmp_path / f"{name}.png")
        rows.append({"image": f"{name}.png", "title": name, "url": f"http://local/{name}"})
    search = LocalImageSearch(write_jsonl(tmp_path / "images.jsonl", rows), embed_model=str(tmp_path / "clip"))
    assert search.search(Image.open(tmp_path / "green.png"), 1)[0]["title"] == "green"
    assert (tmp_path / "images.jsonl.vectors.npz").exists() and search.name.startswith("local:")
    # the numpy descriptor on the same index: its own vectors, not the CLIP ones in the cache
    plain = LocalImageSearch(tmp_path / "images.jsonl")
    assert plain.vectors.shape[1] != search.vectors.shape[1] and plain.name != search.name


# ---------------------------------------------------------------------------------------------- HTTP backends

class Server:
    """A loopback HTTP server. `plan[path]` is a list of (status, body, content_type, delay)
    consumed one per request (the last one repeats); every request is recorded."""

    def __init__(self):
        self.plan, self.requests = {}, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _serve(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                path = urlparse(self.path).path
                outer.requests.append({"path": path, "query": parse_qs(urlparse(self.path).query),
                                       "body": body, "headers": dict(self.headers)})
                steps = outer.plan.get(path, [(404, "not found", "text/plain", 0)])
                status, payload, ctype, delay, *extra = steps.pop(0) if len(steps) > 1 else steps[0]
                time.sleep(delay)
                data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in (extra[0] if extra else {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            do_GET = do_POST = _serve

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def ok(self, path, payload):
        self.plan[path] = [(200, payload, "application/json", 0)]


@pytest.fixture
def server():
    s = Server()
    yield s
    s.httpd.shutdown()


ORGANIC = [{"title": "Eiffel Tower - Wikipedia", "link": "https://en.wikipedia.org/wiki/Eiffel_Tower", "snippet": "Wrought-iron tower"}]


def test_provider_response_shapes(server, tmp_path):
    server.ok("/search", {"organic": ORGANIC})
    server.ok("/lens", {"organic": [{"title": "Tower", "link": "https://x.org/t", "source": "x.org"}]})
    host = ImageHost(str(tmp_path / "served"), "https://img.example.org/q")
    serper = SerperSearch(server.url, api_key="SECRET", image_host=host, http=FAST)
    assert serper.search("eiffel", 3) == [{"title": ORGANIC[0]["title"], "url": ORGANIC[0]["link"], "snippet": "Wrought-iron tower"}]
    assert serper.search(grid_image(), 3)[0] == {"title": "Tower", "url": "https://x.org/t", "snippet": "x.org"}
    assert json.loads(server.requests[0]["body"]) == {"q": "eiffel", "num": 3}
    assert server.requests[0]["headers"]["X-API-KEY"] == "SECRET"
    lens_url = json.loads(server.requests[1]["body"])["url"]
    assert lens_url.startswith("https://img.example.org/q/") and (tmp_path / "served" / lens_url.split("/")[-1]).exists()

    server.plan["/search.json"] = [(200, {"organic_results": ORGANIC}, "application/json", 0),
                                   (200, {"visual_matches": [{"title": "V", "link": "https://v.org", "source": "v.org"}]}, "application/json", 0)]
    serpapi = SerpAPISearch(server.url, api_key="K2", image_host=host, http=FAST)
    assert serpapi.search("eiffel", 2)[0]["url"] == ORGANIC[0]["link"]
    assert serpapi.search(grid_image(), 2)[0]["title"] == "V"
    assert server.requests[2]["query"]["engine"] == ["google"] and server.requests[3]["query"]["engine"] == ["google_lens"]

    server.ok("/search", {"results": [{"title": "S", "url": "https://s.org", "content": "searx snippet"}]})
    searx = SearxngSearch(server.url, http=FAST)
    assert searx.search("x", 2) == [{"title": "S", "url": "https://s.org", "snippet": "searx snippet"}]
    assert server.requests[-1]["query"]["format"] == ["json"]
    with pytest.raises(ToolError, match="no reverse image search"):
        searx.search(grid_image(), 2)


def test_http_failures_become_errors_with_bounded_retries(server):
    serper = SerperSearch(server.url, api_key="SECRET", http=FAST)
    cases = {
        "500": ([(500, "oops", "text/plain", 0)], r"HTTP 500 \(gave up after 3 tries\)", 3),
        "429 then ok": ([(429, "slow down", "text/plain", 0), (200, {"organic": ORGANIC}, "application/json", 0)], None, 2),
        "slow": ([(200, {"organic": ORGANIC}, "application/json", 1.0)], "did not answer within 0.5s", 3),
        "bad json": ([(200, "{not json", "application/json", 0)], "invalid JSON", 1),
        "html": ([(200, "<html><body>captcha</body></html>", "text/html", 0)], "HTML page", 1),
        "401": ([(401, "no", "text/plain", 0)], "check the API key", 1),
    }
    for name, (plan, error, tries) in cases.items():
        server.requests.clear()
        server.plan["/search"] = list(plan)
        if error is None:
            assert serper.search("q", 1)[0]["title"] == ORGANIC[0]["title"]
        else:
            with pytest.raises(ToolError, match=error) as e:
                serper.search("q", 1)
            assert "SECRET" not in str(e.value)
        assert len(server.requests) == tries, name
    server.ok("/search", {"organic": []})
    assert serper.search("q", 1) == []
    server.ok("/search", {"organic": "weird"})
    with pytest.raises(ToolError, match="unexpected response"):
        serper.search("q", 1)


def test_missing_keys_and_image_host(monkeypatch):
    monkeypatch.delenv("SERPER_API_KEY", raising=False)
    monkeypatch.delenv("SEARXNG_URL", raising=False)
    with pytest.raises(ToolError, match="set SERPER_API_KEY"):
        SerperSearch().search("q")
    with pytest.raises(ToolError, match="set SEARXNG_URL"):
        SearxngSearch().search("q")
    with pytest.raises(ToolError, match="configure image_host"):
        SerpAPISearch(api_key="k").search(grid_image())


def test_toolbox_turns_http_failures_into_observations(server):
    server.plan["/search"] = [(500, "x", "text/plain", 0)]
    box = Toolbox(text_search=SerperSearch(server.url, api_key="SECRET", http=FAST))
    obs = box.run([{"name": "text_search", "arguments": {"query": "q"}}], [grid_image()])
    assert obs.errors == 1 and "HTTP 500" in obs.responses[0][0]["text"] and "SECRET" not in obs.responses[0][0]["text"]
    assert box.stats["text_search"] == {"calls": 1, "errors": 1}


# ---------------------------------------------------------------------------------------------- visit

PAGE = """<html><head><title>Eiffel Tower</title><style>p {color: red}</style></head><body>
<nav>Home | About | Contact</nav><script>var tracking = 1;</script>
<p>The tower is 330 metres tall and was the tallest man-made structure for 41 years.</p>
<p>Gustave Eiffel's company designed and built the tower for the 1889 World's Fair.</p>
<div>Tickets can be bought online. Opening hours vary by season.</div>
<footer>Copyright 2026</footer></body></html>"""


def test_visit_extracts_relevant_passage(server):
    server.plan["/page"] = [(200, PAGE, "text/html; charset=utf-8", 0)]
    text = visit(server.url + "/page", "who designed the tower", allow_private=True, max_chars=120)
    assert text.startswith("Title: Eiffel Tower")
    assert "Gustave Eiffel" in text and "Tickets" not in text
    for junk in ("tracking", "Home | About", "Copyright", "color: red"):
        assert junk not in visit(server.url + "/page", "tower", allow_private=True)
    server.plan["/pdf"] = [(200, "%PDF", "application/pdf", 0)]
    with pytest.raises(ToolError, match="not a web page"):
        visit(server.url + "/pdf", "x", allow_private=True)


def test_visit_refuses_file_and_private_addresses(server):
    server.plan["/page"] = [(200, PAGE, "text/html", 0)]
    for url in ["file:///etc/passwd", "ftp://example.org/x", "javascript:alert(1)", "not a url"]:
        with pytest.raises(ToolError, match="only opens http"):
            visit(url, "x")
    for url in [server.url + "/page", "http://10.0.0.1/", "http://169.254.169.254/latest/meta-data", "http://[::1]/"]:
        with pytest.raises(ToolError, match="not a public address"):
            visit(url, "x")


def test_visit_rechecks_redirects(server, monkeypatch):
    """Every redirect target is checked again: a public page may not bounce the agent inward."""
    server.plan["/start"] = [(302, "", "text/html", 0, {"Location": "/target"})]
    server.plan["/target"] = [(200, PAGE, "text/html", 0)]
    checked, real = [], tools.check_public_url

    def check(url, allow_private=False):   # treat /start as public and /target as private
        checked.append(url)
        if url.endswith("/target"):
            raise ToolError("visit refuses 127.0.0.1: not a public address")
        return real(url, allow_private=True)
    monkeypatch.setattr(tools, "check_public_url", check)
    with pytest.raises(ToolError, match="not a public address"):
        WebPages().fetch(server.url + "/start")
    assert checked == [server.url + "/start", server.url + "/target"]
    monkeypatch.undo()
    assert WebPages(allow_private=True).fetch(server.url + "/start")[0] == "Eiffel Tower"


# ---------------------------------------------------------------------------------------------- hostile URLs and servers

def test_ssrf_disguises_are_refused_before_any_connection(server):
    server.plan["/"] = [(200, PAGE, "text/html", 0)]
    port = server.httpd.server_port
    disguises = [f"http://127.0.0.1:{port}\\@example.com/", f"http://example.com\\@127.0.0.1:{port}/",
                 f"http://user@127.0.0.1:{port}/", f"http://example.com@127.0.0.1:{port}/",
                 f"http://127.0.0.1:{port}/\x00", f"http://127.0.0.1:{port} /", f"http://[::1]:{port}/",
                 "http://169.254.169.254/latest/meta-data", "http://0x7f.0.0.1/", "http://2130706433/",
                 f"http://localhost:{port}/", "http://[::ffff:127.0.0.1]/", f"http://127.0.0.1:{port}:80/"]
    for url in disguises:
        with pytest.raises(ToolError):
            WebPages(timeout=2).fetch(url)
    assert server.requests == []      # none of them reached the loopback server


def test_dns_is_resolved_once_and_the_connection_pinned(server, monkeypatch):
    """DNS rebinding: a second lookup of the name would answer another address; the connection goes
    to the address that was checked, with the name as Host header, and the name is looked up once."""
    server.plan["/p"] = [(200, PAGE, "text/html", 0)]
    real, lookups = socket.getaddrinfo, []

    def rebinding(host, port, *a, **kw):
        if host == "rebind.example":
            lookups.append(host)
            ip = "127.0.0.1" if len(lookups) == 1 else "10.255.255.1"
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))]
        return real(host, port, *a, **kw)
    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    port = server.httpd.server_port
    title, _ = WebPages(timeout=3, allow_private=True).fetch(f"http://rebind.example:{port}/p")
    assert title == "Eiffel Tower" and lookups == ["rebind.example"]
    assert server.requests[-1]["headers"]["Host"] == f"rebind.example:{port}"


def test_idna_hosts_are_encoded_once():
    with pytest.raises(ToolError, match="not a public address|cannot resolve"):
        tools.check_public_url("http://bücher.localhost/")


def test_api_keys_never_follow_redirects(server):
    other = Server()
    try:
        other.ok("/search", {"organic": ORGANIC})
        server.plan["/search"] = [(307, "", "text/plain", 0, {"Location": other.url + "/search"})]
        with pytest.raises(ToolError, match="redirect"):
            SerperSearch(server.url, api_key="SECRET", http=FAST).search("q", 3)
        assert other.requests == []
    finally:
        other.httpd.shutdown()


def test_api_bodies_are_capped(server):
    server.ok("/search", {"organic": ORGANIC * 2000})
    with pytest.raises(ToolError, match="more than 1000 bytes"):
        SerperSearch(server.url, api_key="K", http=HttpSettings(timeout=2, retries=0, max_bytes=1000)).search("q", 3)


def test_visit_has_a_deadline_on_the_whole_response():
    """A server that drips one byte every 0.2 s: visit gives up at its deadline, not after the whole page."""
    import socketserver

    class Drip(socketserver.BaseRequestHandler):
        def handle(self):
            self.request.recv(4096)
            self.request.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 100\r\n\r\n")
            try:
                for _ in range(100):
                    self.request.sendall(b"x")
                    time.sleep(0.2)
            except OSError:
                pass
    srv = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Drip)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        t0 = time.monotonic()
        with pytest.raises(ToolError, match="within 1s"):
            WebPages(timeout=1, allow_private=True).fetch(f"http://127.0.0.1:{srv.server_address[1]}/")
        assert time.monotonic() - t0 < 3.5
    finally:
        srv.shutdown()


def test_private_pages_do_not_share_cache_keys():
    assert WebPages().name != WebPages(allow_private=True).name
    assert Cache.key(WebPages().name, "visit", {"url": "u"}) != Cache.key(WebPages(allow_private=True).name, "visit", {"url": "u"})


def test_local_backends_are_keyed_by_their_data(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = LocalTextSearch(write_jsonl(tmp_path / "a" / "corpus.jsonl", CORPUS))
    b = LocalTextSearch(write_jsonl(tmp_path / "b" / "corpus.jsonl", CORPUS[:1]))
    assert a.name != b.name and a.name.startswith("local:")


def test_utf8_page_without_charset_is_utf8(server):
    server.plan["/u"] = [(200, "<html><title>Café São Paulo</title><p>Ünïcode.</p></html>", "text/html", 0)]
    assert WebPages(allow_private=True).fetch(server.url + "/u")[0] == "Café São Paulo"


# ---------------------------------------------------------------------------------------------- cache

def test_cache_hit_miss_replay_and_age(tmp_path):
    cache = Cache(tmp_path / "cache.sqlite")
    key = Cache.key("serper", "text_search", {"query": "q", "k": 5})
    assert key == Cache.key("serper", "text_search", {"k": 5, "query": "q"})
    assert key != Cache.key("serpapi", "text_search", {"query": "q", "k": 5})
    assert Cache.key("x", "image_search", {}, grid_image()) != Cache.key("x", "image_search", {}, grid_image(20, 10))
    n = []
    compute = lambda: n.append(1) or [{"title": "t"}]
    assert cache.fetch(key, compute) == [{"title": "t"}] and cache.fetch(key, compute) == [{"title": "t"}]
    assert len(n) == 1
    replay = Cache(tmp_path / "cache.sqlite", cache_only=True)
    assert replay.fetch(key, compute) == [{"title": "t"}]
    with pytest.raises(ToolError, match="replay mode"):
        replay.fetch("missing", compute)
    old = Cache(tmp_path / "cache.sqlite", max_age=0.0)
    time.sleep(0.01)
    assert old.get(key) is None


def test_cache_concurrent_writers(tmp_path):
    cache = Cache(tmp_path / "cache.sqlite")
    errors = []

    def writer(w):
        try:
            other = Cache(tmp_path / "cache.sqlite")   # separate connections, like separate processes
            for i in range(30):
                (cache if i % 2 else other).put(f"{w}-{i}", {"w": w, "i": i})
        except Exception as e:   # pragma: no cover - the assertion below reports it
            errors.append(e)
    threads = [threading.Thread(target=writer, args=(w,)) for w in range(6)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert errors == []
    assert all(cache.get(f"{w}-{i}") == {"w": w, "i": i} for w in range(6) for i in range(30))


def test_api_keys_never_cached(server, tmp_path):
    server.ok("/search", {"organic": ORGANIC})
    box = Toolbox(text_search=SerperSearch(server.url, api_key="SECRET-KEY", http=FAST), cache=Cache(tmp_path / "c.sqlite"))
    box.run([{"name": "text_search", "arguments": {"query": "eiffel"}}], [grid_image()])
    assert b"SECRET-KEY" not in (tmp_path / "c.sqlite").read_bytes()
    wal = tmp_path / "c.sqlite-wal"
    assert not wal.exists() or b"SECRET-KEY" not in wal.read_bytes()


# ---------------------------------------------------------------------------------------------- Toolbox

def test_toolbox_turn_with_crops_search_visit_and_errors(tmp_path):
    corpus = LocalTextSearch(write_jsonl(tmp_path / "corpus.jsonl", CORPUS))
    box = Toolbox(text_search=corpus, pages=corpus, cache=Cache(tmp_path / "c.sqlite"),
                  crop_settings=CropSettings(upscale_to=1))
    calls, errors = parse_tool_calls(
        '<tool_call>{"name": "crop", "arguments": {"bbox": [0, 0, 100, 50]}}</tool_call>'
        '<tool_call>{"name": "crop", "arguments": {"image": 1, "bbox": [0, 0, 50, 25]}}</tool_call>'
        '<tool_call>{"name": "text_search", "arguments": {"query": "clock tower London"}}</tool_call>'
        '<tool_call>{"name": "visit", "arguments": {"url": "http://local/eiffel", "goal": "when built"}}</tool_call>'
        '<tool_call>{"name": "crop", "arguments": {"image": 9, "bbox": [0, 0, 5, 5]}}</tool_call>'
        '<tool_call>{"name": "image_search", "arguments": {}}</tool_call>'
        '<tool_call>{"name": "nope", "arguments": {}}</tool_call>')
    images = [grid_image(), grid_image(100, 50)]
    obs = box.run(calls, images, errors)
    assert len(obs.responses) == len(calls) + len(errors) == 7   # one <tool_response> each
    parts = [p for r in obs.responses for p in r]
    text = "".join(p.get("text", "") for p in parts)
    assert len(obs.images) == 2 and obs.images[0].size == (100, 50) and obs.images[1].size == (50, 25)
    assert sum(p["type"] == "image" for p in parts) == 2
    assert "Image 2 (100x50)" in text and "Image 3 (50x25)" in text
    assert "1. Big Ben (http://local/bigben)" in text and "built 1889" in text
    assert "image 9 does not exist" in text and "image_search is not available" in text and "unknown tool 'nope'" in text
    assert obs.errors == 3
    assert box.stats["crop"] == {"calls": 3, "errors": 1}


def test_toolbox_call_timeout(tmp_path):
    class Slow:
        name = "slow"

        def search(self, q, k):
            time.sleep(2)
            return []
    box = Toolbox(text_search=Slow(), call_timeout=0.2)
    t0 = time.monotonic()
    obs = box.run([{"name": "text_search", "arguments": {"query": "q"}}] * 3, [grid_image()])
    assert time.monotonic() - t0 < 1.0
    assert obs.errors == 3 and "timed out after 0.2s" in obs.responses[0][0]["text"]


def test_toolbox_unexpected_exception_is_an_observation():
    class Broken:
        name = "broken"

        def search(self, q, k):
            raise RuntimeError("boom")
    obs = Toolbox(text_search=Broken()).run([{"name": "text_search", "arguments": {"query": "q"}}], [grid_image()])
    assert obs.errors == 1 and "RuntimeError: boom" in obs.responses[0][0]["text"]


def test_toolbox_abs_crop_uses_shown_size():
    box = Toolbox(shown_size=lambda im: (im.width // 2, im.height // 2), crop_settings=CropSettings(upscale_to=1))
    obs = box.run([{"name": "crop", "arguments": {"image": 0, "bbox_2d": [0, 0, 50, 25]}}], [grid_image()])
    assert obs.images[0].size == (100, 50)


@pytest.mark.parametrize("page", ["<a" * 100_000, "<!--" * 50_000, "<!" * 100_000, "</" * 100_000,
                                  "<a " + 'x="' * 60_000, "<b>" * 30_000 + "t" + "</b>" * 30_000])
def test_html_to_text_is_linear_on_pathological_pages(page):
    t0 = time.monotonic()
    tools.html_to_text(page)
    assert time.monotonic() - t0 < 5.0          # 200 KB; the quadratic parser took 30 s on the first one


def test_html_keeps_stray_angle_brackets_as_text():
    assert tools.html_to_text("<title>T</title><p>a < b and c > d</p><p>x<y</p>") == ("T", "a < b and c > d\n\nx<y")


@pytest.mark.parametrize("payload", [[1, 2], "just a string", {"organic": {"not": "a list"}},
                                     {"organic": [1, "x", None, {"title": {"deep": [1]}, "link": 5}]}])
def test_odd_api_payloads_are_errors_or_work(server, payload):
    server.ok("/search", payload)
    try:
        hits = SerperSearch(server.url, api_key="K", http=FAST).search("q", 3)
        assert all(isinstance(h["title"], str) and isinstance(h["url"], str) for h in hits)
    except ToolError as e:
        assert "unexpected" in str(e) or "JSON" in str(e)


def test_deeply_nested_json_is_an_error(server):
    server.plan["/search"] = [(200, "[" * 100_000 + "]" * 100_000, "application/json", 0)]
    with pytest.raises(ToolError, match="invalid JSON"):
        SerperSearch(server.url, api_key="K", http=FAST).search("q", 3)


def test_huge_numbers_in_a_bbox_are_an_error_observation():
    for bbox in ([10 ** 400, 0, 5, 5], [1e400, 0, 5, 5]):
        with pytest.raises(ToolError, match="4 finite numbers"):
            crop(grid_image(), bbox, "abs")
    calls, errors = parse_tool_calls('<tool_call>{"name": "crop", "arguments": {"bbox_2d": [1e400, 0, 5, 5]}}</tool_call>')
    obs = Toolbox().run(calls, [grid_image()], errors)
    assert obs.errors == 1 and "finite numbers" in obs.responses[0][0]["text"]


def test_cache_faults_are_clear_or_work(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="replay mode.*no cache"):
        Cache(tmp_path / "missing.sqlite", cache_only=True)
    with pytest.raises(ValueError, match="is a folder"):
        Cache(tmp_path)
    (tmp_path / "junk.sqlite").write_bytes(b"this is not a database" * 100)
    with pytest.raises(ValueError, match="cannot use the cache"):
        Cache(tmp_path / "junk.sqlite")
    # a read-only cache replays what it holds, and a new call still gets its result
    path = tmp_path / "ro.sqlite"
    cache = Cache(path)
    key = Cache.key("x", "text_search", {"query": "q"})
    cache.put(key, ["hit"])
    cache._db().execute("PRAGMA wal_checkpoint(TRUNCATE)")
    monkeypatch.setattr(tools.os, "access", lambda p, mode: False)   # as if the file were read-only (root can write anyway)
    ro = Cache(path)
    assert ro.read_only
    assert ro.fetch(key, lambda: 1 / 0) == ["hit"]
    assert ro.fetch(Cache.key("x", "text_search", {"query": "new"}), lambda: ["fresh"]) == ["fresh"]
    assert Cache(path, cache_only=True).fetch(key, lambda: 1 / 0) == ["hit"]
    with pytest.raises(ValueError, match="folder is not writable"):
        Cache(tmp_path / "sub" / "new.sqlite")


def test_calls_still_queued_at_the_timeout_never_run():
    started = []

    class Slow:
        name = "slow"

        def search(self, q, k):
            started.append(q)
            time.sleep(0.5)
            return []
    box = Toolbox(text_search=Slow(), call_timeout=0.2, max_workers=2)
    obs = box.run([{"name": "text_search", "arguments": {"query": str(i)}} for i in range(8)], [grid_image()])
    time.sleep(0.8)                                  # long enough for a queued call to have started
    assert obs.errors == 8 and len(started) == 2     # the 6 queued calls were cancelled


def test_visit_chars_flag_keeps_the_passage_for_the_goal(tmp_path):
    page = {"id": "1", "title": "Kalomi Tower", "url": "http://local/4821",
            "text": "It was designed by the architect Ren Vor.\n\nConstruction was completed in 1672.\n\n"
                    "The tower is lit at night and appears on local postcards."}
    ap = argparse.ArgumentParser()
    tools.add_tool_arguments(ap)
    corpus = str(write_jsonl(tmp_path / "corpus.jsonl", [page]))
    for flags, kept in [([], 3), (["--visit-chars", "60"], 1)]:
        box = tools.toolbox_from_args(ap.parse_args(["--corpus", corpus, "--cache", "", *flags]))
        calls, errors = parse_tool_calls('<tool_call>{"name": "visit", "arguments": {"url": "http://local/4821", '
                                         '"goal": "when was it completed"}}</tool_call>')
        text = box.run(calls, [], errors).responses[0][0]["text"]
        assert "completed in 1672" in text and len(text.split("\n\n")) - 1 == kept, text


def test_bad_tool_data_and_missing_keys_stop_with_a_message(tmp_path, monkeypatch):
    ap = argparse.ArgumentParser()
    tools.add_tool_arguments(ap)
    corpus = str(write_jsonl(tmp_path / "corpus.jsonl", [{"id": "1", "title": "t", "url": "http://local/1", "text": "x"}]))
    grid_image().save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"not a png")
    cases = [("garbage.jsonl", "{\"image\": \"a.png\"}\nnot json\n", "garbage.jsonl:2: not valid JSON"),
             ("noimage.jsonl", '{"title": "x"}\n', "noimage.jsonl:1: want at least 'image'"),
             ("missing.jsonl", '{"image": "nope.png"}\n', "cannot read the image of entry 'nope.png'"),
             ("broken.jsonl", '{"image": "b.png"}\n', "cannot read the image of entry 'b.png'")]
    for name, text, message in cases:
        (tmp_path / name).write_text(text)
        with pytest.raises(SystemExit, match=re.escape(message)):
            tools.toolbox_from_args(ap.parse_args(["--corpus", corpus, "--image-index", str(tmp_path / name),
                                                   "--cache", ""]))
    monkeypatch.delenv("SERPAPI_API_KEY", raising=False)
    with pytest.raises(SystemExit, match="set SERPAPI_API_KEY .*--cache-only"):
        tools.toolbox_from_args(ap.parse_args(["--backend", "serpapi", "--cache", ""]))
    cache = str(tmp_path / "cache.sqlite")   # replaying a cache needs no key
    Cache(cache)
    tools.toolbox_from_args(ap.parse_args(["--backend", "serpapi", "--cache", cache, "--cache-only"]))


def test_crop_upscale_flag_sets_the_size_the_model_sees(tmp_path):
    ap = argparse.ArgumentParser()
    tools.add_tool_arguments(ap)
    corpus = str(write_jsonl(tmp_path / "corpus.jsonl", [{"id": "1", "title": "t", "url": "http://local/1", "text": "x"}]))
    image = Image.new("RGB", (200, 100), "white")
    for flags, side in [([], 224), (["--crop-upscale", "112"], 112)]:
        box = tools.toolbox_from_args(ap.parse_args(["--corpus", corpus, "--cache", "", *flags]))
        calls, errors = parse_tool_calls('<tool_call>{"name": "crop", "arguments": {"image": 0, "bbox_2d": [0, 0, 50, 50]}}'
                                         '</tool_call>')
        obs = box.run(calls, [image], errors)
        assert [im.size for im in obs.images] == [(side, side)]
