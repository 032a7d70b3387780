"""``leukoscope train DATA [--preset paper|fast|robust] [--model NAME] --out RUN``."""

from __future__ import annotations

import argparse
from pathlib import Path

from leukoscope.cli._common import add_label_map

NAME = "train"
HELP = "train a model (paper ResNeXt protocol or a fast CPU preset) into a model bundle"
DESCRIPTION = (
    "Train on DATA (LMU folder, folder per class, CSV manifest or folder with labels.csv) and write "
    "RUN/model.safetensors (weights + metadata), RUN/config.json, RUN/log.csv and RUN/metadata.json.\n"
    "A validation split is taken from the training images (stratified) for early stopping and temperature "
    "scaling. A checkpoint is written every epoch; running the same command again resumes an interrupted "
    "run, and a finished run is not retrained.\n\n"
    "presets: paper = ResNeXt-50 32x4d from scratch at 400 px, ~10,000 images/class/epoch (a GPU job); "
    "fast = the CPU preset of docs/fast_preset.md (minutes; knows one lab only); robust (the default) = fast's "
    "model with the cross-lab measures of docs/robustness.md (--scale estimate --white-balance --stain-jitter 0.1 "
    "--saturation 0.25 --gamma 0.25 --blur 1) and --epochs 18.\n"
    "The bundle records the training images' µm/px and, fitted on the validation images, the "
    "out-of-distribution reference that 'leukoscope evaluate' compares other sources with.\n"
    "Multi-GPU: torchrun --nproc_per_node N -m leukoscope train ..."
)


def add_train_options(p: argparse.ArgumentParser) -> None:
    """Options shared by ``train`` and ``cv``: model/preset and every override."""
    from leukoscope.train.presets import list_presets

    p.add_argument("data", nargs="?", help="dataset: LMU folder, folder per class, CSV manifest, or folder with labels.csv")
    g = p.add_argument_group("model and preset")
    g.add_argument("--preset", choices=list_presets(),
                   help="training preset (default: robust; with --model, the preset's settings for that model)")
    g.add_argument("--model", metavar="NAME", help="model name (see --list-models)")
    g.add_argument("--list-models", action="store_true", help="list known models and presets, then exit")
    o = p.add_argument_group("overrides (any preset setting; the effective config is saved)")
    o.add_argument("--epochs", type=int)
    o.add_argument("--per-class", type=int, metavar="N", help="images drawn per class per epoch (balancing)")
    o.add_argument("--batch-size", type=int)
    o.add_argument("--input-size", type=int, metavar="PX")
    o.add_argument("--um-per-px", type=float, metavar="X", help="µm/px of the model input (default: the model's)")
    o.add_argument("--seed", type=int)
    o.add_argument("--lr", type=float)
    o.add_argument("--weight-decay", type=float)
    o.add_argument("--patience", type=int, help="early stopping: epochs without validation-loss improvement")
    o.add_argument("--val-fraction", type=float)
    o.add_argument("--workers", type=int, help="threads decoding images")
    o.add_argument("--stain-jitter", type=float, nargs="?", const=0.05, metavar="SIGMA",
                   help="HED stain jitter (leukoscope.train.augment): sigma of each stain's scale and shift; off in the "
                        "paper and fast presets, 0.1 in robust; the option without a value: 0.05")
    o.add_argument("--brightness", type=float, metavar="B", help="brightness jitter, factor in [1-B, 1+B]")
    o.add_argument("--contrast", type=float, metavar="C", help="contrast jitter, factor in [1-C, 1+C]")
    o.add_argument("--saturation", type=float, metavar="S",
                   help="saturation jitter after the stain jitter: each image blended with its grey version, "
                        "factor in [1-S, 1+S] (0 = off; robust preset 0.25)")
    o.add_argument("--gamma", type=float, metavar="G",
                   help="tone-curve jitter: pixel values raised to a gamma with log(gamma) in [-G, G] "
                        "(0 = off; robust preset 0.25)")
    o.add_argument("--blur", type=float, metavar="PX",
                   help="defocus jitter: each image blurred with probability 1/2 by a Gaussian of sigma drawn from [0, PX] "
                        "pixels of the "
                        "model input (0 = off; robust preset 1)")
    o.add_argument("--scale", choices=("stated", "estimate"),
                   help="µm/px of the training images: 'stated' (fast and paper presets) uses the dataset's um_per_px where it "
                        "gives one and otherwise resizes each image to the input as it is; 'estimate' estimates "
                        "µm/px from the red cells (pooled per source) where the dataset gives none, so that cells "
                        "have the model's physical size (robust preset); an implausible estimate is not used (warning)")
    o.add_argument("--white-balance", action=argparse.BooleanOptionalAction, default=None,
                   help="divide every image by the colour of its own background (the plasma between the cells), "
                        "in training and, recorded in the bundle, in every later prediction: removes the "
                        "illuminant's and camera's colour cast (docs/robustness.md; on in the robust preset, off "
                        "in fast and paper; --no-white-balance switches it off)")
    o.add_argument("--label-smoothing", type=float)
    o.add_argument("--bf16", choices=("auto", "on", "off"), help="bf16 autocast on CPU (auto: measured default)")
    o.add_argument("--device", help="cpu, cuda, cuda:1 (default: auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_label_map(p)


def config_from_args(args: argparse.Namespace):
    """The effective :class:`~leukoscope.train.TrainConfig` of the command line."""
    from leukoscope.train.presets import DEFAULT_PRESET, preset

    overrides = {k: getattr(args, k, None) for k in (
        "epochs", "per_class", "batch_size", "input_size", "um_per_px", "seed", "lr", "weight_decay", "patience",
        "val_fraction", "workers", "stain_jitter", "brightness", "contrast", "saturation", "gamma", "blur", "scale",
        "white_balance", "label_smoothing", "bf16", "device")}
    if args.model:
        from leukoscope.models.registry import get_config

        get_config(args.model)  # unknown names fail here, listing the known ones
        overrides["model"] = args.model
        if args.input_size is None and not args.preset:
            overrides["input_size"] = get_config(args.model).input_size
    return preset(args.preset or DEFAULT_PRESET, **overrides).resolved()


def print_models() -> None:
    from leukoscope.models.registry import get_config, list_models
    from leukoscope.train.presets import PRESETS

    print("models:")
    for name in list_models():
        c = get_config(name)
        print(f"  {name:<20} {c.input_size:>4}px  {c.description}")
    print("presets:")
    for name, p in sorted(PRESETS.items()):
        print(f"  {name:<20} {p['model']} at {p['input_size']}px, {p['per_class']}/class/epoch, "
              f"up to {p['epochs']} epochs")


def config_and_data(args: argparse.Namespace):
    """(effective config, dataset) of a train/cv command line, printing what the reader skipped."""
    from leukoscope.data import read_dataset

    if not args.data or not args.out:
        raise ValueError("give the dataset DATA and --out RUN (or --list-models)")
    cfg = config_from_args(args)
    ds = read_dataset(args.data, label_map=args.label_map)
    for s in ds.skipped[:5]:
        print(f"skipped {s['path']}: {s['reason']}")
    if len(ds.skipped) > 5:
        print(f"... and {len(ds.skipped) - 5} more skipped ('leukoscope data summary' lists them)")
    return cfg, ds


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_train_options(p)
    p.add_argument("--split", metavar="CSV", help="split file (leukoscope split); trains on fold != --fold")
    p.add_argument("--fold", type=int, metavar="K", help="test fold of --split left out of training")
    p.add_argument("--out", metavar="RUN", help="output folder (required)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true",
                   help="continue from RUN/checkpoint.pt (the default whenever RUN holds one)")
    g.add_argument("--restart", action="store_true", help="ignore an existing checkpoint in RUN and start over")


def run(args: argparse.Namespace) -> int:
    if args.list_models:
        print_models()
        return 0
    from leukoscope.data import read_split
    from leukoscope.train import train

    cfg, ds = config_and_data(args)
    table = ds.table
    if args.split is not None or args.fold is not None:
        if args.split is None or args.fold is None:
            raise ValueError("--split and --fold go together: train on fold != K of the split file")
        from leukoscope.train.cv import _align_split

        sp = _align_split(read_split(args.split), table, args.split)
        if args.fold not in set(sp["fold"]):
            raise ValueError(f"fold {args.fold} is not in {args.split} (folds: {sorted(set(sp['fold']))})")
        keep = set(sp.loc[sp["fold"] != args.fold, "path"])
        table = table[table["path"].astype(str).isin(keep)]
        print(f"training on {len(table)} images of {args.split} (fold != {args.fold})")
    if args.resume and not (Path(args.out) / "checkpoint.pt").exists() and not (Path(args.out) / "model.safetensors").exists():
        print(f"--resume: {args.out} has no checkpoint yet; starting a new run")
    res = train(table, args.out, cfg, progress=not args.no_progress, resume=not args.restart,
                data_fingerprint=ds.fingerprint() if args.split is None else None)
    m = res.metrics
    print(f"{res.bundle_path}: {len(res.meta['classes'])} classes, val balanced accuracy "
          f"{m.get('val_balanced_accuracy', float('nan')):.4f}, temperature {res.meta['temperature']:.3f}")
    return 0
