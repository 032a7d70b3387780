"""``leukoscope report RUN``: Table 1, metrics with CIs, confusion, ROCs, human comparison, one HTML page."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from leukoscope.cli._common import add_device, add_progress, check_out_dir, fmt, nonneg_int, progress_on
from leukoscope.report.build import make_report

NAME = "report"
HELP = "evaluation report of a cross-validation run: tables, figures, metrics.json and report.html"
DESCRIPTION = (
    "Read RUN/predictions.csv (from `leukoscope cv`) and write into DIR (default RUN/report): table1.csv "
    "(per-class precision, sensitivity, specificity, mean and sd over folds), confusion.csv/.png, binary.json "
    "and roc_blast.png / roc_atypical.png (the blast and atypical questions), reliability.png, saliency maps "
    "from the fold models (RUN/fold{K}/model.safetensors) in DIR/saliency/, metrics.json with every number, "
    "and report.html, one self-contained page. With --annotations, the examiners' re-annotations are drawn "
    "on the ROC plots and compared with the model on the images both saw. A predictions.csv whose row count "
    "differs from the run's cv_summary.json, or with images not in its split.csv, is refused (truncated or edited)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run folder holding predictions.csv (and config.json, fold*/model.safetensors)")
    p.add_argument("--annotations", metavar="FILE", help="LMU annotations.dat with the examiners' re-annotations")
    p.add_argument("--out", metavar="DIR", help="output folder (default RUN/report)")
    p.add_argument("--saliency-per-class", type=nonneg_int, default=2, metavar="N",
                   help="saliency maps per class, right and wrong predictions both (default 2; 0 skips)")
    p.add_argument("--bootstrap", type=nonneg_int, default=1000, metavar="N",
                   help="bootstrap resamples for the confidence intervals (default 1000; 0 skips)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and of the saliency choice (default 0)")
    add_device(p)
    add_progress(p)


def run(args: argparse.Namespace) -> int:
    if args.saliency_per_class < 0 or args.bootstrap < 0:
        raise ValueError("--saliency-per-class and --bootstrap must be 0 or more")
    out = Path(args.out) if args.out else Path(args.run) / "report"
    check_out_dir(out)
    m = make_report(args.run, out, annotations=args.annotations, saliency_per_class=args.saliency_per_class,
                    n_boot=args.bootstrap, seed=args.seed, device=args.device,
                    progress=progress_on(args))
    o = m["overall"]

    def with_ci(d):
        return f"{fmt(d['value'])} [{fmt(d['lo'])}, {fmt(d['hi'])}]"

    print(f"{m['run']['n_images']} test images, {len(m['run']['folds'])} folds, classes {', '.join(m['run']['classes'])}")
    print(f"macro-F1 {with_ci(o['macro_f1'])}  balanced accuracy {with_ci(o['balanced_accuracy'])}  "
          f"accuracy {with_ci(o['accuracy'])}  ECE {fmt(m['calibration']['ece'])}")
    for q, b in m["binary"].items():
        if b.get("undefined_reason"):
            print(f"{q}: not defined ({b['undefined_reason']})")
        else:
            spread = (f" ± {fmt(b['auc_sd'])} over {b['n_folds_defined']} folds" if b["n_folds_defined"] > 1
                      else " (one fold)")
            print(f"{q}: AUC {fmt(b['auc_mean'])}{spread} ({b['n_pos']} positive, {b['n_neg']} negative)")
    if m["human"]:
        mv = m["human"]["model_vs_examiners"]
        if mv["n_matched"] == 0:
            print(f"human comparison: {mv['note']}")
        else:
            per = ", ".join(f"{col}: n = {e['n']}, examiner kappa {fmt(e.get('kappa'))}, model kappa "
                            f"{fmt(e.get('model_kappa'))}" for col, e in mv["examiners"].items())
            print(f"human comparison on {mv['n_matched']} predicted images found in the annotation file: {per}")
    for n in m["notes"] + m["saliency"]["notes"]:
        print(f"note: {n}", file=sys.stderr)
    print(f"wrote {out / 'report.html'} and {len(m['files']) - 1} other files in {out}")
    return 0
