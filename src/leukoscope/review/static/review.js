// LeukoScope review station: keyboard review of the gallery over the JSON API (see review/app.py).
"use strict";
(function () {
  const CSRF = document.querySelector('meta[name="csrf-token"]').content;
  const LABELS = JSON.parse(document.getElementById("labels").textContent);
  const KEYS = {};
  for (const [lab, v] of Object.entries(LABELS)) KEYS[v.key] = lab;
  const signed = document.body.classList.contains("signed");
  const tiles = Array.from(document.querySelectorAll(".tile"));
  let current = -1;
  let state = JSON.parse(document.getElementById("initial-state").textContent);

  const $ = (id) => document.getElementById(id);
  function say(msg) { $("status").textContent = msg; }
  function alarm(msg) { $("alert").textContent = msg; }
  function reviewer() { const r = $("reviewer"); return r ? r.value.trim() : ""; }

  async function post(url, body) {
    const r = await fetch(url, {method: "POST", headers: {"Content-Type": "application/json", "X-CSRF-Token": CSRF},
                                body: JSON.stringify(body), credentials: "same-origin"});
    let data = {};
    try { data = await r.json(); } catch (e) { data = {error: r.statusText}; }
    return {ok: r.ok, status: r.status, data: data};
  }

  // ---------------------------------------------------------------- differential
  function fmtPct(x) { return x === null || x === undefined ? "n/a" : (100 * x).toFixed(1) + "%"; }
  function render(st) {
    state = st;
    const d = st.differential, a = d.after, b = d.before;
    const tb = document.querySelector("#differential tbody");
    tb.innerHTML = "";
    for (const c of d.order) {
      const r = a.differential[c];
      const tr = document.createElement("tr");
      if (c === "MYO" || c === "MOB") tr.className = "blast";
      const cells = [LABELS[c].key, c + " " + LABELS[c].name, b.differential[c].n, r.n, fmtPct(r.fraction),
                     r.ci[0] === null ? "n/a" : fmtPct(r.ci[0]) + "–" + fmtPct(r.ci[1])];
      for (const v of cells) { const td = document.createElement("td"); td.textContent = v; tr.appendChild(td); }
      tb.appendChild(tr);
    }
    const pct = a.blast_pct === null ? "n/a" : a.blast_pct.toFixed(1) + "% (95% CI " + a.blast_pct_ci[0].toFixed(1) +
      "–" + a.blast_pct_ci[1].toFixed(1) + "%)";
    $("blast-line").textContent = "Blasts (MYO+MOB) " + pct + " of " + a.identified + " identified leukocytes; " +
      a.unidentified + " unidentified; before review " + (b.blast_pct === null ? "n/a" : b.blast_pct.toFixed(1) + "%") + ".";
    const fl = $("flags"); fl.innerHTML = "";
    for (const f of a.flag_text) { const li = document.createElement("li"); li.textContent = f; fl.appendChild(li); }
    $("excluded").textContent = "Not counted: " + d.excluded.not_leukocyte + " not a leukocyte, " + d.excluded.artefact +
      " artefact; " + d.changed + " call(s) changed by review.";
    const p = st.progress;
    if ($("progress")) $("progress").textContent = "Seen " + p.seen + " of " + p.cells + " cells; " + p.unidentified +
      " unidentified left.";
  }
  async function refresh() {
    const r = await fetch("api/state", {credentials: "same-origin"});
    if (r.ok) render(await r.json());
  }

  // ---------------------------------------------------------------- seen
  let pendingSeen = new Set(), seenTimer = null;
  function markSeen(tile) {
    if (signed || tile.dataset.seen === "1") return;
    tile.dataset.seen = "1";
    tile.classList.add("seen");
    pendingSeen.add(Number(tile.dataset.id));
    clearTimeout(seenTimer);
    seenTimer = setTimeout(flushSeen, 250);
  }
  async function flushSeen() {
    if (!pendingSeen.size) return;
    const ids = Array.from(pendingSeen); pendingSeen = new Set();
    const r = await post("api/seen", {ids: ids});
    if (r.ok) { state.progress = r.data.progress; render(state); }
    else { for (const id of ids) { const t = $("cell-" + id); t.dataset.seen = "0"; t.classList.remove("seen"); }
           alarm(r.data.error || "could not record seen cells"); }
  }
  if ("IntersectionObserver" in window) {
    const io = new IntersectionObserver((entries) => {
      for (const e of entries) if (e.isIntersecting) markSeen(e.target);
    }, {threshold: 0.6});
    tiles.forEach((t) => io.observe(t));
  }

  // ---------------------------------------------------------------- navigation
  function focusTile(i) {
    if (!tiles.length) return;
    i = Math.max(0, Math.min(tiles.length - 1, i));
    if (current >= 0) tiles[current].classList.remove("current");
    current = i;
    const t = tiles[i];
    t.classList.add("current");
    t.focus({preventScroll: true});
    t.scrollIntoView({block: "nearest"});
    markSeen(t);
    if (!$("details").hidden) showDetails();
  }
  function vertical(dir) {
    if (current < 0) return focusTile(0);
    const r0 = tiles[current].getBoundingClientRect(), cx = r0.left + r0.width / 2;
    let best = -1, bestScore = Infinity;
    tiles.forEach((t, i) => {
      const r = t.getBoundingClientRect();
      const dy = dir > 0 ? r.top - r0.bottom : r0.top - r.bottom;
      if (dy < -2) return;
      const score = dy * 10 + Math.abs(r.left + r.width / 2 - cx);
      if (score < bestScore) { bestScore = score; best = i; }
    });
    if (best >= 0) focusTile(best);
  }
  function nextUnseen() {
    for (let k = 1; k <= tiles.length; k++) {
      const i = (current + k + tiles.length) % tiles.length;
      if (tiles[i].dataset.seen !== "1") return focusTile(i);
    }
    say("every cell has been seen");
  }

  // ---------------------------------------------------------------- decisions
  async function reclassify(label) {
    document.body.dataset.busy = "1";   // until the answer is shown (tests wait on it)
    try { await saveLabel(label); } finally { document.body.dataset.busy = "0"; }
  }
  async function saveLabel(label) {
    if (current < 0) return focusTile(0);
    const t = tiles[current];
    const who = reviewer();
    if (!who) { alarm("enter your name in the Reviewer field first"); $("reviewer").focus(); return; }
    const r = await post("api/cells/" + t.dataset.id + "/label",
                         {label: label, version: Number(t.dataset.version), reviewer: who});
    if (r.ok) {
      t.dataset.label = r.data.label; t.dataset.version = r.data.version;
      t.querySelector(".call").textContent = r.data.label;
      t.classList.toggle("changed", r.data.label !== JSON.parse(t.querySelector(".data").textContent).model_call);
      say("cell " + t.dataset.id + ": " + r.data.from + " → " + r.data.label);
      alarm("");
      await refresh();
      focusTile(current + 1);
    } else {
      alarm("Not saved (" + r.status + "): " + (r.data.error || "error"));
      if (r.status === 409) {   // show what the other tab decided
        const c = await fetch("api/cells/" + t.dataset.id, {credentials: "same-origin"});
        if (c.ok) { const cell = await c.json(); t.dataset.version = cell.version; t.dataset.label = cell.label;
                    t.querySelector(".call").textContent = cell.label; }
      }
    }
  }

  // ---------------------------------------------------------------- details
  function showDetails() {
    if (current < 0) return;
    const t = tiles[current], id = t.dataset.id, data = JSON.parse(t.querySelector(".data").textContent);
    $("details").hidden = false;
    $("details-title").textContent = "Cell " + id + ": " + t.dataset.label + " (model " + data.model_call + ")";
    $("d-crop").src = "api/cells/" + id + "/crop.png";
    $("d-input").src = "api/cells/" + id + "/input.png";
    $("d-saliency").src = "api/cells/" + id + "/saliency.png";
    $("d-field").src = "api/cells/" + id + "/field.jpg";
    const ol = $("d-top3"); ol.innerHTML = "";
    for (const [c, p] of data.top3) {
      const li = document.createElement("li"); li.textContent = c + " " + (LABELS[c] ? LABELS[c].name : "") + ": " + fmtPct(p);
      ol.appendChild(li);
    }
  }
  function hideDetails() { $("details").hidden = true; if (current >= 0) tiles[current].focus({preventScroll: true}); }
  $("close-details").addEventListener("click", hideDetails);
  for (const [id, alt] of [["d-input", "model input unavailable"], ["d-saliency", "saliency unavailable"],
                           ["d-field", "no smear field (single-cell image)"]]) {
    $(id).addEventListener("error", () => { $(id).removeAttribute("src"); $(id).alt = alt; });
  }

  // ---------------------------------------------------------------- sign-off and rounds
  const form = $("signoff");
  if (form) form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    await flushSeen();
    const r = await post("api/signoff", {reviewer: reviewer(), specimen: $("specimen").value, comment: $("comment").value});
    if (r.ok) { say("signed off"); location.reload(); }
    else alarm("Sign-off refused: " + (r.data.error || r.status));
  });
  const nr = $("new-round");
  if (nr) nr.addEventListener("click", async () => {
    const r = await post("api/rounds", {reviewer: reviewer()});
    if (r.ok) location.reload(); else alarm(r.data.error || "could not start a new round");
  });

  tiles.forEach((t, i) => t.addEventListener("click", () => focusTile(i)));
  tiles.forEach((t, i) => t.addEventListener("dblclick", () => { focusTile(i); showDetails(); }));

  document.addEventListener("keydown", (ev) => {
    const tag = (ev.target.tagName || "").toLowerCase();
    if (tag === "input" || tag === "textarea" || tag === "button" || tag === "a") {
      if (ev.key === "Escape") { ev.target.blur(); focusTile(Math.max(current, 0)); }
      return;
    }
    if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
    const k = ev.key;
    if (k === "ArrowRight") focusTile(current + 1);
    else if (k === "ArrowLeft") focusTile(current - 1);
    else if (k === "ArrowDown") vertical(1);
    else if (k === "ArrowUp") vertical(-1);
    else if (k === "Home") focusTile(0);
    else if (k === "End") focusTile(tiles.length - 1);
    else if (k === ".") nextUnseen();
    else if (k === "Enter" || k === " ") { if ($("details").hidden) showDetails(); else hideDetails(); }
    else if (k === "Escape") hideDetails();
    else if (k === "s") { const f = $("specimen") || $("new-round"); if (f) f.focus(); }
    else if (KEYS[k.toLowerCase()] !== undefined && !signed) reclassify(KEYS[k.toLowerCase()]);
    else if (KEYS[k.toLowerCase()] !== undefined && signed) { alarm("this round is signed off and read-only"); }
    else return;
    ev.preventDefault();
  });

  render(state);
  if (tiles.length) focusTile(0);
})();
