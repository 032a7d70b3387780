"""The review station's HTTP API with the framework's test client: every route and every refusal;
the ``leukoscope review`` command's exports and refusals."""

from __future__ import annotations

import io
import json

import pandas as pd
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from leukoscope.cli.main import main
from leukoscope.review import ReviewStore
from leukoscope.review.app import TOKEN_COOKIE, create_app
from review_helpers import copy_run, run, store  # noqa: F401 (fixtures)

BASE = "http://127.0.0.1:8765"


@pytest.fixture
def client(store):
    app = create_app(store, reviewer="Dr A")
    c = TestClient(app, base_url=BASE)
    c.headers.update({"X-CSRF-Token": app.state.csrf})
    return c


def _label(client, cell, label, version=None, who="Dr A"):
    return client.post(f"/api/cells/{cell['id']}/label",
                       json={"label": label, "version": cell["version"] if version is None else version,
                             "reviewer": who})


def _finish(client):
    for c in client.get("/api/cells").json():
        assert _label(client, c, "LYT").status_code == 200
    return client.post("/api/signoff", json={"reviewer": "Dr A", "specimen": "S-7", "comment": "fine"})


def test_gallery_page_lists_every_cell_key_and_class(client, store):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    for c in store.cells():
        assert f'id="cell-{c["id"]}"' in html and f'api/cells/{c["id"]}/crop.png' in html
    for key, lab in (("1", "NGS"), ("7", "MYO"), ("t", "KSC"), ("u", "unidentified"), ("n", "not_leukocyte"),
                     ("a", "artefact")):
        assert f"<kbd>{key}</kbd> {lab}" in html
    assert "Not a medical device" in html and 'name="csrf-token"' in html
    assert client.get("/static/review.js").status_code == 200 and client.get("/static/review.css").status_code == 200


def test_read_routes(client, store):
    cells = client.get("/api/cells").json()
    assert [c["id"] for c in cells] == [c["id"] for c in store.cells()]
    one = client.get(f"/api/cells/{cells[0]['id']}").json()
    assert one["label"] == cells[0]["label"] and len(one["top3"]) == 3
    st = client.get("/api/state").json()
    assert st["progress"]["cells"] == len(cells) and len(st["differential"]["after"]["differential"]) == 15
    crop = client.get(f"/api/cells/{cells[0]['id']}/crop.png")
    assert crop.headers["content-type"] == "image/png" and Image.open(io.BytesIO(crop.content)).size[0] > 32
    inp = client.get(f"/api/cells/{cells[0]['id']}/input.png")
    assert inp.status_code == 200 and Image.open(io.BytesIO(inp.content)).size == (32, 32)
    assert inp.headers["x-note"] == "cut from the original smear"
    sal = client.get(f"/api/cells/{cells[0]['id']}/saliency.png")
    assert sal.status_code == 200 and Image.open(io.BytesIO(sal.content)).size == (32, 32)
    field = client.get(f"/api/cells/{cells[0]['id']}/field.jpg")
    assert field.status_code == 200 and field.headers["content-type"] == "image/jpeg"
    assert client.get("/api/audit").json() == []
    assert "DRAFT" in client.get("/report").text


def test_decisions_seen_signoff_rounds_and_exports(client, store):
    cells = client.get("/api/cells").json()
    r = client.post("/api/seen", json={"ids": [c["id"] for c in cells[:2]]})
    assert r.status_code == 200 and r.json()["newly_seen"] == 2 and r.json()["progress"]["seen"] == 2
    r = _label(client, cells[0], "MYO")
    assert r.status_code == 200 and r.json()["version"] == cells[0]["version"] + 1
    early = client.post("/api/signoff", json={"reviewer": "Dr A", "specimen": "S-7"})
    assert early.status_code == 409 and "not yet seen" in early.json()["error"]
    assert client.get("/export/differential.csv").status_code == 409  # nothing signed yet
    assert _finish(client).status_code == 200
    assert store.current_round()["signed"]
    locked = _label(client, client.get(f"/api/cells/{cells[0]['id']}").json(), "MOB")
    assert locked.status_code == 423 and "read-only" in locked.json()["error"]
    assert client.post("/api/seen", json={"ids": [cells[0]["id"]]}).status_code == 423
    csv = pd.read_csv(io.StringIO(client.get("/export/differential.csv").text))
    assert set(csv["specimen"]) == {"S-7"} and csv.set_index("class").loc["LYT", "n_after"] == len(cells)
    rec = client.get("/export/differential.json").json()
    assert rec["reviewer"] == "Dr A" and rec["signed"]
    assert "S-7" in client.get("/report").text and "DRAFT" not in client.get("/report").text
    trail = client.get("/api/audit", params={"cell_id": cells[0]["id"]}).json()
    assert [(a["from_label"], a["to_label"]) for a in trail] == [(cells[0]["label"], "MYO"), ("MYO", "LYT")]
    assert client.post("/api/rounds", json={"reviewer": " "}).status_code == 400
    r = client.post("/api/rounds", json={"reviewer": "Dr B"})
    assert r.status_code == 200 and r.json() == {"round": 2}
    assert client.get("/api/state").json()["round"]["signed"] == 0


def test_two_tabs_editing_one_cell_get_a_conflict(client):
    cell = client.get("/api/cells").json()[0]
    assert _label(client, cell, "MYO", who="tab 1").status_code == 200
    r = _label(client, cell, "NGS", who="tab 2")  # tab 2 still shows the old version
    assert r.status_code == 409 and "changed meanwhile (now MYO" in r.json()["error"]
    assert client.get(f"/api/cells/{cell['id']}").json()["label"] == "MYO"


def test_labels_and_ids_are_validated(client):
    cell = client.get("/api/cells").json()[0]
    r = _label(client, cell, "BLAST")
    assert r.status_code == 400 and "unknown label 'BLAST'" in r.json()["error"]
    assert _label(client, {"id": 99999, "version": 0}, "MYO").status_code == 404
    assert client.get("/api/cells/99999/crop.png").status_code == 404
    assert client.get("/api/cells/..%2F..%2Fetc%2Fpasswd/crop.png").status_code in (404, 422)
    assert client.get("/api/cells/1;DROP/crop.png").status_code == 422
    r = client.post(f"/api/cells/{cell['id']}/label", json={"label": "MYO"})
    assert r.status_code == 422  # version and reviewer missing


def test_cross_site_and_token_refusals(store):
    app = create_app(store)
    c = TestClient(app, base_url=BASE)
    cell = store.cells()[0]
    body = {"label": "MYO", "version": cell["version"], "reviewer": "x"}
    url = f"/api/cells/{cell['id']}/label"
    assert c.post(url, json=body).status_code == 403                                     # no CSRF token
    assert c.post(url, json=body, headers={"X-CSRF-Token": "guess"}).status_code == 403  # wrong token
    good = {"X-CSRF-Token": app.state.csrf}
    r = c.post(url, json=body, headers={**good, "Origin": "http://evil.example"})
    assert r.status_code == 403 and "cross-site" in r.json()["error"]
    assert c.post(url, json=body, headers={**good, "Sec-Fetch-Site": "cross-site"}).status_code == 403
    r = c.post(url, content="label=MYO", headers={**good, "Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415
    assert TestClient(app, base_url="http://evil.example:8765").get("/").status_code == 403  # DNS rebinding
    assert store.audit() == []
    assert c.post(url, json=body, headers={**good, "Origin": BASE}).status_code == 200

    remote = create_app(store, token="s3cret", loopback=False)
    rc = TestClient(remote, base_url="http://10.1.2.3:8765")
    assert rc.get("/").status_code == 403 and rc.get("/api/cells").status_code == 403
    assert rc.get("/api/cells/1/crop.png").status_code == 403
    assert rc.get("/?token=wrong").status_code == 403
    assert rc.get("/api/cells", headers={"X-Review-Token": "s3cret"}).status_code == 200
    r = rc.get("/?token=s3cret", follow_redirects=False)
    assert r.status_code == 303 and "token" not in r.headers["location"] and TOKEN_COOKIE in r.headers["set-cookie"]
    assert "httponly" in r.headers["set-cookie"].lower() and "samesite=strict" in r.headers["set-cookie"].lower()
    assert rc.get("/").status_code == 200  # the cookie now carries the token


# ------------------------------------------------------------------------------ the command


def test_cli_export_refusals_and_outputs(run, tmp_path, capsys):
    out = copy_run(run, tmp_path)
    with ReviewStore.open_or_create(out) as store:
        db = store.path
    rc = main(["review", "export", str(db), "--out", str(tmp_path / "x")])
    assert rc == 2 and "not signed off" in capsys.readouterr().err and not (tmp_path / "x").exists()
    with ReviewStore(db) as store:
        for c in store.cells():
            store.reclassify(c["id"], "NGS", "Dr A", c["version"])
        store.sign_off("Dr A", "S-9")
    assert main(["review", "export", str(db), "--out", str(tmp_path / "x")]) == 0
    assert {p.name for p in (tmp_path / "x").iterdir()} == {"differential.csv", "differential.json", "report.html"}
    assert json.loads((tmp_path / "x" / "differential.json").read_text())["specimen"] == "S-9"
    assert main(["review", "export-labels", str(db), "--out", str(tmp_path / "l")]) == 0
    printed = capsys.readouterr().out
    assert "reviewed cells; left out: 0 unidentified, 0 not_leukocyte, 0 artefact" in printed
    assert (tmp_path / "l" / "labels.csv").exists()
    assert main(["review", str(out), "--host", "0.0.0.0"]) == 2
    assert "--allow-remote" in capsys.readouterr().err
    assert main(["review", str(tmp_path / "nothing-here")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    (tmp_path / "junk.sqlite").write_bytes(b"junk" * 100)
    assert main(["review", "--db", str(tmp_path / "junk.sqlite"), "--port", "0"]) == 2
    assert "not an SQLite file" in capsys.readouterr().err
    assert main(["review", "export", str(db)]) == 2 and "--out DIR" in capsys.readouterr().err


def test_cli_help_lists_the_keys(capsys):
    with pytest.raises(SystemExit):
        main(["review", "--help"])
    text = capsys.readouterr().out
    assert "export-labels" in text and "7 MYO" in text and "a artefact" in text


def test_cli_serving_beyond_loopback_prints_a_token_once_and_requires_it(run, tmp_path, capsys, monkeypatch):
    from leukoscope.cli import review as review_cli
    from review_helpers import free_port

    seen = []

    def fake_serve(app, host, port):  # what the server would answer, asked before the command closes the store
        c = TestClient(app, base_url=f"http://{'10.0.0.5' if host == '0.0.0.0' else host}:{port}")
        seen.append((host, port, c.get("/api/cells").status_code,
                     c.get("/api/cells", headers={"X-Review-Token": token_of(capsys)}).status_code))

    def token_of(capsys):
        printed = capsys.readouterr()
        seen.append(printed)
        return printed.out.split("?token=")[1].split()[0] if "?token=" in printed.out else "none"

    monkeypatch.setattr(review_cli, "serve", fake_serve)  # the name the command calls
    out = copy_run(run, tmp_path)
    port = free_port()
    assert main(["review", str(out), "--host", "0.0.0.0", "--allow-remote", "--port", str(port)]) == 0
    printed, answers = seen
    token = printed.out.split("?token=")[1].split()[0]
    assert len(token) >= 24 and printed.out.count(token) == 1 and "shown only once" in printed.err
    assert answers == ("0.0.0.0", port, 403, 200)
    seen.clear()
    assert main(["review", str(out), "--port", str(port)]) == 0
    printed, answers = seen
    assert "token" not in printed.out and answers == ("127.0.0.1", port, 200, 200)  # on 127.0.0.1 no token is made


def test_model_views_without_the_model_file_say_why(store, tmp_path):
    from leukoscope.review.model_views import ModelViews

    app = create_app(store, views=ModelViews(store, model_path=str(tmp_path / "moved.safetensors")))
    c = TestClient(app, base_url=BASE)
    cell = store.cells()[0]
    for view in ("input.png", "saliency.png"):
        r = c.get(f"/api/cells/{cell['id']}/{view}")
        assert r.status_code == 404 and "moved.safetensors: model file not found" in r.json()["error"]
    assert c.get(f"/api/cells/{cell['id']}/crop.png").status_code == 200  # the review itself needs no model
