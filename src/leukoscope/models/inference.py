"""The one inference path: images -> a bundle's prepared input -> one forward pass.

* :func:`prepare_many` / :func:`prepare_batch` — RGB images or paths through the bundle's
  :class:`~leukoscope.models.pipeline.Pipeline` (white balance -> physical scale -> crop/pad), at
  the µm/px each image is known at; ``prepare_many`` collects unreadable images instead of raising.
* :func:`forward` — prepared uint8 NHWC images -> :class:`ForwardOutput`: logits and, on request,
  the penultimate features (the last Linear layer's input), the logits of the 8 dihedral views
  (test-time augmentation) and the normalised input tensor the model classified (what a saliency
  map must explain). bf16 bundles run in bf16 on CPU with near-ties re-run in fp32
  (:mod:`leukoscope.models.precision`).

``predict``, ``evaluate``, ``cv``, ``screen`` and its review page all go through these two
functions, so that the same pixels always get the same answer. A row of probabilities that is
not finite (NaN or infinite: a broken model or input) is never a call: :func:`nonfinite_errors`
turns those rows into per-image errors (``predict``, ``evaluate``) and ``screen`` refers the cell.

>>> from leukoscope.models import load_bundle                                  # doctest: +SKIP
>>> b = load_bundle("runs/pbc/model.safetensors")                              # doctest: +SKIP
>>> out = forward(b, prepare_batch(b, ["cell.png"]), features=True, tta=True)  # doctest: +SKIP
>>> out.probabilities(b.temperature).shape, out.features.shape                 # doctest: +SKIP
((1, 10), (1, 1024))
"""

from __future__ import annotations

import math
import os
import weakref
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnxruntime as ort
import torch

from leukoscope.imaging.images import ImageError, load_rgb
from leukoscope.models.export import onnx_bytes
from leukoscope.models.heads import classifier_layer
from leukoscope.models.pipeline import dihedral_views, normalize
from leukoscope.models.precision import DEFAULT_BF16_GUARD, autocast_context, top2_margin
from leukoscope.models.registry import get_config
from leukoscope.progress import tqdm

# --------------------------------------------------------------------------- preparing images


@dataclass
class PreparedBatch:
    x: np.ndarray                                      # uint8 (n_ok, S, S, 3)
    ok: list[int] = field(default_factory=list)        # indices of the images that worked
    errors: list[dict] = field(default_factory=list)   # [{"path", "reason"}] of the others


def _as_list(images) -> list:
    if isinstance(images, torch.Tensor):
        images = images.numpy()
    if isinstance(images, np.ndarray):
        return [images] if images.ndim == 3 else list(images)
    if isinstance(images, (str, os.PathLike)):
        return [images]
    return list(images)


def _per_image(um_per_px, n: int) -> list:
    if um_per_px is None or isinstance(um_per_px, (int, float, np.floating, np.integer)):
        return [um_per_px] * n
    ums = list(um_per_px)
    if len(ums) != n:
        raise ValueError(f"um_per_px has {len(ums)} values for {n} images")
    return [None if u is None or not math.isfinite(float(u)) else float(u) for u in ums]


def prepare_many(bundle, images, um_per_px=None, *,
                 before: Callable[[int, np.ndarray], np.ndarray] | None = None) -> PreparedBatch:
    """Images (paths, RGB uint8 arrays, or a uint8 NHWC array/tensor of them) -> the bundle's model inputs.

    ``um_per_px``: one value or one per image (None / NaN: unknown, then resized). ``before``:
    ``before(i, img)`` is applied to each loaded image first (e.g. stain normalisation). Unreadable or invalid images are
    reported in ``errors`` and skipped, never raised.
    """
    items = _as_list(images)
    ums = _per_image(um_per_px, len(items))
    pipe = bundle.pipeline
    s = pipe.input_size
    out = np.empty((len(items), s, s, 3), dtype=np.uint8)
    ok, errors = [], []
    for i, (img, um) in enumerate(zip(items, ums)):
        try:
            if isinstance(img, (str, os.PathLike)):
                img = load_rgb(img)
            if before is not None:
                img = before(i, np.asarray(img))
            out[len(ok)] = pipe.prepare(np.asarray(img), um)
            ok.append(i)
        except (ImageError, ValueError, OSError) as exc:
            name = str(img) if isinstance(img, (str, os.PathLike)) else f"image {i}"
            errors.append({"path": name, "reason": getattr(exc, "reason", str(exc))})
    return PreparedBatch(out[:len(ok)], ok, errors)


def prepare_batch(bundle, images, um_per_px=None) -> np.ndarray:
    """Images (paths or RGB arrays) -> uint8 ``(N, S, S, 3)`` model inputs; the first bad image raises."""
    items = _as_list(images)
    ums = _per_image(um_per_px, len(items))
    pipe = bundle.pipeline
    out = np.empty((len(items), pipe.input_size, pipe.input_size, 3), dtype=np.uint8)
    for i, (img, um) in enumerate(zip(items, ums)):
        out[i] = pipe.prepare(load_rgb(img) if isinstance(img, (str, os.PathLike)) else np.asarray(img), um)
    return out


# --------------------------------------------------------------------------- non-finite outputs

#: The error of an image whose probabilities are not finite.
NONFINITE_REASON = ("the model's probabilities for this image are not finite (NaN or infinite): no call; "
                    "the model or the input is broken")


def finite_rows(probs) -> np.ndarray:
    """Boolean mask: the rows of ``probs`` (``(N, C)``) whose values are all finite."""
    p = np.asarray(probs, dtype=np.float64)
    return np.isfinite(p).all(axis=1) if p.ndim == 2 else np.zeros(0, dtype=bool)


def nonfinite_errors(probs, names) -> tuple[np.ndarray, list[dict]]:
    """``(finite mask, errors)``: the rows of ``probs`` that may be called, and ``{"path", "reason"}`` for
    each image (``names``, one per row) whose probabilities hold a NaN or infinite value."""
    ok = finite_rows(probs)
    return ok, [{"path": str(n), "reason": NONFINITE_REASON} for n, good in zip(names, ok) if not good]


# --------------------------------------------------------------------------- the forward pass


def _run(model, xb, *, device, bf16: bool, channels_last: bool, feats: list | None):
    """Logits (float32, CPU) of one normalised batch; appends its penultimate features to ``feats``."""
    xb = xb.to(device)
    if channels_last:
        xb = xb.contiguous(memory_format=torch.channels_last)
    hook = None
    if feats is not None:
        hook = classifier_layer(model).register_forward_hook(
            lambda m, inp, out: feats.append(inp[0].detach().float().flatten(1).cpu()))
    try:
        with autocast_context(device, bf16):
            return model(xb).float().cpu()
    finally:
        if hook is not None:
            hook.remove()


#: Backends of :func:`forward`: ``"auto"`` runs fp32 on CPU through onnxruntime for the models the registry
#: does not mark as bf16 models (MobileNets, EfficientNet: depthwise convolutions, which onnxruntime's fused
#: kernels run ~2x faster than eager PyTorch; the model is exported in memory once per loaded model, with its
#: penultimate features as a second output: benchmarks/README.md), and everything else (the big dense models,
#: whose export takes 10-13 s for +13-30 %; bf16; CUDA) through PyTorch; ``"torch"``: always PyTorch.
BACKENDS = ("auto", "torch")


def uses_onnxruntime(bundle, backend: str = "auto") -> bool:
    """Whether :func:`forward` runs ``bundle``'s fp32 passes through onnxruntime."""
    if backend != "auto" or str(bundle.device) != "cpu":
        return False
    try:
        return not get_config(bundle.meta["model"]).cpu_bf16
    except (KeyError, ValueError):  # a model name the registry does not know
        return False
#: model -> (onnxruntime session, its outputs, the weights' versions it was built from)
_SESSIONS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _weights_version(model) -> tuple:
    """Changes whenever a weight or buffer of ``model`` is replaced or changed in place."""
    return tuple((t.data_ptr(), t._version) for t in [*model.parameters(), *model.buffers()])


def _session(model, example: torch.Tensor):
    """The onnxruntime session of ``model`` (built on first use and again after its weights change;
    dropped with the model)."""
    version = _weights_version(model)
    if model not in _SESSIONS or _SESSIONS[model][2] != version:
        try:
            head = classifier_layer(model)
        except ValueError:
            head = None
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = torch.get_num_threads()
        with torch.inference_mode(False):  # tracing for the export records ordinary tensors
            graph = onnx_bytes(model, example.clone(), head=head)
        sess = ort.InferenceSession(graph, so, providers=["CPUExecutionProvider"])
        # after the export: it converts the weights to NCHW and back, which gives them new storage
        _SESSIONS[model] = (sess, [o.name for o in sess.get_outputs()], _weights_version(model))
    return _SESSIONS[model][:2]


def _run_ort(model, xb, feats: list | None):
    sess, outputs = _session(model, xb[:1].float())
    if feats is not None and "features" not in outputs:
        raise ValueError("the model has no Linear layer: cannot take penultimate features")
    res = sess.run(outputs, {"input": np.ascontiguousarray(xb.numpy(), dtype=np.float32)})
    if feats is not None:
        feats.append(torch.from_numpy(res[1]))
    return torch.from_numpy(res[0])


def forward_logits(model, x_uint8, mean, std, *, batch_size: int = 64, device="cpu", bf16: bool = False,
                   channels_last: bool = True, progress: bool = False):
    """Logits (float32, on CPU) of ``model`` for a uint8 NHWC batch of prepared images (no bundle needed:
    the training loop's validation pass)."""
    model.eval()
    outs = []
    rng = range(0, len(x_uint8), batch_size)
    if progress:
        rng = tqdm(rng, desc="predicting", unit="batch", leave=False)
    with torch.inference_mode():
        for i in rng:
            xb = normalize(torch.as_tensor(x_uint8[i:i + batch_size]), mean, std)
            outs.append(_run(model, xb, device=device, bf16=bf16, channels_last=channels_last, feats=None))
    if not outs:
        return torch.zeros(0, 0)
    return torch.cat(outs)


@dataclass
class ForwardOutput:
    logits: torch.Tensor                       # (N, C) float32: the image as it is (identity view)
    features: np.ndarray | None = None         # (N, D) penultimate features of the identity view
    view_logits: list | None = None            # 8 x (N, C): the dihedral views, identity first (tta)
    inputs: torch.Tensor | None = None         # (N, 3, S, S) the normalised tensor the model classified
    fp32_rechecked: int = 0                    # bf16 bundles: images re-run in fp32

    def probabilities(self, temperature: float = 1.0, *, tta: bool | None = None) -> np.ndarray:
        """Softmax of ``logits / temperature``; with TTA views (default when present) their mean."""
        use_views = self.view_logits is not None if tta is None else tta
        if use_views and self.view_logits is None:
            raise ValueError("no TTA views: call forward(..., tta=True)")
        zs = self.view_logits if use_views else [self.logits]
        if len(zs[0]) == 0:
            return np.zeros((0, self.logits.shape[1] if self.logits.ndim == 2 else 0))
        return sum(torch.softmax(z.double() / float(temperature), dim=1).numpy() for z in zs) / len(zs)


def forward(bundle, x_uint8, *, batch_size: int = 64, features: bool = False, tta: bool = False,
            inputs: bool = False, precision: str = "auto", backend: str = "auto",
            progress: bool = False) -> ForwardOutput:
    """One forward pass of ``bundle`` over prepared uint8 NHWC images (:func:`prepare_batch`).

    ``features``: also the penultimate features; ``tta``: also the logits of the 8 rotations by 90°
    and mirror images (one batch of images at a time, all its views: 1x the memory); ``inputs``:
    also the normalised input tensor (for a saliency map of exactly what was classified).
    ``precision``: ``"auto"`` (the bundle's ``inference_bf16`` on CPU: bf16, images whose top-two
    probabilities lie within ``bf16_guard`` re-run in fp32), ``"fp32"`` or ``"bf16"`` (no re-run).
    ``backend``: ``"auto"`` (fp32 on CPU through onnxruntime for the small depthwise models,
    :data:`BACKENDS`, :func:`uses_onnxruntime`) or ``"torch"``.
    """
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {precision!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    model, device = bundle.model.eval(), bundle.device
    auto_bf16 = precision == "auto" and bool(bundle.meta.get("inference_bf16")) and str(device) == "cpu"
    bf16 = auto_bf16 or precision == "bf16"
    guard = float(bundle.meta.get("bf16_guard", DEFAULT_BF16_GUARD))
    cl = bool(bundle.meta.get("channels_last", True))
    ort_fp32 = uses_onnxruntime(bundle, backend)

    def run(xn, fb, half: bool):
        if ort_fp32 and not half:
            return _run_ort(model, xn, fb)
        return _run(model, xn, device=device, bf16=half, channels_last=cl, feats=fb)

    pipe = bundle.pipeline
    x = torch.as_tensor(x_uint8)
    n_views = 8 if tta else 1
    zs: list[list] = [[] for _ in range(n_views)]
    feats: list = []
    ins: list = []
    rechecked = 0
    starts = range(0, len(x), max(1, int(batch_size)))
    if progress:
        starts = tqdm(starts, desc="predicting (TTA x8)" if tta else "predicting", unit="batch", leave=False)
    with torch.inference_mode():
        for s in starts:
            xb = x[s:s + int(batch_size)]
            for v, view in enumerate(dihedral_views(xb) if tta else [xb]):
                xn = pipe.normalize(view)
                fb: list | None = [] if (features and v == 0) else None
                z = run(xn, fb, bf16)
                if auto_bf16:
                    near = torch.nonzero(top2_margin(z) < guard)[:, 0]
                    if len(near):
                        fr: list | None = [] if fb is not None else None
                        z[near] = run(xn[near], fr, False)
                        if fb is not None:
                            fb[0][near] = fr[0]
                        rechecked += int(len(near))
                zs[v].append(z)
                if fb is not None:
                    feats.append(fb[0])
                if inputs and v == 0:
                    ins.append(xn)
    c = len(bundle.classes)
    views = [torch.cat(zv) if zv else torch.zeros(0, c) for zv in zs]
    out = ForwardOutput(views[0], fp32_rechecked=rechecked)
    if features:
        out.features = torch.cat(feats).numpy() if feats else np.zeros((0, 0))
    if tta:
        out.view_logits = views
    if inputs:
        s = pipe.input_size
        out.inputs = torch.cat(ins) if ins else torch.zeros(0, 3, s, s)
    return out
