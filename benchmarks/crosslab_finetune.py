"""Cross-lab benchmark, phase 2: fine-tuned multi-lab models and ``leukoscope adapt``, on your labs.

The protocol is declared in docs/crosslab.md ("Phase 2 (fine-tuning)"). Per variant (``S``:
the ``robust`` preset from scratch at a reduced budget; ``P``: ImageNet-pretrained MobileNetV2
with the ``pretrained`` preset's schedule), jobs run in a fixed order and every finished job is
appended to ``results.json`` at once (a stopped run keeps what it finished; a rerun skips it):

1. ``lolo``: for each lab L, :func:`leukoscope.train.train` on the other labs (multi-lab,
   ``balance_by="source_class"``), scored zero-shot on L's cells of the classes it knows
   (accuracy, balanced accuracy, per-class recall and top error); a model that saw PBC is
   also scored on the held-out 20 % of PBC (in-domain);
2. ``adapt``: :func:`leukoscope.train.adapt.adapt` of the LOLO model with K cells per class of L
   (:func:`leukoscope.evaluate.crosslab.draw_kshot`, capped at n_c - 1), replaying 50 cells per
   class of the model's own training table, scored on L's remaining cells;
3. ``indomain``: one model on PBC's training share alone, scored on the held-out 20 %.

PBC's held-out 20 % (stratified, seed 0) is in no training and no K-shot draw. Each image is
decoded once per variant (the labs' µm/px estimated from the red cells per lab, as ``train``
does) and the models are scored on those same prepared images.

    python benchmarks/crosslab_finetune.py --variants S P          # the five labs of ../shared/data
    python benchmarks/crosslab_finetune.py --quick                 # smoke run (tiny, ~minutes)
    python benchmarks/crosslab_finetune.py --probe                 # training speed per input size
    python benchmarks/crosslab_finetune.py --report                # Markdown tables of results.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import train_test_split

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from crosslab import _subsample  # noqa: E402  (phase 1's cap per lab and class: the same cells)
from leukoscope.evaluate import crosslab as cl  # noqa: E402
from leukoscope.io import atomic_write_json, atomic_write_text  # noqa: E402
from leukoscope.models.bundle import load_bundle  # noqa: E402
from leukoscope.models.registry import create_model  # noqa: E402
from leukoscope.train import preset, train  # noqa: E402
from leukoscope.train.adapt import adapt  # noqa: E402
from leukoscope.train.cache import build_cache  # noqa: E402
from leukoscope.train.loop import resolve_training_scale  # noqa: E402

SHARED = Path(os.environ.get("LEUKOSCOPE_SHARED_DATA", ROOT.parent / "shared" / "data"))


def variant_config(name: str, args, seed: int = 0):
    """The TrainConfig of variant S (robust, reduced budget) or P (pretrained MobileNetV2)."""
    common = dict(balance_by="source_class", ood_reference=False, seed=seed)
    if name == "S":
        return preset("robust", epochs=args.s_epochs, per_class=args.s_per_class, **common)
    if name == "P":
        return preset("pretrained", model="mobilenet_v2", input_size=args.p_size, epochs=args.p_epochs,
                      per_class=args.p_per_class, **common)
    raise ValueError(f"unknown variant {name!r} (S or P)")


def probe(args) -> None:
    """Seconds per training step (forward + backward, batch of the preset) per model and input size."""
    for model, sizes, bs, pre in (("mobilenet_v3_small", [128], 64, False), ("mobilenet_v2", args.probe_sizes, 32, True)):
        for s in sizes:
            net = create_model(model, num_classes=13, input_size=s, pretrained=pre).train()
            opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
            x, y = torch.randn(bs, 3, s, s), torch.randint(0, 13, (bs,))
            times = []
            for _ in range(4):
                t = time.perf_counter()
                opt.zero_grad()
                torch.nn.functional.cross_entropy(net(x), y).backward()
                opt.step()
                times.append(time.perf_counter() - t)
            step = float(np.median(times[1:]))
            print(f"{model} {s}px batch {bs}: {step:.2f} s/step = {bs / step:.0f} img/s", flush=True)


class Results:
    """``results.json``: a list of job records, written atomically after each job."""

    def __init__(self, path: Path):
        self.path = path
        self.rows = json.loads(path.read_text())["jobs"] if path.exists() else []

    def done(self, key: str) -> bool:
        return any(r["key"] == key for r in self.rows)

    def add(self, row: dict) -> None:
        self.rows.append(row)
        atomic_write_json({"jobs": self.rows}, self.path)


def per_class(y_true, y_pred) -> list[dict]:
    """Per true class: n, recall, most frequent wrong answer and its share of the class."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    out = []
    for c in sorted(set(y_true)):
        p = y_pred[y_true == c]
        wrong = pd.Series(p[p != c]).value_counts()
        out.append({"class": c, "n": int(len(p)), "recall": float((p == c).mean()),
                    "top_error": str(wrong.index[0]) if len(wrong) else "",
                    "top_error_share": float(wrong.iloc[0] / len(p)) if len(wrong) else 0.0})
    return out


def score_bundle(bundle_path, cache, table: pd.DataFrame) -> dict:
    """Scores of a bundle on ``table``'s cells of the classes it knows, from the prepared ``cache``."""
    b = load_bundle(bundle_path)
    known = table[table["label"].isin(b.classes)]
    if known.empty:
        return {**cl.scores([], []), "per_class": [], "n_unknown_class": int(len(table))}
    x = cache.images[torch.as_tensor(cache.rows(known["path"]))].numpy()
    pred = np.asarray(b.classes)[b.predict_proba_prepared(x).argmax(1)]
    return {**cl.scores(known["label"], pred), "per_class": per_class(known["label"], pred),
            "n_unknown_class": int(len(table) - len(known))}


def job_order(args, names: list[str], has_pbc: bool) -> list[tuple]:
    """The declared order: ``(variant, protocol, lab, K, draw)``. Per variant and lab (the
    qualifying labs first), the LOLO model and then its K = 10 adaptation (draw 0); then the
    other draws; then the in-domain PBC-alone models; then the other K of the curve
    (``--curve-variants`` on ``--curve-labs``)."""
    first = [n for n in ("pbc", "jiangxi") if n in names]
    labs = first + [n for n in names if n not in first]
    if args.only_labs:  # the jobs of these labs only (every lab still trains the others' LOLO models)
        unknown = sorted(set(args.only_labs) - set(names))
        if unknown:
            raise SystemExit(f"--only-labs: no lab named {', '.join(unknown)} (labs: {', '.join(names)})")
        labs = [n for n in labs if n in args.only_labs]
    jobs = []
    for v in args.variants:
        for lab in labs:
            jobs += [(v, "lolo", lab, 0, 0)] + [(v, "adapt", lab, k, 0) for k in args.ks]
    for v in args.variants:
        jobs += [(v, "adapt", lab, k, d) for d in range(1, args.draws) for lab in labs for k in args.ks]
    if args.indomain and has_pbc:
        jobs += [(v, "indomain", args.in_domain_lab, 0, 0) for v in args.variants]
    for v in args.curve_variants or []:
        jobs += [(v, "adapt", lab, k, d) for lab in args.curve_labs for k in args.curve_ks if k not in args.ks
                 for d in range(args.draws)]
    return jobs


def run(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = Results(out / "results.json")
    log_lines = open(out / "train_log.txt", "a")

    def quiet(msg: str) -> None:  # the library's progress lines go to a file, not the console
        log_lines.write(msg + "\n")
        log_lines.flush()

    labs = [cl.parse_lab(s) for s in args.lab] if args.lab else cl.default_labs(SHARED)
    table = cl.read_labs(labs)
    if args.max_per_class:
        table = _subsample(table, args.max_per_class)
    names = list(pd.unique(table["source"]))
    pbc = np.flatnonzero(table["source"].to_numpy() == args.in_domain_lab)
    held = np.zeros(len(table), bool)
    if len(pbc):
        _, te = train_test_split(pbc, test_size=0.2, stratify=table["label"].to_numpy()[pbc], random_state=0)
        held[te] = True
    print(f"labs {table.groupby('source').size().to_dict()}; held out of every training: {held.sum()} "
          f"{args.in_domain_lab} cells", flush=True)
    prepared: dict = {}

    def prepare(vname: str):
        """The variant's config and every cell decoded once at its input (µm/px estimated per lab)."""
        if vname not in prepared:
            cfg = variant_config(vname, args).resolved()
            t0 = time.perf_counter()
            scaled, record = resolve_training_scale(table, cfg.scale, log=quiet)  # per lab, as train does
            model_um = cfg.um_per_px if scaled["um_per_px"].notna().any() else None
            cache = build_cache(scaled, cfg.input_size, model_um, white_balance=cfg.white_balance)
            t_cache = time.perf_counter() - t0
            print(f"[{vname}] decoded {len(cache)} cells at {cfg.input_size}px in {t_cache:.0f} s; µm/px per lab "
                  f"{ {s: v.get('um_per_px') for s, v in record['sources'].items()} }", flush=True)
            prepared[vname] = (cfg, scaled, record, cache, t_cache)
        return prepared[vname]

    for vname, kind, lab, k, d in job_order(args, names, bool(len(pbc))):
        key = f"{vname}/{kind}/{lab}/k{k}/d{d}"
        if res.done(key):
            continue
        cfg, scaled, record, cache, t_cache = prepare(vname)
        li = names.index(lab)
        in_lab = (scaled["source"] == lab).to_numpy()
        run_dir = out / vname / f"lolo_{lab}"
        tr_table = scaled[~in_lab & ~held]
        row = {"key": key, "variant": vname, "protocol": kind, "lab": lab, "k": k, "draw": d,
               "config": cfg.to_dict(), "seconds_decode": t_cache}
        t = time.perf_counter()
        if kind == "indomain":
            run_dir = out / vname / "pbc_alone"
            tr_table = scaled[in_lab & ~held]
        if kind in ("lolo", "indomain") or not (run_dir / "model.safetensors").exists():
            if kind == "adapt":  # the LOLO model is the parent: make sure it exists
                print(f"[{key}] parent missing, skipped", flush=True)
                continue
            r = train(tr_table, run_dir, cfg, cache=cache, progress=False, log=quiet,
                      training_scale=record)
            row["seconds_train"] = time.perf_counter() - t
            row["epochs_run"] = int(len(r.log)) if r.log is not None else None
        if kind == "lolo":
            row["zero_shot"] = score_bundle(run_dir / "model.safetensors", cache, scaled[in_lab])
            if len(pbc) and lab != args.in_domain_lab:
                row["heldout_pbc"] = score_bundle(run_dir / "model.safetensors", cache, scaled[held])
        elif kind == "indomain":
            row["heldout_pbc"] = score_bundle(run_dir / "model.safetensors", cache, scaled[held])
        else:
            lab_rows = np.flatnonzero(in_lab & ~held)
            rng = np.random.default_rng([0, li, k, d])  # phase 1's draws
            shots = lab_rows[cl.draw_kshot(scaled["label"].to_numpy()[lab_rows], k, rng)]
            rest = np.setdiff1d(np.flatnonzero(in_lab), shots)
            t = time.perf_counter()
            adapt_dir = out / vname / f"adapt_{lab}_k{k}_d{d}"
            shutil.rmtree(adapt_dir, ignore_errors=True)  # a run stopped mid-adaptation: start it again
            a = adapt(run_dir / "model.safetensors", scaled.iloc[shots], adapt_dir,
                      replay_table=tr_table, replay_per_class=args.replay, seed=d, log=quiet)
            row["seconds_adapt"] = time.perf_counter() - t
            row["n_shots"] = int(len(shots))
            row["k_per_class"] = a.lineage["k_per_class"]
            row["new_classes"] = a.lineage["new_classes"]
            row["adapted"] = score_bundle(a.bundle_path, cache, scaled.iloc[rest])
        res.add(row)
        z = row.get("zero_shot") or row.get("adapted") or row.get("heldout_pbc")
        print(f"[{key}] acc {z['accuracy']:.3f} bal.acc {z['balanced_accuracy']:.3f} on {z['n']} cells"
              + (f"; held-out PBC bal.acc {row['heldout_pbc']['balanced_accuracy']:.3f}"
                 if "heldout_pbc" in row and kind == "lolo" else "")
              + f"; train {row.get('seconds_train', 0):.0f} s adapt {row.get('seconds_adapt', 0):.0f} s",
              flush=True)
    atomic_write_text(report(res.rows), out / "results.md")


def _ms(v) -> str:
    v = [x for x in v if x is not None and np.isfinite(x)]
    if not v:
        return "–"
    return f"{np.mean(v):.3f}" + (f" ± {np.std(v, ddof=1):.3f}" if len(v) > 1 else "")


def report(rows: list[dict]) -> str:
    """Markdown tables of the job records: per variant LOLO (with held-out PBC), adaptation, the
    selection score (only over all labs that finished both protocols) and wall times; then the
    per-class zero-shot errors of the variant with the best score (else the first variant)."""
    df = pd.DataFrame(rows)
    if df.empty:
        return "no results\n"
    lines, scores_ = [], {}
    for v, g in df.groupby("variant", sort=False):
        lolo = g[g["protocol"] == "lolo"]
        lines += [f"### Variant {v}", "", "Leave-one-lab-out zero-shot (classes the model knows), held-out PBC of "
                  "the same model:", "", "| lab | n | accuracy | balanced accuracy | unknown-class cells "
                  "| held-out PBC bal. acc | train s |", "|---|---|---|---|---|---|---|"]
        for r in lolo.itertuples():
            z, h = r.zero_shot, getattr(r, "heldout_pbc", None)
            h = f"{h['balanced_accuracy']:.3f}" if isinstance(h, dict) else "–"
            lines.append(f"| {r.lab} | {z['n']} | {z['accuracy']:.3f} | {z['balanced_accuracy']:.3f} "
                         f"| {z['n_unknown_class']} | {h} | {r.seconds_train:.0f} |")
        hp = [x["balanced_accuracy"] for x in lolo.get("heldout_pbc", pd.Series(dtype=object)) if isinstance(x, dict)]
        lines += ["", f"Held-out PBC balanced accuracy of the LOLO models that include PBC: {_ms(hp)} (n = {len(hp)})"]
        for r in g[g["protocol"] == "indomain"].itertuples():
            lines.append(f"; PBC-alone model: {r.heldout_pbc['balanced_accuracy']:.3f} "
                         f"(accuracy {r.heldout_pbc['accuracy']:.3f}, train {r.seconds_train:.0f} s)")
        ad = g[g["protocol"] == "adapt"]
        if len(ad):
            ad = ad.assign(acc=[a["accuracy"] for a in ad["adapted"]],
                           bacc=[a["balanced_accuracy"] for a in ad["adapted"]])
            lines += ["", "Adaptation (`adapt`, K cells per class of the lab), scored on the lab's other cells:", "",
                      "| lab | K | draws | shots | scored | accuracy | balanced accuracy | adapt s (mean) |",
                      "|---|---|---|---|---|---|---|---|"]
            for (lab, k), a in ad.sort_values(["lab", "k"]).groupby(["lab", "k"], sort=False):
                lines.append(f"| {lab} | {k} | {len(a)} | {a['n_shots'].mean():.0f} "
                             f"| {np.mean([x['n'] for x in a['adapted']]):.0f} | {_ms(a['acc'])} | {_ms(a['bacc'])} "
                             f"| {a['seconds_adapt'].mean():.0f} |")
            kk = 10 if (ad["k"] == 10).any() else int(ad["k"].max())  # the rule's K = 10 (--quick: its K)
            k10 = ad[ad["k"] == kk].groupby("lab")["acc"].mean()
            zero = lolo.set_index("lab")["zero_shot"].map(lambda z: z["balanced_accuracy"])
            both = sorted(set(k10.index) & set(zero.index))
            if both:
                sc = (zero[both].mean() + k10[both].mean()) / 2
                lines += ["", f"Selection score over the {len(both)} labs with both protocols ({', '.join(both)}): "
                          f"LOLO bal. acc {zero[both].mean():.3f}, K = {kk} acc {k10[both].mean():.3f}, "
                          f"**score {sc:.3f}**" + ("" if len(both) == 5 else " (incomplete: not comparable by the rule)")]
                if len(both) == 5:
                    scores_[v] = sc
        lines.append("")
    best = max(scores_, key=scores_.get) if scores_ else df["variant"].iloc[0]
    lolo = df[(df["variant"] == best) & (df["protocol"] == "lolo")]
    lines += [f"### Per-class errors of variant {best}, zero-shot on each lab", "",
              "| lab | class | n | recall | most frequent wrong answer (share of the class) |", "|---|---|---|---|---|"]
    for r in lolo.itertuples():
        for c in r.zero_shot["per_class"]:
            wrong = f"{c['top_error']} ({c['top_error_share']:.2f})" if c["top_error"] else "–"
            lines.append(f"| {r.lab} | {c['class']} | {c['n']} | {c['recall']:.3f} | {wrong} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lab", action="append", default=[], metavar="NAME=PATH[:PREFIX]")
    p.add_argument("--variants", nargs="+", default=["S", "P"], choices=["S", "P"])
    p.add_argument("--ks", nargs="+", type=int, default=[10])
    p.add_argument("--only-labs", nargs="+", metavar="LAB",
                   help="run only the jobs of these labs (LOLO, adaptation, curve); the others still train them")
    p.add_argument("--draws", type=int, default=3)
    p.add_argument("--curve-variants", nargs="*", default=[], choices=["S", "P"],
                   help="variants whose full adaptation curve runs last")
    p.add_argument("--curve-labs", nargs="*", default=["pbc", "jiangxi"])
    p.add_argument("--curve-ks", nargs="+", type=int, default=[1, 3, 5, 20])
    p.add_argument("--replay", type=int, default=50, help="replayed cells per class of the parent's training table")
    p.add_argument("--indomain", action="store_true", help="also a model on PBC's training share alone")
    p.add_argument("--in-domain-lab", default="pbc")
    p.add_argument("--max-per-class", type=int, default=200)
    p.add_argument("--s-epochs", type=int, default=6)
    p.add_argument("--s-per-class", type=int, default=200)
    p.add_argument("--p-size", type=int, default=160)
    p.add_argument("--p-epochs", type=int, default=3)
    p.add_argument("--p-per-class", type=int, default=100)
    p.add_argument("--out", default=str(ROOT / "runs" / "crosslab_ft"))
    p.add_argument("--probe", action="store_true", help="training seconds per step per input size, then exit")
    p.add_argument("--probe-sizes", nargs="+", type=int, default=[128, 160, 224])
    p.add_argument("--report", action="store_true", help="print the tables of OUT/results.json, then exit")
    p.add_argument("--quick", action="store_true", help="smoke run: 4 cells per lab and class, 1 epoch, tiny budgets")
    args = p.parse_args(argv)
    if args.probe:
        return probe(args)
    if args.report:
        print(report(json.loads((Path(args.out) / "results.json").read_text())["jobs"]))
        return None
    if args.quick:
        args.max_per_class, args.s_epochs, args.s_per_class, args.p_epochs, args.p_per_class = 5, 1, 8, 1, 4
        args.p_size, args.draws, args.replay, args.ks = 96, 1, 3, [2]
        args.out = str(Path(args.out).with_name(Path(args.out).name + "_quick"))
    return run(args)


if __name__ == "__main__":
    main()
