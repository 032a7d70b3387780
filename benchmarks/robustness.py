"""Cross-lab robustness measurement (issue 7): train on PBC only, score on other labs.

    python benchmarks/robustness.py train VARIANT...   # one after another, into runs/rob/<variant>
    python benchmarks/robustness.py eval VARIANT...    # -> runs/rob/<variant>/eval_*/ and runs/rob/summary.csv
    python benchmarks/robustness.py table              # mean ± sd over seeds -> runs/rob/seeds.csv

Training data: ``../shared/data/pbc`` fold 1 of the hold-out split ``runs/rob/pbc_split.csv``
(``leukoscope split ../shared/data/pbc --holdout 0.2 --seed 0``); fold 0 is the held-out PBC test set.
Evaluation cells (LMU sample, JHU, Raabin) are never trained or tuned on. The measured variants
share the model, input size, per-class target, epochs and seed; they differ only in the measures
below, all of them ``TrainConfig`` fields (``scale="estimate"``: µm/px of the PBC images from their
red cells; ``stain_jitter``; ``saturation``/``gamma``/``blur``; ``white_balance``). ``robust_full`` is the
``robust`` preset at the fast preset's own budget (input size, epochs, images per class); ``*_wb_full``
add white balance on each image's own background (training and inference). ``eval --tta`` scores with
test-time augmentation (8 rotations by 90° and mirror images). ``<variant>_s<N>`` is any variant
trained with seed N instead of 0 (seed-to-seed spread).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RUNS = ROOT / "runs" / "rob"

#: Small CPU budget shared by every variant (2 shared cores, ~15 min a run).
COMMON = dict(model="mobilenet_v3_small", input_size=80, per_class=400, epochs=10, seed=0, workers=2,
              brightness=0.1, contrast=0.1)

COLOUR = dict(saturation=0.25, gamma=0.25, blur=1.0)
#: The measures of the first ``robust`` preset (fast + these), spelt out so that the runs stay
#: reproducible whatever the preset becomes.
ROBUST_V1 = dict(scale="estimate", stain_jitter=0.1, **COLOUR)

#: variant -> (preset, overrides)
VARIANTS = {
    "base":        ("fast", COMMON),
    "scale":       ("fast", {**COMMON, "scale": "estimate"}),
    "scale_hed":   ("fast", {**COMMON, "scale": "estimate", "stain_jitter": 0.1}),
    "scale_hed_colour": ("fast", {**COMMON, "scale": "estimate", "stain_jitter": 0.1, **COLOUR}),
    "hed_colour":  ("fast", {**COMMON, "stain_jitter": 0.1, **COLOUR}),
    # the fast preset's own budget (128 px, 6 epochs x 800/class): plain, and fast + scale estimate,
    # HED 0.1, colour (the first robust preset)
    "fast_full":   ("fast", {"seed": 0, "workers": 2}),
    "robust_full": ("fast", {"seed": 0, "workers": 2, **ROBUST_V1}),
    # + white balance on each image's own background, in training and inference alike
    "scale_wb_full": ("fast", {"seed": 0, "workers": 2, "scale": "estimate", "white_balance": True}),
    "robust_wb_full": ("fast", {"seed": 0, "workers": 2, **ROBUST_V1, "white_balance": True}),
    # controls and budget: fast + scale alone; 3x the epochs with and without the measures
    "scale_full": ("fast", {"seed": 0, "workers": 2, "scale": "estimate"}),
    "robust_wb_long": ("fast", {"seed": 0, "workers": 2, **ROBUST_V1, "white_balance": True, "epochs": 18}),
    "fast_long": ("fast", {"seed": 0, "workers": 2, "epochs": 18}),
    "robust_long": ("fast", {"seed": 0, "workers": 2, **ROBUST_V1, "epochs": 18}),  # robust now without white balance
    # robust now at 160 px instead of 128 (0.18 instead of 0.23 µm/px): basophil granules and nuclear
    # chromatin are where the remaining errors are
    "robust_wb_long_160": ("fast", {"seed": 0, "workers": 2, **ROBUST_V1, "white_balance": True, "epochs": 18,
                                    "input_size": 160}),
    # robust now with saturation jitter widened to [0, 2] (fully grey to doubled colour): the first round's
    # all-greyscale scratch run did better on JHU and LMU and worse in distribution; this keeps colour on average
    "robust_wb_sat1_long": ("fast", {"seed": 0, "workers": 2, **ROBUST_V1, "saturation": 1.0,
                                     "white_balance": True, "epochs": 18}),
}


def _split_seed(name: str) -> tuple[str, int | None]:
    """``robust_full_s2`` -> (``robust_full``, 2): any variant again with another training seed."""
    m = re.fullmatch(r"(.+)_s(\d+)", name)
    return (m.group(1), int(m.group(2))) if m and m.group(1) in VARIANTS else (name, None)


def known_variant(name: str) -> bool:
    return _split_seed(name)[0] in VARIANTS


def variant_config(name: str):
    from leukoscope.train import preset

    base, seed = _split_seed(name)
    name_of_preset, overrides = VARIANTS[base]
    return preset(name_of_preset, **{**overrides, **({"seed": seed} if seed is not None else {})})


def pbc_train_table():
    """The PBC training images (fold != 0 of the hold-out split), as the reader gives them (no µm/px)."""
    from leukoscope.data import read_dataset, read_split

    ds = read_dataset(DATA / "pbc")
    sp = read_split(RUNS / "pbc_split.csv")
    train_paths = set(sp.loc[sp["fold"] != 0, "path"].astype(str))
    return ds.table[ds.table["path"].astype(str).isin(train_paths)].reset_index(drop=True)


def train_variant(name: str):
    from leukoscope.train import train

    out = RUNS / name
    if (out / "model.safetensors").exists():  # runs made before these measures were config fields included
        print(f"{name}: {out / 'model.safetensors'} exists; not retrained (delete it to train again)")
        return
    t0 = time.time()
    res = train(pbc_train_table(), out, variant_config(name), progress=False)
    print(f"{name}: {res.bundle_path} in {time.time() - t0:.0f}s, val bal acc "
          f"{res.metrics.get('val_balanced_accuracy', float('nan')):.3f}", flush=True)


def eval_tables():
    """PBC held-out fold 0, the LMU sample and external_wbc (source = its images/<folder>)."""
    from leukoscope.data import read_dataset, read_split

    pbc = read_dataset(DATA / "pbc").table
    sp = read_split(RUNS / "pbc_split.csv")
    test = set(sp.loc[sp["fold"] == 0, "path"].astype(str))
    pbc_test = pbc[pbc["path"].astype(str).isin(test)].reset_index(drop=True)
    lmu = read_dataset(DATA / "aml_lmu_sample").table
    ext = read_dataset(DATA / "external_wbc").table
    ext["source"] = ext["path"].map(lambda p: Path(p).parent.name)
    return pbc_test, lmu, ext


def _acc(pred, sources):
    sub = pred[pred["known"] & pred["source"].isin(sources)]
    return float((sub["label"] == sub["pred"]).mean()) if len(sub) else float("nan"), int(len(sub))


def eval_variant(name: str, tta: bool = False) -> list[dict]:
    from leukoscope.evaluate.external import evaluate_sets, validation_table, write_outputs
    from leukoscope.models.ood import fit_reference, store_reference
    from leukoscope.models.bundle import load_bundle
    from leukoscope.train.loop import resolve_training_scale

    path = RUNS / name / "model.safetensors"
    bundle = load_bundle(path)
    if "colour" not in (bundle.meta.get("reference") or {}):  # training stores one unless ood_reference=False
        table, _ = resolve_training_scale(pbc_train_table(), variant_config(name).scale)
        val = validation_table(bundle, table)
        store_reference(path, fit_reference(bundle, val, estimate_scale="off"))
        bundle = load_bundle(path)
    pbc_test, lmu, ext = eval_tables()
    rows = []
    for norm in ((False,) if tta else (False, True)):
        t0 = time.time()
        res = evaluate_sets(bundle, [pbc_test, lmu, ext], stain_normalize=norm, n_boot=200, tta=tta)
        out = RUNS / name / ("eval_tta" if tta else "eval_norm" if norm else "eval")
        write_outputs(res, out)
        pred = res.predictions
        ps = res.per_source
        row = {"variant": name + ("+tta" if tta else ""), "stain_normalize": norm,
               "pbc_heldout_bal_acc": ps["pbc"]["balanced_accuracy"]["value"],
               "pbc_heldout_acc": ps["pbc"]["accuracy"]["value"]}
        for src in ("lmu", "jhu_apl_aml", "raabin_wbc", "pbc_barcelona"):
            row[f"{src}_acc"], row[f"{src}_n"] = _acc(pred, [src])
        row["nonpbc_external_acc"], row["nonpbc_external_n"] = _acc(pred, ["jhu_apl_aml", "raabin_wbc"])
        for src in ("pbc", "lmu", "jhu_apl_aml", "raabin_wbc"):
            o = res.ood.get(src, {})
            row[f"{src}_ood_frac"] = o.get("fraction_beyond_reference_q95")
            row[f"{src}_conf"] = o.get("mean_max_prob")
            sc = res.scale.get(src) if isinstance(res.scale.get(src), dict) else {}
            row[f"{src}_um_per_px"] = (sc or {}).get("um_per_px_median")
        rows.append(row)
        print(f"{name} norm={norm}: " + ", ".join(f"{k}={v:.3f}" for k, v in row.items()
                                                   if isinstance(v, float) and k.endswith("acc")),
              f"({time.time() - t0:.0f}s)", flush=True)
        for w in res.warnings:
            print("   ", w[:160])
    return rows


def seed_table(summary: Path = RUNS / "summary.csv"):
    """Mean ± sd over training seeds of each variant (with and without TTA), no stain normalisation."""
    import pandas as pd

    df = pd.read_csv(summary)
    df = df[~df["stain_normalize"].astype(bool)].copy()
    df["tta"] = df["variant"].str.endswith("+tta")
    df["base"] = [_split_seed(v.removesuffix("+tta"))[0] for v in df["variant"]]
    cols = ["pbc_heldout_bal_acc", "lmu_acc", "jhu_apl_aml_acc", "raabin_wbc_acc", "nonpbc_external_acc"]
    rows = []
    for (base, tta), sub in df.groupby(["base", "tta"], sort=True):
        row = {"variant": base, "tta": bool(tta), "seeds": len(sub)}
        for c in cols:
            v = sub[c].astype(float)
            row[c] = f"{v.mean():.3f}" + (f" ± {v.std():.3f}" if len(v) > 1 else "")
        rows.append(row)
    return pd.DataFrame(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=("train", "eval", "table"))
    ap.add_argument("variants", nargs="*")
    ap.add_argument("--tta", action="store_true",
                    help="eval: probabilities averaged over the 8 rotations by 90° and mirror images (row <variant>+tta)")
    a = ap.parse_args(argv)
    if a.what == "table":  # runs/rob/summary.csv over seeds
        t = seed_table()
        print(t.to_string(index=False))
        t.to_csv(RUNS / "seeds.csv", index=False)
        return 0
    if not a.variants:
        ap.error("name at least one variant")
    for v in a.variants:
        if not known_variant(v):
            raise SystemExit(f"unknown variant {v}; known: {', '.join(VARIANTS)}")
    if a.what == "train":
        for v in a.variants:
            train_variant(v)
    else:
        rows = []
        for v in a.variants:
            rows += eval_variant(v, tta=a.tta)
        summary = RUNS / "summary.csv"
        import pandas as pd

        old = pd.read_csv(summary) if summary.exists() else pd.DataFrame()
        new = pd.DataFrame(rows)
        if len(old):
            old = old[~old["variant"].isin(new["variant"])]
        allrows = pd.concat([old, new], ignore_index=True)
        allrows.to_csv(summary, index=False)
        print(allrows.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
