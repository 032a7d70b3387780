"""The review station: a thin FastAPI layer over a :class:`~leukoscope.review.store.ReviewStore`.

``create_app(store, token=None)`` gives an ASGI app; :func:`serve` runs it with uvicorn.

Safety:

* **Access token** (``token`` set, required when serving beyond 127.0.0.1): every
  request carries it, once as ``?token=`` (then kept in a same-site, HttpOnly cookie),
  or in the ``X-Review-Token`` header; otherwise 403.
* **Host header**: on a loopback address only ``127.0.0.1``/``localhost``/``[::1]``
  hosts are served (no DNS-rebinding site can reach the station).
* **Cross-site requests**: every state-changing request must be JSON, carry the
  page's per-server CSRF token in ``X-CSRF-Token``, and come from the station's own
  origin when the browser sends ``Origin``/``Sec-Fetch-Site``; otherwise 403.
* Images are served by cell id from the database only; labels are checked against
  the taxonomy (400); an edit based on an old version is a 409 with a message saying
  who changed what; a signed round answers 423.
"""

from __future__ import annotations

import getpass
import io
import secrets
from pathlib import Path
from urllib.parse import urlsplit

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image, ImageDraw
from pydantic import BaseModel

from leukoscope import INTENDED_USE, __version__
from leukoscope.models.ood import SHIFT_BANNER
from leukoscope.review.export import differential_record, differential_table, render_report, templates
from leukoscope.review.labels import CLASS_ORDER, KEY_OF, LABELS, NOT_COUNTED, OUTCOMES, label_name
from leukoscope.review.model_views import ModelUnavailable, ModelViews
from leukoscope.review.store import ConflictError, ReadOnlyError, SignOffError

STATIC = Path(__file__).resolve().parent / "static"
TOKEN_COOKIE = "leukoscope_review_token"
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}


class LabelBody(BaseModel):
    label: str
    version: int
    reviewer: str


class SeenBody(BaseModel):
    ids: list[int]


class SignOffBody(BaseModel):
    reviewer: str
    specimen: str
    comment: str = ""


class RoundBody(BaseModel):
    reviewer: str


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _host_name(host_header: str) -> str:
    return urlsplit(f"//{host_header}").hostname or ""


def create_app(store, token: str | None = None, views: ModelViews | None = None, reviewer: str | None = None,
               loopback: bool = True) -> FastAPI:
    """The review app over ``store``. ``token``: required access token (None: none asked);
    ``views``: model input/saliency (default from the run's model file); ``reviewer``: the name
    pre-filled in the page; ``loopback``: served on a loopback address (Host header checked)."""
    app = FastAPI(title="LeukoScope review", docs_url=None, redoc_url=None, openapi_url=None)
    csrf = secrets.token_urlsafe(32)
    views = views or ModelViews(store)
    env = templates()
    default_reviewer = reviewer if reviewer is not None else _user()
    app.state.store, app.state.csrf = store, csrf

    @app.middleware("http")
    async def guard(request: Request, call_next):
        host = request.headers.get("host", "")
        if loopback and _host_name(host) not in LOOPBACK_HOSTS:
            return PlainTextResponse(f"host {host!r} is not served: the station answers on 127.0.0.1 only", 403)
        if token is not None:
            given = request.query_params.get("token")
            if given is not None and secrets.compare_digest(given, token) and request.method == "GET":
                resp = RedirectResponse(request.url.remove_query_params("token"), status_code=303)
                resp.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
                return resp
            have = request.cookies.get(TOKEN_COOKIE) or request.headers.get("x-review-token") or ""
            if not secrets.compare_digest(have, token):
                return PlainTextResponse("access token required: open the address with ?token=... printed by "
                                         "'leukoscope review' when it started", 403)
        if request.method not in SAFE_METHODS:
            origin = request.headers.get("origin")
            if origin is not None and urlsplit(origin).netloc != host:
                return _error(403, f"cross-site request refused (Origin {origin} is not this station)")
            if request.headers.get("sec-fetch-site") not in (None, "same-origin", "none"):
                return _error(403, "cross-site request refused (Sec-Fetch-Site)")
            if not secrets.compare_digest(request.headers.get("x-csrf-token", ""), csrf):
                return _error(403, "missing or wrong CSRF token: reload the page")
            if not request.headers.get("content-type", "").startswith("application/json"):
                return _error(415, "state-changing requests must be JSON")
        return await call_next(request)

    @app.exception_handler(ConflictError)
    async def _conflict(request, exc):
        return _error(409, str(exc))

    @app.exception_handler(SignOffError)
    async def _signoff(request, exc):
        return _error(409, str(exc))

    @app.exception_handler(ReadOnlyError)
    async def _readonly(request, exc):
        return _error(423, str(exc))

    @app.exception_handler(KeyError)
    async def _missing(request, exc):
        return _error(404, exc.args[0] if exc.args else "not found")

    @app.exception_handler(ValueError)
    async def _bad(request, exc):
        return _error(400, str(exc))

    @app.exception_handler(ModelUnavailable)
    async def _nomodel(request, exc):
        return _error(404, f"model view unavailable: {exc}")

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")

    def state() -> dict:
        rnd = store.current_round()
        return {"round": rnd, "rounds": store.rounds(), "progress": store.progress(), "differential": store.differential()}

    @app.get("/", response_class=HTMLResponse)
    def gallery():
        cells = store.cells()
        groups = []
        for lab in LABELS:
            members = [c for c in cells if c["label"] == lab]
            if members:
                groups.append({"label": lab, "name": label_name(lab), "cells": members})
        html = env.get_template("gallery.html").render(
            run=store.run, model=store.model_record(), scale=store.scale_text(), groups=groups, state=state(),
            csrf=csrf, reviewer=default_reviewer, keys=[(KEY_OF[lab], lab, label_name(lab)) for lab in
                                                        CLASS_ORDER + OUTCOMES[:1] + NOT_COUNTED],
            labels={lab: {"name": label_name(lab), "key": KEY_OF[lab]} for lab in LABELS},
            intended_use=INTENDED_USE, version=__version__, db=str(store.path), shift_banner=SHIFT_BANNER)
        return HTMLResponse(html)

    @app.get("/api/state")
    def api_state():
        return state()

    @app.get("/api/cells")
    def api_cells(label: str | None = None):
        return store.cells(label=label)

    @app.get("/api/cells/{cell_id}")
    def api_cell(cell_id: int):
        return store.cell(cell_id)

    @app.get("/api/cells/{cell_id}/crop.png")
    def crop(cell_id: int):
        return Response(store.crop_png(cell_id), media_type="image/png")

    @app.get("/api/cells/{cell_id}/input.png")
    def model_input(cell_id: int):
        store.cell(cell_id)
        png, note = views.model_input(cell_id)
        return Response(png, media_type="image/png", headers={"X-Note": note})

    @app.get("/api/cells/{cell_id}/saliency.png")
    def saliency(cell_id: int):
        store.cell(cell_id)
        return Response(views.saliency(cell_id), media_type="image/png")

    @app.get("/api/cells/{cell_id}/field.jpg")
    def field(cell_id: int):
        c = store.cell(cell_id)
        f = store.field(c["image"])
        if f is None:
            raise KeyError(f"cell {cell_id} is a single-cell image: it has no smear field")
        img = Image.open(io.BytesIO(f["overview"])).convert("RGB")
        k = f["overview_factor"]
        draw = ImageDraw.Draw(img)
        pad = 3
        draw.rectangle([c["x0"] / k - pad, c["y0"] / k - pad, c["x1"] / k + pad, c["y1"] / k + pad],
                       outline=(0, 200, 255), width=3)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=88)
        return Response(buf.getvalue(), media_type="image/jpeg")

    @app.post("/api/cells/{cell_id}/label")
    def relabel(cell_id: int, body: LabelBody):
        return store.reclassify(cell_id, body.label, body.reviewer, body.version)

    @app.post("/api/seen")
    def seen(body: SeenBody):
        return {"newly_seen": store.mark_seen(body.ids), "progress": store.progress()}

    @app.post("/api/signoff")
    def signoff(body: SignOffBody):
        return store.sign_off(body.reviewer, body.specimen, body.comment)

    @app.post("/api/rounds")
    def new_round(body: RoundBody):
        if not body.reviewer.strip():
            raise ValueError("a new round needs the reviewer's name")
        return {"round": store.new_round(body.reviewer)}

    @app.get("/api/audit")
    def audit(cell_id: int | None = None):
        return store.audit(cell_id)

    @app.get("/report", response_class=HTMLResponse)
    def report():
        rnd = store.current_round()
        rec = differential_record(store, rnd["round"], signed=bool(rnd["signed"]))
        return HTMLResponse(render_report(rec))

    @app.get("/export/differential.csv")
    def export_csv():
        rec = differential_record(store)
        return Response(differential_table(rec).to_csv(index=False), media_type="text/csv",
                        headers={"Content-Disposition": 'attachment; filename="differential.csv"'})

    @app.get("/export/differential.json")
    def export_json():
        return differential_record(store)

    return app


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return ""


def make_token() -> str:
    """A random access token for a station served beyond 127.0.0.1."""
    return secrets.token_urlsafe(24)


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Run ``app`` with uvicorn until interrupted."""

    uvicorn.run(app, host=host, port=port, log_level="warning")
