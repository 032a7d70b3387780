"""Export a bundle to ONNX and check with onnxruntime that the outputs match.

The ONNX graph takes the *normalised* float NCHW input (``bundle.preprocess``'s output)
and returns logits; the bundle metadata (classes, mean/std, µm/px, temperature, and
``white_balance``: whether each image is first divided by its background colour,
:func:`leukoscope.imaging.colour.white_balance`) is stored as ONNX metadata properties so that the
file stands on its own.

>>> export_onnx(load_bundle("run/model.safetensors"), "model.onnx")   # doctest: +SKIP
{'max_abs_diff': 2.1e-06, ...}
"""

from __future__ import annotations

import io
import json
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from leukoscope.io import atomic_path


class LogitsAndFeatures(nn.Module):
    """``model`` returning ``(logits, penultimate features)``: the input of its last ``nn.Linear``."""

    def __init__(self, model: nn.Module, head: nn.Linear):
        super().__init__()
        self.model, self.head = model, head

    def forward(self, x):
        feats: list = []
        hook = self.head.register_forward_hook(lambda m, inp, out: feats.append(inp[0]))
        try:
            z = self.model(x)
        finally:
            hook.remove()
        return z, feats[0].flatten(1)


#: ONNX opsets :func:`export_onnx` accepts: from the first with every operator the models use (13) to the
#: newest torch's TorchScript exporter writes (20).
OPSET_RANGE = (13, 20)


def onnx_bytes(model: nn.Module, example: torch.Tensor, *, head: nn.Linear | None = None, opset: int = 17) -> bytes:
    """``model`` (eval, CPU, fp32) as an ONNX graph in memory: input ``input`` (normalised float NCHW, any
    batch), output ``logits`` and, with ``head`` (its last Linear layer), ``features``."""
    net = LogitsAndFeatures(model, head) if head is not None else model
    outputs = ["logits", "features"] if head is not None else ["logits"]
    buf = io.BytesIO()
    cl = any(w.ndim == 4 and not w.is_contiguous() and w.is_contiguous(memory_format=torch.channels_last)
             for w in model.parameters())
    model.to(memory_format=torch.contiguous_format)  # exported in NCHW; the model's own format restored after
    try:
        with warnings.catch_warnings():
            # the TorchScript exporter: the torch.export-based one needs onnxscript, not a dependency
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            torch.onnx.export(net, (example.contiguous(),), buf, input_names=["input"], output_names=outputs,
                              dynamic_axes={"input": {0: "batch"}, **{o: {0: "batch"} for o in outputs}},
                              opset_version=opset, dynamo=False)
    finally:
        if cl:
            model.to(memory_format=torch.channels_last)
    return buf.getvalue()


def export_onnx(bundle, path: str | os.PathLike, *, opset: int = 17, batch: int = 2, atol: float = 1e-3,
                seed: int = 0) -> dict:
    """Write ``path``; verify logits against PyTorch on a random batch; return the check.

    ``opset`` must lie in :data:`OPSET_RANGE` (a :class:`ValueError` says so otherwise)."""
    if not isinstance(opset, int) or not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        raise ValueError(f"ONNX opset {opset} is not supported: give an opset from {OPSET_RANGE[0]} to "
                         f"{OPSET_RANGE[1]} (default 17)")
    model = bundle.model.float().eval().to("cpu")
    s = bundle.input_size
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, s, s, generator=g)
    x = (x - torch.tensor(bundle.mean).view(1, 3, 1, 1)) / torch.tensor(bundle.std).view(1, 3, 1, 1)
    path = Path(path)
    with atomic_path(path) as tmp:
        proto = onnx.load_model_from_string(onnx_bytes(model, x, opset=opset))
        meta = {k: v for k, v in bundle.meta.items() if k in (
            "classes", "model", "input_size", "mean", "std", "um_per_px", "temperature", "intended_use",
            "fingerprint", "white_balance")}
        entry = proto.metadata_props.add()
        entry.key, entry.value = "leukoscope", json.dumps(meta)
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
        sess = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        got = sess.run(["logits"], {"input": x.numpy()})[0]
        with torch.inference_mode():
            want = model(x).numpy()
        diff = float(np.abs(got - want).max())
        same_pred = bool((got.argmax(1) == want.argmax(1)).all())
        if not (diff <= atol * max(1.0, float(np.abs(want).max())) and same_pred):
            raise RuntimeError(f"ONNX export of {bundle.path} does not match PyTorch: max |diff| {diff:.3g}"
                               f"{'' if same_pred else ', different predictions'}; not written")
    if bundle.meta.get("channels_last", True):
        bundle.model.to(memory_format=torch.channels_last)
    return {"path": str(path), "max_abs_diff": diff, "same_predictions": same_pred, "opset": opset,
            "input_shape": ["batch", 3, s, s]}
