"""Figures of the synthetic cells, for the docs and for judging them against real cells.

    python docs/make_synth_grid.py [--out-dir docs] [--data ../shared/data] [--per-row 8]

* ``synthetic_cells.png``: one row per class (code and full name), ``--per-row`` cells each.
* ``synthetic_vs_real.png``: for each class present in the real data, a few real LMU
  cells (``aml_lmu_sample``) and PBC cells (``pbc``, mapped by its ``labels.csv``)
  beside synthetic ones. Skipped, with a note, when the real data are absent.

The figures embed small thumbnails only; no real image is copied into the repository.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from leukoscope import taxonomy  # noqa: E402
from leukoscope.imaging.images import load_rgb  # noqa: E402
from leukoscope.synth import make_cell  # noqa: E402

THUMB = 112


def _thumb(img: np.ndarray) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((THUMB, THUMB), Image.LANCZOS))


def _grid_figure(rows: list[tuple[str, list[np.ndarray | None]]], col_titles: list[str] | None, path: Path,
                 label_width: float = 2.4) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_cols = max(len(imgs) for _, imgs in rows)
    cell = 1.05
    fig = plt.figure(figsize=(label_width + n_cols * cell, len(rows) * cell + (0.35 if col_titles else 0.1)))
    top = 1 - (0.35 if col_titles else 0.1) / fig.get_figheight()
    left = label_width / fig.get_figwidth()
    gs = fig.add_gridspec(len(rows), n_cols, left=left, right=0.995, top=top, bottom=0.005, wspace=0.03, hspace=0.03)
    for r, (label, imgs) in enumerate(rows):
        for c in range(n_cols):
            ax = fig.add_subplot(gs[r, c])
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            img = imgs[c] if c < len(imgs) else None
            if img is not None:
                ax.imshow(img)
            if c == 0:
                ax.text(-0.08, 0.5, label, transform=ax.transAxes, ha="right", va="center", fontsize=9)
            if r == 0 and col_titles and c < len(col_titles):
                ax.set_title(col_titles[c], fontsize=8)
    fig.savefig(path, dpi=88)
    plt.close(fig)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")


def synthetic_grid(out: Path, per_row: int) -> None:
    rows = []
    for cls in taxonomy.CLASSES:
        imgs = [_thumb(make_cell(cls, seed)) for seed in range(per_row)]
        rows.append((f"{cls}\n{taxonomy.CLASS_NAMES[cls]}", imgs))
    _grid_figure(rows, None, out)


def _real_lmu(root: Path, cls: str, n: int) -> list[np.ndarray]:
    files = sorted((root / cls).glob("*.tif*"))[:n] if (root / cls).is_dir() else []
    return [_thumb(load_rgb(f)) for f in files]


def _real_pbc(root: Path, cls: str, n: int) -> list[np.ndarray]:
    import pandas as pd

    table = pd.read_csv(root / "labels.csv", dtype=str).dropna(subset=["label"])
    files = sorted(table.loc[table["label"] == cls, "path"])
    step = max(1, len(files) // max(n, 1))
    return [_thumb(load_rgb(root / f)) for f in files[::step][:n]]


def comparison(out: Path, data: Path, n_lmu: int = 3, n_pbc: int = 2, n_syn: int = 4) -> None:
    lmu, pbc = data / "aml_lmu_sample", data / "pbc"
    if not lmu.is_dir() and not pbc.is_dir():
        print(f"note: no real data under {data}; {out.name} not made")
        return
    rows = []
    for cls in taxonomy.CLASSES:
        real_lmu = _real_lmu(lmu, cls, n_lmu) if lmu.is_dir() else []
        real_pbc = _real_pbc(pbc, cls, n_pbc) if (pbc / "labels.csv").exists() else []
        if not real_lmu and not real_pbc:
            continue
        imgs = (real_lmu + [None] * (n_lmu - len(real_lmu)) + real_pbc + [None] * (n_pbc - len(real_pbc))
                + [_thumb(make_cell(cls, 100 + s)) for s in range(n_syn)])
        rows.append((f"{cls}\n{taxonomy.CLASS_NAMES[cls]}", imgs))
    titles = ["real LMU"] * n_lmu + ["real PBC"] * n_pbc + ["synthetic"] * n_syn
    _grid_figure(rows, titles, out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", type=Path, default=REPO / "docs")
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data",
                   help="folder holding aml_lmu_sample/ and pbc/ (default ../shared/data)")
    p.add_argument("--per-row", type=int, default=8)
    args = p.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    synthetic_grid(args.out_dir / "synthetic_cells.png", args.per_row)
    comparison(args.out_dir / "synthetic_vs_real.png", args.data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
