"""``leukoscope train DATA [DATA ...] [--preset paper|fast|robust] [--model NAME] --out RUN``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from leukoscope.cli._common import (add_config_options, add_label_map, add_progress, check_out_dir, config_overrides,
                                    progress_on)
from leukoscope.data import fold_tables
from leukoscope.data.readers import read_datasets
from leukoscope.models.registry import get_config, list_models
from leukoscope.train import train
from leukoscope.train.presets import DEFAULT_PRESET, PRESETS, list_presets, preset

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
    "--saturation 0.25 --gamma 0.25 --blur 1) and --epochs 18. Each setting's help ends with the presets' values.\n"
    "Several labs: give several DATA paths; each dataset's rows keep their own source (else the folder name) "
    "and, whenever the data hold more than one source, --balance-by source_class is the default (every epoch "
    "draws each class evenly over the labs that have it; --balance-by class switches it off). The same image "
    "in two datasets is an error.\n"
    "Pretrained backbones: --pretrained (efficientnet_lite0/1/2, mobilenet_v2; or --preset pretrained) starts from "
    "ImageNet weights installed with the package and fine-tunes gently (see --pretrained).\n"
    "Fine-tuning: --init-from BUNDLE starts from a trained model (new classes get new classifier rows), "
    "with --head-warmup-epochs, --body-lr-scale and --freeze-bn.\n"
    "The bundle records the training images' µm/px and, fitted on the validation images, the "
    "out-of-distribution reference that 'leukoscope evaluate' compares other sources with.\n"
    "Multi-GPU: torchrun --nproc_per_node N -m leukoscope train ..."
)


def add_train_options(p: argparse.ArgumentParser) -> None:
    """Options shared by ``train`` and ``cv``: the preset and one option per training setting."""
    p.add_argument("data", nargs="*", help="dataset(s): LMU folder, folder per class, CSV manifest, or folder with "
                                           "labels.csv; several paths train on all of them (multi-lab)")
    g = p.add_argument_group("preset")
    g.add_argument("--preset", choices=list_presets(),
                   help=f"training preset (default: {DEFAULT_PRESET}; with --model, the preset's settings for that "
                        "model); any setting below overrides it, and the effective config is saved")
    g.add_argument("--list-models", action="store_true", help="list known models and presets, then exit")
    add_config_options(p, PRESETS)
    add_progress(p)
    add_label_map(p)


def config_from_args(args: argparse.Namespace):
    """The effective :class:`~leukoscope.train.TrainConfig` of the command line."""
    overrides = config_overrides(args)
    if args.model:
        get_config(args.model)  # unknown names fail here, listing the known ones
        if args.input_size is None and not args.preset:
            overrides["input_size"] = get_config(args.model).input_size
    return preset(args.preset or DEFAULT_PRESET, **overrides).resolved()


def print_models() -> None:
    print("models:")
    for name in list_models():
        c = get_config(name)
        print(f"  {name:<20} {c.input_size:>4}px  {c.description}")
    print("presets:")
    for name, p in sorted(PRESETS.items()):
        print(f"  {name:<20} {p['model']} at {p['input_size']}px, {p['per_class']}/class/epoch, "
              f"up to {p['epochs']} epochs")


def config_and_data(args: argparse.Namespace):
    """(effective config, dataset) of a train/cv command line, printing what the reader skipped;
    ``None`` after printing the models and presets for ``--list-models``."""
    if args.list_models:
        print_models()
        return None
    if not args.data or not args.out:
        raise ValueError("give the dataset DATA and --out RUN (or --list-models)")
    check_out_dir(args.out)
    cfg = config_from_args(args)
    ds = read_datasets(args.data, label_maps=args.label_map)
    sources = sorted(set(ds.table["source"].astype(str))) if "source" in ds.table else []
    if args.balance_by is None and len(sources) > 1:
        earlier = Path(args.out) / "config.json"  # a run begun before keeps its balancing (resume)
        before = json.loads(earlier.read_text()).get("balance_by", "class") if earlier.exists() else None
        cfg.balance_by = before or "source_class"
        if cfg.balance_by == "source_class":
            print(f"{len(sources)} sources ({', '.join(sources[:6])}{', ...' if len(sources) > 6 else ''}): "
                  "epochs balanced over (source, class) (--balance-by class to switch off)")
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
    g.add_argument("--restart", action="store_true",
                   help="ignore an existing checkpoint or finished model in RUN and train again from the start")


def run(args: argparse.Namespace) -> int:
    parsed = config_and_data(args)
    if parsed is None:
        return 0
    cfg, ds = parsed
    table = ds.table
    if args.split is not None or args.fold is not None:
        if args.split is None or args.fold is None:
            raise ValueError("--split and --fold go together: train on fold != K of the split file")
        table, _ = fold_tables(table, args.split, args.fold)
        table = table.drop(columns=["fold"])
        print(f"training on {len(table)} images of {args.split} (fold != {args.fold})")
    if args.resume and not (Path(args.out) / "checkpoint.pt").exists() and not (Path(args.out) / "model.safetensors").exists():
        print(f"--resume: {args.out} has no checkpoint yet; starting a new run")
    res = train(table, args.out, cfg, progress=progress_on(args), resume=not args.restart,
                data_fingerprint=ds.fingerprint() if args.split is None else None)
    m = res.metrics
    print(f"{res.bundle_path}: {len(res.meta['classes'])} classes, val balanced accuracy "
          f"{m.get('val_balanced_accuracy', float('nan')):.4f}, temperature {res.meta['temperature']:.3f}")
    return 0
