"""Cross-lab benchmark: frozen pretrained features + a linear head, on your labs.

For each backbone, scale policy and view setting: leave-one-lab-out zero-shot, the
adaptation curve (K labelled cells per class of the left-out lab) and in-domain
held-out balanced accuracy, with the wall time of each step. Features are extracted
once per image and cached under ``--out`` (``runs/`` is git-ignored).

    python benchmarks/crosslab.py                       # the five labs of ../shared/data
    python benchmarks/crosslab.py --lab mine=/data/mylab --lab pbc=../shared/data/pbc
    python benchmarks/crosslab.py --quick               # smoke run: few cells, one backbone

``--lab name=PATH[:prefix]`` (repeatable): any dataset ``leukoscope`` reads; ``prefix``
keeps the cells whose path inside PATH starts with it. The selection rule is declared in
docs/crosslab.md: mean over labs of the leave-one-lab-out balanced accuracy and of the
K = 10 accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from leukoscope.evaluate import crosslab as cl  # noqa: E402
from leukoscope.io import atomic_write_json, atomic_write_text  # noqa: E402
from leukoscope.models.registry import get_config  # noqa: E402

SHARED = Path(os.environ.get("LEUKOSCOPE_SHARED_DATA", ROOT.parent / "shared" / "data"))


def _subsample(table: pd.DataFrame, per_class: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(idx)[:per_class] for idx in table.groupby(["source", "label"]).indices.values()]
    return table.iloc[np.sort(np.concatenate(keep))].reset_index(drop=True)


def _fmt(m, sd=None) -> str:
    if m is None or not np.isfinite(m):
        return "–"
    return f"{m:.3f}" if sd is None or not np.isfinite(sd) else f"{m:.3f} ± {sd:.3f}"


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    labs = [cl.parse_lab(s) for s in args.lab] if args.lab else cl.default_labs(SHARED)
    t0 = time.perf_counter()
    table = cl.read_labs(labs)
    if args.max_per_class:
        table = _subsample(table, args.max_per_class)
    timings = {"read_labs": time.perf_counter() - t0}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = table.groupby(["source", "label"]).size().unstack(fill_value=0)
    result = {"labs": [vars(s) for s in labs], "cells": table.groupby("source").size().to_dict(),
              "qualifying_labs": cl.qualifying_labs(table), "sizes": sizes.to_dict(orient="index"),
              "variants": [], "timings": timings, "threads": args.threads,
              "command": " ".join([Path(sys.executable).name] + sys.argv)}
    print(f"labs: {result['cells']}; qualifying (>=20 cells in >=3 classes): {result['qualifying_labs']}", flush=True)
    ks = tuple(k for k in cl.KS if k <= args.max_k)
    lab_names = list(table["source"].unique())
    for scale in args.scale:
        images_cache = {}
        for name in args.backbones:
            cfg = get_config(name, input_size=args.input_size)
            for views in args.views:
                tag = f"{name}_{args.input_size}_{scale}_{views}" + (f"_max{args.max_per_class}" if args.max_per_class else "")
                cache = out / f"features_{tag}.npz"
                if args.lab_weight != 1:
                    tag += f"_labweight{args.lab_weight:g}"

                def compute(name=name, cfg=cfg, views=views):
                    if scale not in images_cache:
                        t = time.perf_counter()
                        images_cache[scale] = cl.prepare_images(table, args.input_size, scale=scale,
                                                                model_um_per_px=cfg.um_per_px)
                        timings[f"prepare_{scale}_{args.input_size}"] = time.perf_counter() - t
                        print(f"prepared {len(table)} cells ({scale}): "
                              f"{timings[f'prepare_{scale}_{args.input_size}']:.0f} s {images_cache[scale][1]}", flush=True)
                    imgs, info = images_cache[scale]
                    return cl.extract_features(name, imgs, dihedral=views == "dihedral"), info

                X, info = cl.cached_features(cache, table, compute)
                timings[f"features_{tag}"] = info["seconds"]
                print(f"{tag}: features {X.shape} in {info['seconds']:.0f} s"
                      f"{' (cached)' if info.get('cached') else ''}", flush=True)
                t = time.perf_counter()
                lolo = cl.leave_one_lab_out(X, table, C=args.C)
                t_lolo = time.perf_counter() - t
                t = time.perf_counter()
                curve = cl.adaptation_curve(X, table, ks=ks, draws=args.draws, C=args.C, lab_weight=args.lab_weight)
                t_curve = time.perf_counter() - t
                t = time.perf_counter()
                indom = (cl.in_domain(X, table, lab=args.in_domain_lab, C=args.C)
                         if args.in_domain_lab in lab_names else None)
                t_in = time.perf_counter() - t
                sel = cl.selection_score(lolo, curve, k=min(10, max(ks)))
                v = {"tag": tag, "backbone": name, "input_size": args.input_size, "scale": scale, "views": views,
                     "feature_dim": int(X.shape[1]), "features_file": str(cache), "selection": sel, "lolo": lolo.to_dict(orient="records"),
                     "curve": cl.summarize_curve(curve).to_dict(orient="records"),
                     "curve_draws": curve.to_dict(orient="records"), "in_domain": indom,
                     "seconds": {"features": info["seconds"], "lolo": t_lolo, "curve": t_curve, "in_domain": t_in}}
                result["variants"].append(v)
                print(f"{tag}: score {sel['score']:.3f} (LOLO bal.acc {sel['lolo_balanced_accuracy']:.3f}, "
                      f"K=10 acc {sel[next(k for k in sel if k.startswith('k'))]:.3f}); in-domain "
                      f"{indom['balanced_accuracy'] if indom else float('nan'):.3f}; "
                      f"probes {t_lolo + t_curve + t_in:.0f} s", flush=True)
                atomic_write_json(result, out / f"results{args.suffix}.json")
    if result["variants"]:  # the per-class errors of the variant the rule selects, zero-shot on each lab
        best = max(result["variants"], key=lambda v: v["selection"]["score"])
        with np.load(best["features_file"], allow_pickle=False) as z:
            X = z["X"]
        result["best"] = best["tag"]
        result["best_per_class_errors"] = pd.concat(
            [cl.per_class_errors(X, table, lab, C=args.C) for lab in lab_names]).to_dict(orient="records")
        atomic_write_json(result, out / f"results{args.suffix}.json")
    atomic_write_text(markdown(result), out / f"results{args.suffix}.md")
    return result


def markdown(result: dict) -> str:
    """The result tables (one per protocol) as Markdown."""
    lines = ["### Selection score (declared rule)", "",
             "| variant | LOLO bal. acc (mean over labs) | K=10 acc (mean over labs) | score | in-domain bal. acc |",
             "|---|---|---|---|---|"]
    for v in result["variants"]:
        s, kkey = v["selection"], next(k for k in v["selection"] if k.startswith("k"))
        lines.append(f"| {v['tag']} | {_fmt(s['lolo_balanced_accuracy'])} | {_fmt(s[kkey])} | {_fmt(s['score'])} "
                     f"| {_fmt(v['in_domain']['balanced_accuracy']) if v['in_domain'] else '–'} |")
    for v in result["variants"]:
        lines += ["", f"### {v['tag']}", "", "Leave-one-lab-out (zero-shot, classes the other labs know):", "",
                  "| lab | n | accuracy | balanced accuracy | cells of unknown classes |", "|---|---|---|---|---|"]
        for r in v["lolo"]:
            lines.append(f"| {r['lab']} | {r['n']} | {_fmt(r['accuracy'])} | {_fmt(r['balanced_accuracy'])} "
                         f"| {r['n_unknown_class']} |")
        curve = pd.DataFrame(v["curve"])
        ks = sorted(curve["k"].unique())
        lines += ["", "Adaptation curve, accuracy on the lab's remaining cells (mean ± sd over draws):", "",
                  "| lab | " + " | ".join(f"K={k}" for k in ks) + " |", "|---" * (len(ks) + 1) + "|"]
        for lab, g in curve.groupby("lab", sort=False):
            g = g.set_index("k")
            lines.append(f"| {lab} | " + " | ".join(_fmt(g.loc[k, "accuracy"], g.loc[k, "accuracy_sd"]) for k in ks)
                         + " |")
        lines.append("")
        lines.append("Wall time (s): " + ", ".join(f"{k} {s:.0f}" for k, s in v["seconds"].items()))
    if result.get("best_per_class_errors"):
        lines += ["", f"### Per-class errors of the selected variant ({result['best']}), zero-shot on each lab", "",
                  "| lab | class | n | recall | most frequent wrong answer (share) |", "|---|---|---|---|---|"]
        for r in result["best_per_class_errors"]:
            wrong = f"{r['top_error']} ({r['top_error_share']:.2f})" if r["top_error"] else "–"
            lines.append(f"| {r['lab']} | {r['class']} | {r['n']} | {_fmt(r['recall'])} | {wrong} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lab", action="append", default=[], metavar="NAME=PATH[:PREFIX]",
                   help="a lab (repeatable); default: the five labs of ../shared/data")
    p.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "efficientnet_lite2", "mobilenet_v2"])
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--scale", nargs="+", default=["resize", "physical"], choices=["resize", "physical"])
    p.add_argument("--views", nargs="+", default=["single"], choices=["single", "dihedral"])
    p.add_argument("--draws", type=int, default=3)
    p.add_argument("--max-k", type=int, default=20)
    p.add_argument("--C", type=float, default=1.0, help="inverse L2 strength of the logistic regression")
    p.add_argument("--lab-weight", type=float, default=1.0,
                   help="weight of each of the left-out lab's K labelled cells in the adaptation fit")
    p.add_argument("--in-domain-lab", default="pbc")
    p.add_argument("--max-per-class", type=int, default=0, help="at most this many cells per lab and class")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--suffix", default="", help="results{SUFFIX}.json/.md: keeps several runs' results apart")
    p.add_argument("--out", default=str(ROOT / "runs" / "crosslab"))
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 6 cells per lab and class, one backbone at 64 px, K <= 3, one draw")
    args = p.parse_args(argv)
    if args.quick:
        args.max_per_class, args.backbones, args.input_size = 6, args.backbones[:1], 64
        args.max_k, args.draws, args.scale, args.views = 3, 1, ["resize"], ["single"]
        args.out = str(Path(args.out).with_name(Path(args.out).name + "_quick"))
    res = run(args)
    print(f"results: {Path(args.out) / f'results{args.suffix}.md'}")
    return res


if __name__ == "__main__":
    main()
