"""The demo's file access, against the running app on 127.0.0.1 over raw HTTP (no browser).

A client may name files in its requests (Gradio's ``FileData`` dicts). The demo must accept only files its
upload endpoint received: a path to any other file on the server (an image or a text file in another temp
folder) or a URL must be refused before Gradio copies it into its cache, so it is neither returned nor
servable later through ``GET /gradio_api/file=...``. docs/app.md must list every endpoint that takes input.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from pathlib import Path

import httpx
import numpy as np
import pytest
from _loopback import LOOPBACK, free_loopback_port
from PIL import Image

from diffkit.app.main import prepare
from diffkit.app.ui import FOREIGN_FILE_MESSAGE, foreign_file, upload_folder

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
DOCS = Path(__file__).resolve().parents[1] / "docs" / "app.md"
pytestmark = [pytest.mark.filterwarnings("ignore:.*no_silent_downcasting.*"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_paths):
    """``python app.py --model <tiny sd15> --port N`` on a free loopback port; yields its URL."""
    root = tmp_path_factory.mktemp("app")
    port = free_loopback_port()
    demo, launch = prepare(["--model", str(tiny_paths["sd15"]), "--port", str(port), "--no-warmup",
                            "--pruning-dir", str(root / "pruning"), "--erasure-dir", str(root / "erasure")])
    assert launch["server_name"] == LOOPBACK and launch["allowed_paths"] == []
    assert str(Path(__file__).resolve().parents[1] / "diffkit") in launch["blocked_paths"]
    demo.launch(**launch, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://{LOOPBACK}:{port}"
    finally:
        demo.close()


@pytest.fixture(scope="module")
def secrets_outside(tmp_path_factory):
    """A PNG and a text file with random contents in a temp folder that is not the demo's."""
    folder = tmp_path_factory.mktemp("not-the-demos")
    pixels = np.random.default_rng(secrets.randbits(32)).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    png, txt = folder / "secret.png", folder / "secret.txt"
    Image.fromarray(pixels).save(png)
    txt.write_text(f"TOP SECRET {secrets.token_hex(16)}\n")
    return {"png": png, "txt": txt}


def file_data(path) -> dict:
    return {"path": str(path), "meta": {"_type": "gradio.FileData"}, "orig_name": Path(str(path)).name}


def call(server: str, api_name: str, data: list) -> tuple[str, object]:
    """POST /gradio_api/call/<api_name>, then read its event stream: (last event name, its data)."""
    r = httpx.post(f"{server}/gradio_api/call/{api_name}", json={"data": data}, timeout=30)
    assert r.status_code == 200, r.text
    event_id = r.json()["event_id"]
    text = httpx.get(f"{server}/gradio_api/call/{api_name}/{event_id}", timeout=120).text
    events = re.findall(r"^event: (\w+)\ndata: (.*)$", text, flags=re.M)
    assert events, text
    name, payload = events[-1]
    return name, json.loads(payload)


def join_queue(server: str, fn_index: int, data: list) -> dict:
    """Call an event the way the page does (queue/join by fn_index); return its process_completed message."""
    session = secrets.token_hex(8)
    r = httpx.post(f"{server}/gradio_api/queue/join",
                   json={"data": data, "fn_index": fn_index, "session_hash": session, "event_data": None}, timeout=30)
    assert r.status_code == 200, r.text
    with httpx.stream("GET", f"{server}/gradio_api/queue/data", params={"session_hash": session},
                      timeout=120) as stream:
        for line in stream.iter_lines():
            if line.startswith("data: "):
                message = json.loads(line[6:])
                if message.get("msg") == "process_completed":
                    return message
    raise AssertionError("no process_completed message")


def run_direct(server: str, fn_index: int, data: list) -> httpx.Response:
    """Call an unqueued event the way the page does (POST /gradio_api/run/predict by fn_index)."""
    return httpx.post(f"{server}/gradio_api/run/predict",
                      json={"data": data, "fn_index": fn_index, "session_hash": secrets.token_hex(8)}, timeout=60)


def copies_in_cache(secret: Path) -> list[Path]:
    """Files under Gradio's upload/cache folder whose bytes equal ``secret``'s."""
    body = secret.read_bytes()
    root = upload_folder()
    if not root.is_dir():
        return []
    return [p for p in root.rglob("*") if p.is_file() and p.stat().st_size == len(body) and p.read_bytes() == body]


def test_foreign_file_names_urls_and_paths_outside_the_upload_folder(tmp_path):
    root = tmp_path / "uploads"
    (root / "abc").mkdir(parents=True)
    inside = root / "abc" / "x.png"
    inside.write_bytes(b"x")
    (root / "abc" / "link.png").symlink_to(tmp_path / "elsewhere.png")
    assert foreign_file([None, "text", 3, {"path": str(inside), "meta": {"_type": "gradio.FileData"}}], root) is None
    assert foreign_file({"value": {"path": "/etc/passwd"}}, root) == "/etc/passwd"  # no meta: still a file
    assert foreign_file([{"path": str(root / "abc" / ".." / ".." / "x")}], root) == str(root / "abc/../../x")
    assert foreign_file({"path": str(root / "abc" / "link.png")}, root) == str(root / "abc" / "link.png")
    assert foreign_file({"path": "https://example.com/a.png"}, root) == "https://example.com/a.png"
    assert foreign_file({"path": f"http://127.0.0.1/{inside}"}, root) is not None


def test_files_outside_the_app_are_refused_and_never_served(server, secrets_outside):
    config = httpx.get(f"{server}/config").json()
    before = {kind: copies_in_cache(path) for kind, path in secrets_outside.items()}
    url_to_self = f"{server}/gradio_api/file={secrets_outside['png']}"
    for kind, path in [*secrets_outside.items(), ("url", url_to_self)]:
        fd = file_data(path)
        # The public endpoints, as gradio_client would call them.
        name, payload = call(server, "edit", [fd, "a red star", "a blue star", 0.6, 2])
        assert (name, payload["error"]) == ("error", FOREIGN_FILE_MESSAGE), (kind, payload)
        generate_inputs = [True, 1, fd, "", 0, 2, "DDIM", "CFG", 7.5, 15, 0, 15, -0.5, 0.6, False, 3, 0,
                           "uniform", "(none)", "(none)", "pag", 3.0, "(none)"]
        name, payload = call(server, "generate", generate_inputs)
        assert (name, payload["error"]) == ("error", FOREIGN_FILE_MESSAGE), (kind, payload)
        # Every event of the page, by index, with the file in every input (queued and direct routes).
        for index, dep in enumerate(config["dependencies"]):
            data = [fd] * len(dep["inputs"])
            if not data:
                continue
            if dep.get("queue") is False:
                r = run_direct(server, index, data)
                assert (r.status_code, r.json()["error"]) == (500, FOREIGN_FILE_MESSAGE), (kind, index, r.text)
            else:
                message = join_queue(server, index, data)
                assert message["success"] is False and message["output"]["error"] == FOREIGN_FILE_MESSAGE, message
    for kind, path in secrets_outside.items():
        assert copies_in_cache(path) == before[kind] == [], kind  # nothing was copied into Gradio's cache
        r = httpx.get(f"{server}/gradio_api/file={path}")
        assert r.status_code == 403 and secrets_outside["txt"].read_text() not in r.text


def test_an_uploaded_image_is_accepted_and_its_results_are_served(server, secrets_outside):
    with secrets_outside["png"].open("rb") as f:
        r = httpx.post(f"{server}/gradio_api/upload", files={"files": ("mine.png", f, "image/png")})
    assert r.status_code == 200, r.text
    (uploaded,) = r.json()
    assert Path(uploaded).resolve().is_relative_to(upload_folder().resolve())
    name, payload = call(server, "edit", [file_data(uploaded), "a red star", "a blue star", 0.6, 2])
    assert name == "complete", payload
    original, reconstruction, edited, status = payload
    assert re.fullmatch(r"Inversion \+ 2 generations: \*\*\d+\.\d\d s\*\* · reconstruction PSNR: \*\*"
                        r"(\d+\.\d\d dB|identical \(inf dB\))\*\*", status), status
    for image in (original, reconstruction, edited):
        served = httpx.get(image["url"])
        assert served.status_code == 200 and served.headers["content-type"] == "image/png"
    # The public generate endpoint works as gradio_client calls it (the session state is not an API input).
    name, payload = call(server, "generate", [False, 1, "a red star", "", 0, 2, "DDIM", "CFG", 7.5, 15, 0, 15,
                                              -0.5, 0.6, False, 3, 0, "uniform", "(none)", "(none)", "pag",
                                              3.0, "(none)"])
    assert name == "complete" and payload[0] is None and payload[2].endswith(" — seed 0, DDIM, 2 steps, CFG 7.5")
    assert httpx.get(payload[1]["url"]).status_code == 200


def test_docs_list_every_endpoint_that_takes_input(server):
    """docs/app.md's endpoint table names exactly the public API and every page event with inputs."""
    info = httpx.get(f"{server}/gradio_api/info").json()
    config = httpx.get(f"{server}/config").json()
    text = DOCS.read_text()
    section = text[text.index("### Endpoints"):]
    section = section[:section.index("\n### ", 4)]
    documented_api = set(re.findall(r"^\| `(/\w+)` \|", section, flags=re.M))
    assert documented_api == set(info["named_endpoints"]) == {"/generate", "/edit", "/erase"}
    assert info["unnamed_endpoints"] == {}
    documented_events = re.findall(r"^\| page event: ([^|]+?) \|", section, flags=re.M)
    public = {name.lstrip("/") for name in info["named_endpoints"]}
    page_events = [d for d in config["dependencies"] if d["inputs"] and d.get("api_name") not in public]
    assert len(documented_events) == len(page_events), (documented_events, [d.get("api_name") for d in page_events])
