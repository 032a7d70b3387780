"""``leukoscope agreement ANNOTATIONS.dat``: the examiners' re-annotations against gold."""

from __future__ import annotations

import argparse
from pathlib import Path

from leukoscope.cli._common import add_json_out, check_out_file, fmt, write_json
from leukoscope.evaluate.agreement import agreement_from_annotations, confusion_frame

NAME = "agreement"
HELP = "Cohen's kappa and blast/atypical sensitivity/specificity of the re-annotations"
DESCRIPTION = (
    "Compare each re-annotation column of an LMU annotations.dat with the gold labels, over the images "
    "that examiner re-annotated. kappa is over the images the examiner could assign; kappa_unc_as_error "
    "counts UNC as a disagreement. Sensitivity and specificity are over the assignable images."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("annotations", help="annotations.dat (path gold reannotation1 reannotation2)")
    add_json_out(p)
    p.add_argument("--confusion", action="store_true", help="also print each examiner's confusion table")


def run(args: argparse.Namespace) -> int:
    check_out_file(args.json, "--json")
    path = Path(args.annotations)
    if path.is_dir():
        hint = f"; did you mean {path / 'annotations.dat'}?" if (path / "annotations.dat").is_file() else ""
        raise ValueError(f"{path}: is a folder; give the annotations.dat file (path gold reannotation1 "
                         f"reannotation2){hint}")
    res = agreement_from_annotations(args.annotations)
    print(f"{'examiner':<14} {'n':>5} {'UNC':>4} {'kappa':>6} {'kappa(UNC=err)':>14} "
          f"{'blast sens':>10} {'blast spec':>10} {'atyp sens':>9} {'atyp spec':>9}")
    for col, r in res.items():
        print(f"{col:<14} {r['n']:>5} {r['n_unc']:>4} {fmt(r['kappa']):>6} {fmt(r['kappa_unc_as_error']):>14} "
              f"{fmt(r['blast']['sensitivity']):>10} {fmt(r['blast']['specificity']):>10} "
              f"{fmt(r['atypical']['sensitivity']):>9} {fmt(r['atypical']['specificity']):>9}")
        if args.confusion:
            print(confusion_frame(res, col).to_string())
    write_json(res, args.json)
    return 0
