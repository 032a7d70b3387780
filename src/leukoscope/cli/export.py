"""``leukoscope export MODEL --onnx FILE``."""

from __future__ import annotations

import argparse

from leukoscope.cli._common import check_model_path, check_out_file
from leukoscope.models import load_bundle
from leukoscope.models.export import OPSET_RANGE, export_onnx

NAME = "export"
HELP = "export a model bundle to ONNX, checked against PyTorch with onnxruntime"
DESCRIPTION = (
    "Write an ONNX graph taking the normalised float NCHW input (batch x 3 x S x S, mean/std of the bundle) "
    "and returning logits; the bundle metadata (classes, mean/std, µm/px, temperature) is kept as ONNX metadata. "
    "The file is written only if onnxruntime reproduces PyTorch's outputs."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model bundle (RUN/model.safetensors, or the RUN folder)")
    p.add_argument("--onnx", required=True, metavar="FILE", help="output .onnx file")
    p.add_argument("--opset", type=int, default=17, metavar="N",
                   help=f"ONNX opset, {OPSET_RANGE[0]} to {OPSET_RANGE[1]} (default 17)")


def run(args: argparse.Namespace) -> int:
    if not OPSET_RANGE[0] <= args.opset <= OPSET_RANGE[1]:
        raise ValueError(f"--opset {args.opset} is not supported: give an opset from {OPSET_RANGE[0]} to "
                         f"{OPSET_RANGE[1]} (default 17)")
    check_out_file(args.onnx, "--onnx")
    check_model_path(args.model)
    check = export_onnx(load_bundle(args.model), args.onnx, opset=args.opset)
    print(f"wrote {check['path']} (opset {check['opset']}, input {check['input_shape']}); onnxruntime matches "
          f"PyTorch: max |diff| {check['max_abs_diff']:.2e}, same predictions")
    return 0
