"""The review station end to end: a real server process, driven by headless Chromium with the
keyboard alone (synthetic smear and a real BCCD field), and a server killed with SIGKILL right after
a decision was acknowledged."""

from __future__ import annotations

import os
import re
import signal
import time

import httpx
import pandas as pd
import pytest

from leukoscope.cli.main import main
from leukoscope.review import ReviewStore
from review_helpers import copy_run, free_port, run, screen_with, start_server  # noqa: F401 (fixture)

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
pytestmark = pytest.mark.slow


@pytest.fixture
def driver():
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip(f"headless browser tests need Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER} "
                    "absent): apt-get install -y chromium chromium-driver (.ci/run does)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1500,1000",
              "--no-first-run", "--disable-extensions"):
        opts.add_argument(a)
    d = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)  # no selenium-manager download
    d.set_page_load_timeout(60)
    yield d
    d.quit()


@pytest.fixture
def server(tmp_path):
    procs = []

    def start(args, port=None):
        port = port or free_port()
        procs.append(start_server(args, port, tmp_path / "server.log"))
        return procs[-1], f"http://127.0.0.1:{port}/"

    yield start
    for p in procs:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(10)
            except Exception:
                p.kill()


def _wait(cond, timeout=30.0, what="condition"):
    """Poll ``cond`` until true; a page that reloads meanwhile (stale elements) is polled again."""
    from selenium.common.exceptions import WebDriverException

    end, last = time.time() + timeout, None
    while time.time() < end:
        try:
            v = cond()
        except WebDriverException as exc:
            v, last = None, exc
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}" + (f" (last error: {last.msg})" if last else ""))


def _keys(driver, keys):
    driver.switch_to.active_element.send_keys(keys)


def _label_key(driver, key: str, cell_id: str, label: str):
    """Press a label key and wait until the page has the answer (saved, focus moved on)."""
    from selenium.webdriver.common.by import By

    _keys(driver, key)
    _wait(lambda: driver.find_element(By.ID, f"cell-{cell_id}").get_attribute("data-label") == label
          and driver.execute_script("return document.body.dataset.busy") == "0", what=f"cell {cell_id} -> {label}")


def keyboard_round(driver, url: str, db, specimen: str, shot=None) -> list[dict]:
    """Review every cell with keys only: the first cell to MYO, the rest to LYT; try an early sign-off
    (must be refused), sign off; returns the cells as the server saw them just before signing."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver.get(url)
    tiles = driver.find_elements(By.CSS_SELECTOR, ".tile")
    assert tiles, "no cells in the gallery"
    ids = [t.get_attribute("data-id") for t in tiles]
    _wait(lambda: driver.execute_script("return document.activeElement.id") == f"cell-{ids[0]}", what="first cell focus")
    # details of the first cell: model input, saliency and the field load as images
    _keys(driver, Keys.ENTER)
    _wait(lambda: driver.execute_script(
        "return ['d-crop','d-input','d-saliency','d-field'].every(i => document.getElementById(i).naturalWidth > 0)"),
        what="detail images")
    assert len(driver.find_elements(By.CSS_SELECTOR, "#d-top3 li")) == 3
    _keys(driver, Keys.ESCAPE)
    # the first cell to "unidentified" (u), back to it (left arrow): an early sign-off is refused
    _label_key(driver, "u", ids[0], "unidentified")
    _keys(driver, Keys.ARROW_LEFT)
    _keys(driver, "s")
    assert driver.execute_script("return document.activeElement.id") == "specimen"
    _keys(driver, specimen + Keys.ENTER)
    _wait(lambda: "Sign-off refused" in driver.find_element(By.ID, "alert").text, what="early sign-off refusal")
    assert "still unidentified" in driver.find_element(By.ID, "alert").text
    _keys(driver, Keys.ESCAPE)
    assert driver.execute_script("return document.activeElement.id") == f"cell-{ids[0]}"
    # the first cell to MYO with its key; the cell is saved and the focus moves on
    _label_key(driver, "7", ids[0], "MYO")
    for i in ids[1:]:
        _wait(lambda: driver.execute_script("return document.activeElement.dataset.id") == i, what=f"focus on {i}")
        _label_key(driver, "3", i, "LYT")
    _wait(lambda: "0 unidentified left" in driver.find_element(By.ID, "progress").text, what="progress")
    if shot is not None:
        driver.save_screenshot(str(shot))
    cells = httpx.get(url + "api/cells").json()
    assert all(c["seen"] for c in cells), "every cell is seen once shown"
    _keys(driver, "s")
    _keys(driver, Keys.ENTER)  # the specimen is still typed in; Enter submits the form
    _wait(lambda: "signed" in driver.find_element(By.TAG_NAME, "body").get_attribute("class"), what="signed page")
    assert specimen in driver.find_element(By.ID, "signed-note").text
    _keys(driver, "3")  # read-only now
    _wait(lambda: "read-only" in driver.find_element(By.ID, "alert").text, what="read-only note")
    return cells


def _check_signed(db, specimen: str, n_cells: int, tmp_path):
    with ReviewStore(db) as store:
        rnd = store.current_round()
        assert rnd["signed"] and rnd["specimen"] == specimen and rnd["reviewer"] == "Dr E2E"
        labels = [c["label"] for c in store.cells()]
        assert labels.count("MYO") == 1 and labels.count("LYT") == n_cells - 1
        trail = store.audit()
        assert len(trail) >= n_cells and {a["who"] for a in trail} == {"Dr E2E"}
        assert any(a["to_label"] == "MYO" for a in trail)
    assert main(["review", "export", str(db), "--out", str(tmp_path / "export")]) == 0
    table = pd.read_csv(tmp_path / "export" / "differential.csv").set_index("class")
    assert table.loc["MYO", "n_after"] == 1 and table.loc["LYT", "n_after"] == n_cells - 1
    assert set(table["specimen"]) == {specimen} and set(table["reviewer"]) == {"Dr E2E"}


def test_keyboard_round_in_chromium_on_a_synthetic_smear(run, tmp_path, driver, server):
    out = copy_run(run, tmp_path)
    _, url = server([str(out), "--reviewer", "Dr E2E"])
    shot = tmp_path / "gallery.png"
    cells = keyboard_round(driver, url, out / "review.sqlite", "E2E-SYN-1", shot=shot)
    assert shot.stat().st_size > 10_000
    print(f"gallery screenshot: {shot}")
    _check_signed(out / "review.sqlite", "E2E-SYN-1", len(cells), tmp_path)


def test_keyboard_round_in_chromium_on_a_real_bccd_field(run, tmp_path, driver, server, bccd_root):
    field = bccd_root / "JPEGImages" / "BloodImage_00000.jpg"
    out = screen_with(run["model"], [field], tmp_path / "bccd_screen", um_per_px=7.5 / 104)
    n = len(pd.read_csv(out / "cells.csv"))
    assert n >= 1, "the BCCD field has a leukocyte"
    _, url = server([str(out), "--reviewer", "Dr E2E"])
    keyboard_round(driver, url, out / "review.sqlite", "BCCD-00000", shot=tmp_path / "bccd_gallery.png")
    _check_signed(out / "review.sqlite", "BCCD-00000", n, tmp_path)


def test_a_decision_survives_sigkill_right_after_its_acknowledgement(run, tmp_path, server):
    out = copy_run(run, tmp_path)
    port = free_port()
    proc, url = server([str(out)], port)
    page = httpx.get(url).text
    csrf = re.search(r'name="csrf-token" content="([^"]+)"', page).group(1)
    cell = httpx.get(url + "api/cells").json()[0]
    r = httpx.post(url + f"api/cells/{cell['id']}/label", headers={"X-CSRF-Token": csrf},
                   json={"label": "PMO", "version": cell["version"], "reviewer": "Dr K"})
    assert r.status_code == 200
    proc.send_signal(signal.SIGKILL)  # no shutdown, no checkpoint: only what was committed survives
    assert proc.wait(10) == -signal.SIGKILL
    assert (out / "review.sqlite-wal").exists()  # the decision lives in the WAL, not yet checkpointed
    _, url2 = server(["--db", str(out / "review.sqlite")], port)
    again = httpx.get(url2 + f"api/cells/{cell['id']}").json()
    assert again["label"] == "PMO" and again["version"] == cell["version"] + 1
    assert [(a["to_label"], a["who"]) for a in httpx.get(url2 + "api/audit").json()] == [("PMO", "Dr K")]

