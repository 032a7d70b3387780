"""``leukoscope adapt MODEL LAB_DATA --out RUN [--replay DATA] [--k N] [--unlabelled] [--um-per-px X]``."""

from __future__ import annotations

import argparse

import pandas as pd

from leukoscope.cli._common import add_device, add_label_map, add_progress, check_out_dir, progress_on, um_per_px_arg
from leukoscope.data import read_dataset
from leukoscope.data.readers import iter_image_paths
from leukoscope.train.adapt import ADAPT_DEFAULTS, REPLAY_PER_CLASS, adapt

NAME = "adapt"
HELP = "adapt a trained model to a new lab: fine-tune on its labelled cells (or AdaBN on unlabelled ones)"
DESCRIPTION = (
    "Fine-tune the model bundle MODEL on a lab's own labelled cells LAB_DATA (any dataset 'train' reads, e.g. the "
    "review station's export-labels folder with labels.csv) and write RUN/model.safetensors.\n"
    "--replay DATA (the parent's training data) replays a class-stratified sample of its cells beside the lab's, "
    "balanced over (source, class), so that the first lab is not forgotten; without --replay forgetting is NOT "
    "guarded against (a warning says so). The lab may bring classes the model never saw: they get new classifier "
    "rows and the old classes keep theirs. --k N uses at most N cells per class of the lab (seeded; the counts "
    "used are printed and recorded). The temperature and the out-of-distribution reference are re-fitted on the "
    "lab's cells only (validation cells are never drawn from the replay); the lab's µm/px is --um-per-px when "
    "given, else the data's own, else follows the parent's scale mode. The bundle records its lineage (parent "
    "SHA-256, the lab data's fingerprint, K per class, replay).\n"
    "--unlabelled: LAB_DATA is a folder of the lab's images (labels not needed); every BatchNorm layer's running "
    "statistics are re-estimated on them (AdaBN), prepared as for prediction; the weights are otherwise unchanged.\n"
    "Typical: leukoscope adapt runs/pbc/model.safetensors review_export --replay ../shared/data/pbc --k 10 "
    "--out runs/pbc+mylab"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="the model bundle to adapt (model.safetensors or its run folder)")
    p.add_argument("lab_data", help="the lab's cells: a dataset (labelled), or with --unlabelled a folder of images")
    p.add_argument("--out", metavar="RUN", required=True, help="output folder of the adapted model (must be new)")
    p.add_argument("--replay", metavar="DATA", help="the parent's training data: a sample of it is replayed")
    p.add_argument("--replay-per-class", type=int, default=REPLAY_PER_CLASS, metavar="N",
                   help=f"replayed cells per class (default {REPLAY_PER_CLASS})")
    p.add_argument("--k", type=int, metavar="N", help="at most N labelled cells per class of the lab (default: all)")
    p.add_argument("--unlabelled", action="store_true",
                   help="AdaBN: re-estimate the BatchNorm statistics on the lab's unlabelled images")
    p.add_argument("--epochs", type=int, metavar="N", help=f"epochs (default {ADAPT_DEFAULTS['epochs']})")
    p.add_argument("--per-class", type=int, metavar="N",
                   help=f"images drawn per class per epoch, spread over lab and replay (default "
                        f"{ADAPT_DEFAULTS['per_class']})")
    p.add_argument("--lr", type=float, help=f"peak learning rate (default {ADAPT_DEFAULTS['lr']}; the first epoch "
                                            "trains the classifier alone)")
    p.add_argument("--um-per-px", type=um_per_px_arg, metavar="X",
                   help="µm per pixel of every lab image, when known (overrides the lab data's own um_per_px; "
                        "default: the data's, else the parent's scale mode, e.g. estimated from the red cells)")
    p.add_argument("--seed", type=int, default=0, help="random seed (K draw, replay sample, validation split)")
    p.add_argument("--threads", help="CPU threads: auto or a number")
    add_device(p, default=None)
    add_progress(p)
    add_label_map(p)


def _table(path: str, label_map, unlabelled: bool) -> pd.DataFrame:
    if unlabelled:
        paths = iter_image_paths([path])
        if not paths:
            raise ValueError(f"{path}: no images found")
        return pd.DataFrame({"path": [str(p) for p in paths]})
    ds = read_dataset(path, label_map=label_map)
    for s in ds.skipped[:5]:
        print(f"skipped {s['path']}: {s['reason']}")
    return ds.table


def run(args: argparse.Namespace) -> int:
    check_out_dir(args.out)
    lab = _table(args.lab_data, args.label_map, args.unlabelled)
    replay = read_dataset(args.replay, label_map=args.label_map).table if args.replay else None
    if args.unlabelled and (replay is not None or args.k is not None):
        raise ValueError("--unlabelled re-estimates BatchNorm statistics only: --replay and --k do not apply")
    overrides = {k: v for k, v in (("threads", args.threads), ("device", args.device)) if v is not None}
    res = adapt(args.model, lab, args.out, replay_table=replay, replay_per_class=args.replay_per_class,
                k_per_class=args.k, seed=args.seed, epochs=args.epochs, per_class=args.per_class, lr=args.lr,
                unlabelled=args.unlabelled, um_per_px=args.um_per_px, overrides=overrides,
                progress=progress_on(args))
    lin = res.lineage
    if lin["mode"] == "labelled":
        print(f"{res.bundle_path}: {len(res.meta['classes'])} classes ({', '.join(res.meta['classes'])}); lab cells "
              f"used per class: {', '.join(f'{c} {n}' for c, n in lin['k_per_class'].items())}; replayed "
              f"{lin['replay']['n'] if lin['replay'] else 0}; temperature {res.meta['temperature']:.3f} "
              f"(fitted on {lin['validation']['n']} lab cells)")
    else:
        print(f"{res.bundle_path}: BatchNorm statistics of {lin['n_batchnorm']} layers re-estimated on "
              f"{lin['n_lab']} lab images")
    return 0
