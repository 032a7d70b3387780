"""What defines a training run: :class:`TrainConfig`, in groups.

A config has six groups and two plain settings:

``arch`` (:class:`ArchConfig`)
    the network: ``model`` name, ``input_size``, ``um_per_px``, ``model_kwargs``, ``pretrained``
    (start from the ImageNet weights of the model's registry entry).
``optim`` (:class:`OptimConfig`)
    the schedule: epochs, images per class, batch size, learning rate, warm-up, early stopping,
    validation fraction, how epochs are balanced (``balance_by``).
``augment`` (:class:`AugmentConfig`)
    training-only jitter; the very object :func:`leukoscope.train.augment.augment_batch` takes.
``scaling`` (:class:`ScaleConfig`)
    where the training images' µm/px comes from (``scale``) and ``white_balance``.
``runtime`` (:class:`RuntimeConfig`)
    how, not what: decode threads, device, CPU threads, bf16, channels-last, OOD reference.
    A resumed run may change these.
``finetune`` (:class:`FineTuneConfig`)
    starting from a trained bundle (``init_from``), head warm-up, body learning-rate scale, frozen
    BatchNorm. All off by default (training from scratch, as before).

plus ``seed`` and ``preset``. Every setting also has a flat name (the group's field name, except
``model`` for ``arch.name`` and ``scale`` for ``scaling.mode``): ``TrainConfig(epochs=3, blur=1.0)``,
``cfg.blur``, ``cfg.blur = 0.5`` all work. :meth:`TrainConfig.to_dict` writes the flat form (as
``config.json``, checkpoints and bundle metadata have always held it);
:meth:`TrainConfig.from_dict` reads the flat form and the grouped form of :meth:`TrainConfig.to_nested`.
Each field's ``metadata["help"]`` is the help text of its ``leukoscope train``/``cv`` option
(:func:`leukoscope.cli._common.add_config_options`): a new setting is one field.

>>> c = TrainConfig(model="plain_cnn", epochs=3, blur=1.0)
>>> c.arch.name, c.optim.epochs, c.augment.blur, c.blur
('plain_cnn', 3, 1.0, 1.0)
>>> TrainConfig.from_dict(c.to_nested()) == TrainConfig.from_dict(c.to_dict()) == c
True
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, fields, replace

from leukoscope.imaging.scale_policy import check_um_per_px
from leukoscope.models.registry import get_config

#: Values of ``scale``: where the training images' µm/px comes from.
SCALE_MODES = ("stated", "estimate")
#: Values of ``balance_by``: what an epoch draws ``per_class`` images of.
BALANCE_MODES = ("class", "source_class")


#: The smallest model input (pixels) a run may ask for.
MIN_INPUT_SIZE = 32


def _opt(help: str, **cli) -> dict:
    """Field metadata: the option's help text and argparse extras (``metavar``, ``choices``, ``const``, ``cli=False``)."""
    return {"help": help, **cli}


@dataclass
class ArchConfig:
    """The network and its input."""

    name: str = field(default="mobilenet_v3_small", metadata=_opt("model name (see --list-models)", metavar="NAME"))
    input_size: int | None = field(default=None, metadata=_opt(
        "input size in pixels (default: the model's)", metavar="PX"))
    um_per_px: float | None = field(default=None, metadata=_opt(
        "µm/px of the model input (default: the model's)", metavar="X"))
    model_kwargs: dict = field(default_factory=dict, metadata=_opt("keyword arguments of the model builder", cli=False))
    pretrained: bool = field(default=False, metadata=_opt(
        "start from the ImageNet weights the model's registry entry names (efficientnet_lite0/1/2, mobilenet_v2; "
        "read from an installed package, SHA-256 checked, never downloaded) and normalise with the weights' "
        "mean/std; the bundle records the weights. Unless set otherwise, a pretrained run fine-tunes gently: "
        "--head-warmup-epochs 1 (a random head's first gradients would wreck the features), --body-lr-scale 0.3, "
        "and BatchNorm statistics NOT frozen (ImageNet's statistics do not describe stained cells). Ignored "
        "with --init-from (the weights come from the bundle)"))


@dataclass
class OptimConfig:
    """Epochs, batches, learning rate and early stopping."""

    epochs: int = field(default=12, metadata=_opt("maximum number of epochs"))
    per_class: int = field(default=500, metadata=_opt(
        "images drawn per class per epoch (balancing target)", metavar="N"))
    batch_size: int = field(default=64, metadata=_opt("images per step"))
    lr: float = field(default=3e-3, metadata=_opt("peak learning rate (AdamW)"))
    weight_decay: float = field(default=1e-4, metadata=_opt("AdamW weight decay"))
    warmup_epochs: float = field(default=0.5, metadata=_opt("linear learning-rate warm-up, in epochs"))
    schedule: str = field(default="cosine", metadata=_opt(
        "learning-rate schedule after the warm-up", choices=("cosine", "constant")))
    label_smoothing: float = field(default=0.0, metadata=_opt("label smoothing of the cross-entropy loss"))
    patience: int = field(default=5, metadata=_opt(
        "early stopping: epochs without validation-loss improvement"))
    val_fraction: float = field(default=0.1, metadata=_opt(
        "fraction of each class held out of training for validation (stratified)"))
    balance_by: str = field(default="class", metadata=_opt(
        "what an epoch balances: 'class' draws --per-class images of every class; 'source_class' draws "
        "about --per-class images of every class spread evenly over the sources (labs) that have it "
        "(needs a 'source' column). Default of 'leukoscope train'/'cv' when the data hold more than one source: "
        "source_class", choices=BALANCE_MODES))


@dataclass(frozen=True)
class AugmentConfig:
    """Training-only jitter (:func:`leukoscope.train.augment.augment_batch`)."""

    rotate: bool = field(default=True, metadata=_opt("rotation by a uniform angle in [0, 360)"))
    flip: bool = field(default=True, metadata=_opt("random horizontal and vertical flips"))
    brightness: float = field(default=0.0, metadata=_opt("brightness jitter, factor in [1-B, 1+B]", metavar="B"))
    contrast: float = field(default=0.0, metadata=_opt("contrast jitter, factor in [1-C, 1+C]", metavar="C"))
    stain_jitter: float = field(default=0.0, metadata=_opt(
        "HED stain jitter (leukoscope.train.augment.hed_jitter): sigma of each stain's scale and shift; the option without a "
        "value: 0.05", metavar="SIGMA", const=0.05))
    saturation: float = field(default=0.0, metadata=_opt(
        "saturation jitter after the stain jitter: each image blended with its grey version, factor in "
        "[1-S, 1+S] (0 = off)", metavar="S"))
    gamma: float = field(default=0.0, metadata=_opt(
        "tone-curve jitter: pixel values raised to a gamma with log(gamma) in [-G, G] (0 = off)", metavar="G"))
    blur: float = field(default=0.0, metadata=_opt(
        "defocus jitter: each image blurred with probability 1/2 by a Gaussian of sigma drawn from [0, PX] "
        "pixels of the model input (0 = off)", metavar="PX"))

    @property
    def colour(self) -> dict:
        """Keyword arguments of :func:`leukoscope.train.augment.colour_augment`."""
        return {"stain": self.stain_jitter, "saturation": self.saturation, "gamma": self.gamma, "blur": self.blur}


@dataclass
class ScaleConfig:
    """The training images' physical scale and colour balance."""

    mode: str = field(default="stated", metadata=_opt(
        "µm/px of the training images: 'stated' uses the dataset's um_per_px where it gives one and otherwise "
        "resizes each image to the input as it is; 'estimate' estimates µm/px from the red cells (pooled per "
        "source) where the dataset gives none, so that cells have the model's physical size; an implausible "
        "estimate is not used (warning)", choices=SCALE_MODES))
    white_balance: bool = field(default=False, metadata=_opt(
        "divide every image by the colour of its own background (the plasma between the cells), in training "
        "and, recorded in the bundle, in every later prediction: removes the illuminant's and camera's colour "
        "cast (docs/robustness.md; --no-white-balance switches it off)"))


@dataclass
class RuntimeConfig:
    """How the run is executed; may differ on resume."""

    workers: int = field(default=2, metadata=_opt("threads decoding images"))
    device: str = field(default="auto", metadata=_opt("cpu, cuda, cuda:1 (default: auto)"))
    threads: str = field(default="auto", metadata=_opt(
        "CPU threads: auto (re-measured while training) or a number"))
    bf16: str = field(default="auto", metadata=_opt(
        "bf16 autocast on CPU (auto: the model's measured default)", choices=("auto", "on", "off")))
    channels_last: str = field(default="auto", metadata=_opt(
        "channels-last memory format (auto: the model's default)", choices=("auto", "on", "off")))
    ood_reference: bool = field(default=True, metadata=_opt(
        "fit the out-of-distribution reference on the validation images into the bundle"))


@dataclass
class FineTuneConfig:
    """Starting from a trained model; every setting off by default (training from scratch)."""

    init_from: str | None = field(default=None, metadata=_opt(
        "start from the weights of this bundle (model.safetensors or its run folder); classes the bundle "
        "lacks get new classifier rows, the old classes keep theirs", metavar="BUNDLE"))
    head_warmup_epochs: int = field(default=0, metadata=_opt(
        "first epochs that train only the classifier (the body frozen)", metavar="N"))
    body_lr_scale: float = field(default=1.0, metadata=_opt(
        "learning rate of the body (everything but the classifier) as a multiple of --lr", metavar="F"))
    freeze_bn: bool = field(default=False, metadata=_opt(
        "keep the body's BatchNorm layers in eval mode with frozen statistics"))


#: The groups of a :class:`TrainConfig`: attribute name -> class.
GROUPS: dict[str, type] = {"arch": ArchConfig, "optim": OptimConfig, "augment": AugmentConfig,
                           "scaling": ScaleConfig, "runtime": RuntimeConfig, "finetune": FineTuneConfig}
#: Flat names that differ from the group's field name.
_RENAMED = {("arch", "name"): "model", ("scaling", "mode"): "scale"}
#: Flat setting name -> (group, field), in group order.
FLAT: dict[str, tuple[str, str]] = {_RENAMED.get((g, f.name), f.name): (g, f.name)
                                    for g, cls in GROUPS.items() for f in fields(cls)}
#: Flat names of the settings that do not change what is learned (free to differ on resume).
RUNTIME_FIELDS = frozenset(f.name for f in fields(RuntimeConfig)) | {"progress"}


def setting_field(name: str):
    """The dataclass field of flat setting ``name`` (its ``metadata`` holds the help text)."""
    g, f = FLAT[name]
    return next(x for x in fields(GROUPS[g]) if x.name == f)


@dataclass(init=False)
class TrainConfig:
    """Everything that defines a training run (saved flat as ``config.json``); see the module docstring."""

    arch: ArchConfig
    optim: OptimConfig
    augment: AugmentConfig
    scaling: ScaleConfig
    runtime: RuntimeConfig
    finetune: FineTuneConfig
    seed: int = field(default=0, metadata=_opt("random seed (validation split, initial weights, epochs)"))
    preset: str | None = None

    def __init__(self, *, seed: int = 0, preset: str | None = None, **settings):
        """Groups as objects or dicts (``arch=ArchConfig(...)``), or any setting by its flat name."""
        for g, cls in GROUPS.items():
            v = settings.pop(g, None)
            object.__setattr__(self, g, cls(**v) if isinstance(v, dict) else copy.deepcopy(v) if v else cls())
        object.__setattr__(self, "seed", seed)
        object.__setattr__(self, "preset", preset)
        unknown = sorted(set(settings) - set(FLAT))
        if unknown:
            raise TypeError(f"unknown training setting(s) {', '.join(unknown)}; known: {', '.join(FLAT)}")
        for k, v in settings.items():
            setattr(self, k, v)

    def __getattr__(self, name: str):
        # only reached when normal lookup fails: a flat setting name
        if name in FLAT and FLAT[name][0] in self.__dict__:
            g, f = FLAT[name]
            return getattr(self.__dict__[g], f)
        raise AttributeError(f"{type(self).__name__!r} has no attribute {name!r}")

    def __setattr__(self, name: str, value) -> None:
        if name in FLAT:
            g, f = FLAT[name]
            object.__setattr__(self, g, replace(getattr(self, g), **{f: value}))
        elif name in GROUPS or name in ("seed", "preset"):
            object.__setattr__(self, name, value)
        else:
            raise AttributeError(f"unknown training setting {name!r}")

    def check(self) -> "TrainConfig":
        """Raise ``ValueError`` naming the option when a setting lies outside its range (before any
        work: :meth:`resolved` calls it, so the API and the command line share the checks); returns self."""
        problems = []

        def need(name: str, ok, what: str, integer: bool = False) -> None:
            v = getattr(self, name)
            bad_type = isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not float(v).is_integer())
            if bad_type or not math.isfinite(float(v)) or not ok(v):
                problems.append(f"{name} must be {what}, got {v!r} (--{name.replace('_', '-')})")

        if self.init_from:  # 0 epochs: the bundle's weights as they are, the head grown, the temperature re-fitted
            need("epochs", lambda v: v >= 0, "a whole number, 0 or more", True)
        else:
            need("epochs", lambda v: v >= 1, "a whole number of at least 1 (0 only with --init-from)", True)
        need("per_class", lambda v: v >= 1, "a whole number of at least 1", True)
        need("batch_size", lambda v: v >= 1, "a whole number of at least 1", True)
        if self.input_size is not None:
            need("input_size", lambda v: v >= MIN_INPUT_SIZE, f"a whole number of at least {MIN_INPUT_SIZE} pixels",
                 True)
        if self.um_per_px is not None:  # the one validator for every µm/px (it states the plausible range)
            check_um_per_px(self.um_per_px, "um_per_px of the model input (--um-per-px)")
        need("lr", lambda v: v > 0, "positive")
        need("weight_decay", lambda v: v >= 0, "0 or more")
        need("warmup_epochs", lambda v: v >= 0, "0 or more")
        need("label_smoothing", lambda v: 0 <= v < 1, "in [0, 1)")
        need("patience", lambda v: v >= 1, "a whole number of at least 1", True)
        need("val_fraction", lambda v: 0 <= v < 1, "in [0, 1) (a fraction of each class; 0: no validation)")
        need("head_warmup_epochs", lambda v: v >= 0, "a whole number, 0 or more", True)
        need("body_lr_scale", lambda v: v > 0, "positive")
        for name in ("brightness", "contrast", "saturation"):
            need(name, lambda v: 0 <= v <= 1, "in [0, 1]")
        for name in ("stain_jitter", "gamma", "blur"):
            need(name, lambda v: v >= 0, "0 or more")
        if problems:
            raise ValueError("training settings out of range: " + "; ".join(problems))
        return self

    def resolved(self) -> "TrainConfig":
        """A copy with model defaults filled in (input size, µm/px), its ranges (:meth:`check`) and choices checked."""
        self.check()
        mc = get_config(self.model, input_size=self.input_size)
        c = copy.deepcopy(self)
        c.input_size = mc.input_size
        if c.um_per_px is None:
            c.um_per_px = mc.um_per_px
        else:  # a stated scale, checked by :meth:`check`: the number the validator returns
            c.um_per_px = check_um_per_px(c.um_per_px, "um_per_px of the model input (--um-per-px)")
        if c.scale not in SCALE_MODES:
            raise ValueError(f"scale must be one of {', '.join(SCALE_MODES)}, got {c.scale!r}")
        if c.balance_by not in BALANCE_MODES:
            raise ValueError(f"balance_by must be one of {', '.join(BALANCE_MODES)}, got {c.balance_by!r}")
        return c.check()

    def to_dict(self) -> dict:
        """The flat form: ``{setting: value}`` (``config.json``, checkpoints, bundle metadata)."""
        d = {name: copy.deepcopy(getattr(getattr(self, g), f)) for name, (g, f) in FLAT.items()}
        return {**d, "seed": self.seed, "preset": self.preset}

    def to_nested(self) -> dict:
        """The grouped form: ``{"arch": {...}, "optim": {...}, ..., "seed", "preset"}``."""
        d = {g: {f.name: copy.deepcopy(getattr(getattr(self, g), f.name)) for f in fields(cls)}
             for g, cls in GROUPS.items()}
        return {**d, "seed": self.seed, "preset": self.preset}

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """A config from the flat or the grouped form; keys it does not know (``classes``, ...) are ignored."""
        kw: dict = {}
        for k, v in d.items():
            if k in GROUPS and isinstance(v, dict):
                names = {f.name for f in fields(GROUPS[k])}
                kw.update({FLAT_NAME[(k, f)]: x for f, x in v.items() if f in names})
            elif k in FLAT or k in ("seed", "preset"):
                kw[k] = v
        return cls(**kw)


#: (group, field) -> flat setting name.
FLAT_NAME = {v: k for k, v in FLAT.items()}


def config_diff(a: dict, b: dict) -> list[str]:
    """Differences that matter between two flat configs; a setting an older config lacks counts as its default."""
    defaults = TrainConfig().to_dict()
    a = {**defaults, **TrainConfig.from_dict(a).to_dict()} if any(k in GROUPS for k in a) else {**defaults, **a}
    b = {**defaults, **TrainConfig.from_dict(b).to_dict()} if any(k in GROUPS for k in b) else {**defaults, **b}
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if k not in RUNTIME_FIELDS and a.get(k) != b.get(k)]
