"""The report's figures, drawn with Matplotlib's Agg canvas and returned as PNG bytes.

Each function takes the plain results of :mod:`leukoscope.evaluate` and returns PNG
bytes (no pyplot, no global state: safe in threads and on machines without a display).

* :func:`confusion_png`: the row-normalised confusion matrix with the number of
  images per gold class on a log scale in a strip at the right (as Fig. 3a of the paper);
* :func:`roc_png`: the mean ROC over folds with a +-1 sd band, the examiners'
  points ('x', '+') and the model's own hard-call point; a text panel when undefined;
* :func:`reliability_png`: the reliability diagram with the image count per bin;
* :func:`saliency_png`: an input image beside its saliency map.
"""

from __future__ import annotations

import io
import textwrap

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import LogLocator, NullFormatter
from PIL import Image

DPI = 110
EXAMINER_MARKERS = ("x", "+")
EXAMINER_COLOURS = ("#c0392b", "#8e44ad")
MODEL_COLOUR = "#1f5fa8"


def figure_png(fig: Figure, dpi: int = DPI, palette: bool = False) -> bytes:
    """Render a Matplotlib figure to PNG bytes with the Agg canvas.

    ``palette=True`` stores it with a 256-colour palette (photographs and saliency maps
    become about 2.5 times smaller, which matters in a page that embeds dozens).
    """
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": "leukoscope"})
    if not palette:
        return buf.getvalue()

    buf.seek(0)
    img = Image.open(buf).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT,
                                                   dither=Image.Dither.NONE)
    out = io.BytesIO()
    img.save(out, format="PNG", optimize=True)
    return out.getvalue()


def _text_panel(ax, title: str, text: str) -> None:
    ax.set_axis_off()
    ax.set_title(title)
    ax.text(0.5, 0.5, "\n".join(textwrap.wrap(text, 44)), ha="center", va="center", fontsize=11,
            transform=ax.transAxes, bbox={"boxstyle": "round,pad=0.8", "fc": "#fff7e6", "ec": "#e0a030"})


def _fmt(x, nd=2) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.{nd}f}"


def confusion_png(classes, fractions, n_images, title: str = "Confusion matrix (rows: gold label)") -> bytes:
    """Row-normalised confusion matrix beside a log-scale bar strip of images per gold class.

    ``fractions``: (K, K) with rows summing to 1 (``NaN`` rows for classes without images);
    ``n_images``: (K,) images per gold class.
    """
    classes = list(classes)
    k = len(classes)
    frac = np.asarray(fractions, dtype=np.float64)
    n = np.asarray(n_images, dtype=np.float64)
    # explicit layout in inches, so that the strip's bars sit exactly beside the matrix rows
    cell = 0.42 if k > 6 else 0.7
    left, mat, gap, strip_w, right = 0.9, k * cell, 0.12, 1.9, 0.35
    top, bottom_ticks, cbar_h, bottom = 0.45, 0.95, 0.14, 0.5
    width = left + mat + gap + strip_w + right
    height = top + mat + bottom_ticks + cbar_h + bottom
    fig = Figure(figsize=(width, height))

    def box(x, y, w, h):  # inches from the bottom-left corner -> figure fraction
        return [x / width, y / height, w / width, h / height]

    y0 = bottom + cbar_h + bottom_ticks
    ax = fig.add_axes(box(left, y0, mat, mat))
    strip = fig.add_axes(box(left + mat + gap, y0, strip_w, mat), sharey=ax)
    cax = fig.add_axes(box(left, bottom, mat, cbar_h))
    masked = np.ma.masked_invalid(frac)

    cmap = matplotlib.colormaps["Blues"].with_extremes(bad="#eeeeee")
    im = ax.imshow(masked, cmap=cmap, vmin=0, vmax=1, aspect="auto")
    fs = 9 if k <= 10 else 7.5
    for i in range(k):
        for j in range(k):
            v = frac[i, j]
            if np.isfinite(v) and v >= 0.005:
                ax.text(j, i, "1" if v >= 0.995 else f"{v:.2f}".lstrip("0"), ha="center", va="center",
                        fontsize=fs, color="white" if v > 0.55 else "#1a1a1a")
    ax.set_xticks(range(k), classes, rotation=90)
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("gold label")
    ax.set_title(title, loc="left")
    cbar = fig.colorbar(im, cax=cax, orientation="horizontal")
    cbar.set_label("fraction of the gold class's images", fontsize=8)
    cbar.ax.tick_params(labelsize=7)
    pos = n > 0
    strip.barh(np.arange(k)[pos], n[pos], color="#7f8c8d", height=0.7)
    strip.set_xscale("log")
    # whole decades, at least two, so that only 10^k ticks are labelled whatever the counts
    lo = 10.0 ** np.floor(np.log10(max(0.5, n[pos].min() / 2))) if pos.any() else 1.0
    hi = 10.0 ** np.ceil(np.log10(n.max() * 8)) if pos.any() else 100.0
    hi = max(hi, lo * 100)
    strip.set_xlim(lo, hi)

    strip.xaxis.set_major_locator(LogLocator(base=10, numticks=12))
    strip.xaxis.set_minor_formatter(NullFormatter())
    for i in range(k):
        strip.text(n[i] * 1.15 if n[i] > 0 else lo * 1.1, i, f"{int(n[i])}", va="center", fontsize=fs)
    strip.tick_params(axis="y", left=False, labelleft=False)
    strip.set_xlabel("images (log)")
    strip.spines[["top", "right"]].set_visible(False)
    strip.set_ylim(k - 0.5, -0.5)
    return figure_png(fig)


def roc_png(result: dict, title: str, examiners: list[dict] | None = None, footnote: str | None = None) -> bytes:
    """ROC of one binary question over folds (:func:`leukoscope.evaluate.binary.binary_roc_over_folds`).

    ``examiners``: ``[{"label", "fpr", "tpr"}]`` drawn as 'x' and '+' (the paper's markers);
    ``footnote``: a line under the plot (e.g. which images the examiners' points come from).
    """
    fig = Figure(figsize=(6.2, 6.0))
    ax = fig.add_subplot(1, 1, 1)
    undefined = bool(result.get("undefined_reason"))
    pts = [e for e in examiners or [] if np.isfinite(e["fpr"]) and np.isfinite(e["tpr"])]
    if undefined:
        text = (f"ROC not defined: {result['undefined_reason']}. "
                f"({result['n_pos']} positive, {result['n_neg']} negative images.)")
        if not pts:
            _text_panel(ax, title, text)
            return figure_png(fig)
        # no curve to draw, but the examiners' calls are still points in ROC space
        _examiner_points(ax, examiners, legend=True)
        ax.text(0.55, 0.45, "\n".join(textwrap.wrap(text + " Only the examiners' points are shown.", 36)),
                ha="center", va="center", fontsize=9.5, transform=ax.transAxes,
                bbox={"boxstyle": "round,pad=0.6", "fc": "#fff7e6", "ec": "#e0a030"})
        _roc_axes(ax, title)
        _footnote(ax, footnote)
        ax.legend(loc="lower right", fontsize=7.5, framealpha=0.95)
        return figure_png(fig)
    grid = np.asarray(result["fpr_grid"])
    mean = np.asarray(result["tpr_mean"])
    sd = np.asarray(result["tpr_sd"])
    nf = result["n_folds_defined"]

    def draw(a, legend: bool):
        for f in result["folds"] if nf > 1 else []:
            if "fpr" in f:
                a.plot(f["fpr"], f["tpr"], color=MODEL_COLOUR, alpha=0.18, lw=0.8,
                       label="single folds" if legend and f is next(x for x in result["folds"] if "fpr" in x) else None)
        if nf > 1:
            a.fill_between(grid, np.clip(mean - sd, 0, 1), np.clip(mean + sd, 0, 1), color=MODEL_COLOUR,
                           alpha=0.18, lw=0, label="±1 sd over folds" if legend else None)
        auc = (f"AUC = {result['auc_mean']:.3f} ± {result['auc_sd']:.3f}" if nf > 1
               else f"AUC = {result['auc_mean']:.3f}")
        a.plot(grid, mean, color=MODEL_COLOUR, lw=2,
               label=(f"model, mean of {nf} folds ({auc})" if nf > 1 else f"model ({auc})") if legend else None)
        mp = result.get("model_point") or {}
        if np.isfinite(mp.get("sensitivity", np.nan)) and np.isfinite(mp.get("specificity", np.nan)):
            a.plot(1 - mp["specificity"], mp["sensitivity"], "o", mfc="none", mec=MODEL_COLOUR, ms=8, mew=1.5,
                   label="model's class call" if legend else None)
        _examiner_points(a, examiners or [], legend)

    draw(ax, True)
    _roc_axes(ax, title)
    # the paper's zoom on the top-left corner, where a useful curve and the examiners lie; left out when the
    # curve does not reach that corner (the inset would hide it)
    _footnote(ax, footnote if examiners else None)
    if np.interp(0.2, grid, mean) < 0.8:
        ax.legend(loc="lower right", fontsize=7.5, framealpha=0.95)
        return figure_png(fig)
    ins = ax.inset_axes([0.40, 0.36, 0.56, 0.36])
    draw(ins, False)
    ins.set_xlim(0, 0.2)
    ins.set_ylim(0.8, 1.0)
    ins.set_xticks([0, 0.05, 0.1, 0.15, 0.2])
    ins.set_yticks([0.8, 0.85, 0.9, 0.95, 1.0])
    ins.tick_params(labelsize=7)
    ins.set_title("zoom", fontsize=8, pad=2)
    ax.indicate_inset_zoom(ins, edgecolor="grey")
    ax.legend(loc="lower right", fontsize=7.5, framealpha=0.95)
    return figure_png(fig)


def _roc_axes(ax, title: str) -> None:
    """Chance diagonal, unit square, labels and title of a ROC plot."""
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("1 − specificity (false-positive rate)")
    ax.set_ylabel("sensitivity (true-positive rate)")
    ax.set_title(title)
    ax.set_aspect("equal")


def _examiner_points(ax, examiners: list[dict], legend: bool) -> None:
    """The examiners' calls as the paper's 'x' and '+' (marker by position; undefined points skipped)."""
    for i, e in enumerate(examiners):
        if not (np.isfinite(e["fpr"]) and np.isfinite(e["tpr"])):
            continue
        ax.plot(e["fpr"], e["tpr"], EXAMINER_MARKERS[i % 2], color=EXAMINER_COLOURS[i % 2], ms=10, mew=2,
                label=e["label"] if legend else None)


def _footnote(ax, text: str | None) -> None:
    if text:
        ax.annotate("\n".join(textwrap.wrap(text, 90)), xy=(0, 0), xycoords="axes fraction", xytext=(0, -42),
                    textcoords="offset points", va="top", ha="left", fontsize=7.5, color="#7a4b00")


def reliability_png(cal: dict, title: str = "Reliability of the top-class probability") -> bytes:
    """Reliability diagram of :func:`leukoscope.evaluate.calibration.expected_calibration_error`."""
    bins = cal["bins"]
    lo = np.array([b["lo"] for b in bins])
    hi = np.array([b["hi"] for b in bins])
    acc = np.array([b["accuracy"] for b in bins])
    conf = np.array([b["confidence"] for b in bins])
    n = np.array([b["n"] for b in bins])
    fig = Figure(figsize=(6.0, 6.4))
    gs = fig.add_gridspec(2, 1, height_ratios=[3, 1], hspace=0.08)
    ax = fig.add_subplot(gs[0])
    hist = fig.add_subplot(gs[1], sharex=ax)
    width = hi - lo
    ok = n > 0
    ax.bar(lo[ok], acc[ok], width=width[ok], align="edge", color="#5b8fd1", edgecolor="white", label="accuracy")
    ax.bar(lo[ok], conf[ok] - acc[ok], bottom=acc[ok], width=width[ok], align="edge", color="none",
           edgecolor="#c0392b", hatch="//", lw=0.8, label="gap to confidence")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    ax.set_ylim(0, 1)
    ax.set_xlim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title}\nECE = {cal['ece']:.3f}, {cal['n_bins']} bins, n = {cal['n']}")
    ax.legend(loc="upper left", fontsize=8)
    ax.tick_params(labelbottom=False)
    hist.bar(lo[ok], n[ok], width=width[ok], align="edge", color="#95a5a6", edgecolor="white")
    hist.set_yscale("log")
    hist.set_ylabel("images")
    hist.set_xlabel("confidence (probability of the predicted class)")
    return figure_png(fig)


def saliency_png(image, saliency, title: str) -> bytes:
    """An input image (H, W, 3 in [0, 1]) beside its saliency map (H, W) and the map laid over the image.

    The map is scaled to its 99.5th percentile, so that a few extreme pixels do not make the rest black.
    """
    img = np.asarray(image, dtype=np.float64)
    sal = np.asarray(saliency, dtype=np.float64)
    top = np.percentile(sal, 99.5) if sal.size and sal.max() > 0 else 1.0
    sal = np.clip(sal / (top or 1.0), 0, 1)
    fig = Figure(figsize=(7.4, 2.9))
    axes = [fig.add_subplot(1, 3, i) for i in (1, 2, 3)]
    axes[0].imshow(img)
    axes[0].set_title("input (as the model saw it)", fontsize=8)
    axes[1].imshow(sal, cmap="inferno", vmin=0, vmax=1)
    axes[1].set_title("saliency |∂score/∂pixel|", fontsize=8)
    axes[2].imshow(img.mean(axis=-1), cmap="gray", vmin=0, vmax=1)
    axes[2].imshow(sal, cmap="inferno", vmin=0, vmax=1, alpha=np.clip(sal * 1.5, 0, 0.85))
    axes[2].set_title("overlay", fontsize=8)
    for a in axes:
        a.set_xticks([])
        a.set_yticks([])
    fig.suptitle(title, fontsize=9)
    return figure_png(fig, dpi=100, palette=True)
