"""The one home of every default: typed dataclasses, YAML presets that set differences, overrides.

A run is described by one `Config`. Presets (`presets/<name>.yaml`, or any YAML path) hold only the
values that differ from the defaults below; `section.key=value` overrides come last. Unknown keys
and values of the wrong type fail loudly, so a typo never silently trains the wrong model.

Each section means one thing: `data` (what is read and how it is augmented), `model` (the
architecture and what meta-transfer adapts), `views` (test-time views), `transfer` (where an
`--init-from` backbone comes from), `pretrain`, `base_learner`, `meta_train`, `meta_test`.
A setting stays only if a shipped preset uses it or docs/results.md states its measured effect.
Settings that moved or went are listed in `RENAMED` and `REMOVED`, so a config.yaml written
before still loads (see `migrate`); overrides must use the current names.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "Config",
    "DataConfig",
    "ModelConfig",
    "ViewsConfig",
    "TransferConfig",
    "PretrainConfig",
    "BaseLearnerConfig",
    "MetaTrainConfig",
    "HardTaskConfig",
    "MetaTestConfig",
    "list_presets",
    "load_config",
    "check_config", "check_shift_pixels",
    "RENAMED", "REMOVED",
    "config_from_dict",
    "migrate",
    "config_to_dict",
]


@dataclass
class DataConfig:
    name: str = "fc100"  # prepared dataset folder under root (see `mtl data prepare`)
    root: str = "data"  # where `mtl data prepare` wrote its caches
    augment: str = "crop_flip"  # pre-training augmentation: none | crop_flip | resized_crop_flip
    crop_padding: int = 4  # pixels of zero padding for crop_flip (CIFAR habit)
    color_jitter: float = 0.0  # strength of brightness/contrast/saturation jitter, 0 = off
    hflip: bool = True  # random horizontal flips (off for Omniglot: strokes have a direction)
    # Input normalisation (per channel, 0..1 scale); empty = the prepared train split's statistics.
    # Filled in when a run starts with transfer.normalisation=source.
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)


@dataclass
class ModelConfig:
    backbone: str = "resnet12"  # see `mtl backbones`: conv4, resnet12, resnet12_wide, resnet25
    width: float = 1.0  # channel multiplier, for quick CPU runs
    drop_rate: float = 0.1  # dropout before the features during pre-training (TF code: keep 0.9)
    drop_block_rate: float = 0.0  # DropBlock after the last two ResNet-12 blocks in pre-training (RFS, MetaOptNet: 0.1); 0 = off
    drop_block_size: int = 2  # side of the dropped squares (RFS: 2 on 32x32 CIFAR, 5 on 84x84 miniImageNet)
    adapt: str = "ss"  # what meta-transfer learns in the backbone: ss (scale-shift) | ft (all convs)
    ss_mode: str = "kernel"  # scale per (out, in) kernel slice (paper's code) or per out "channel"
    ss_bn_affine: bool = False  # also meta-learn BatchNorm's weight and bias with SS (the PyTorch port's setting)
    bn_mode: str = "frozen"  # frozen running statistics | batch (transductive, the TF code's way)


@dataclass
class ViewsConfig:
    """Test-time views: wherever an image is scored, its feature is the mean of the features of
    several views of it. Training steps see single images."""

    # The image and its mirror image (validation, meta-test, predict, bundles).
    flip: bool = False
    # With s > 0 the delivered model (meta-test, predict, the API, bundles) also averages over the
    # 3x3 grid of copies shifted by -s, 0, s pixels (9 views, each mirrored too with flip: 9 or 18
    # forwards an image); 0 = off. Validation during pre-training and meta-training leaves them out:
    # it would multiply the cost of every check.
    shift_pixels: int = 0


@dataclass
class TransferConfig:
    """Where the backbone that starts pre-training comes from (CLI `--init-from`); see metatransfer/transfer.py."""

    source: str = ""  # a run directory (its pretrain/best) or an `mtl export` safetensors bundle; "" = random init
    sha256: str = ""  # the source's checksum, recorded when the run starts
    # dataset: the new data's own statistics (default: inputs standardised as the backbone saw its
    # own, and grey<->RGB conversion exact) | source: the statistics the backbone was trained with
    normalisation: str = "dataset"


@dataclass
class PretrainConfig:
    epochs: int = 100
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # cosine | step
    lr_step: int = 30  # epochs between decays, for schedule=step
    lr_gamma: float = 0.2  # decay factor, for schedule=step
    label_smoothing: float = 0.0
    # Base classes pre-training leaves out, for meta-training on them (meta_train.classes=held_out);
    # drawn with a generator seeded by this number alone, so every phase and seed holds out the same.
    held_out_classes: int = 0
    save_epochs: list[int] = field(default_factory=list)  # also keep pretrain/epoch-N for these N (meta_train.init_checkpoint)
    # Self-distillation (RFS's "born-again" step, Tian et al. 2020): a finished run on the same base
    # classes whose pre-trained network (pretrain/last: backbone and classifier) teaches this one;
    # loss = (1 - distill_weight) * CE + distill_weight * T^2 * KL(teacher || student), both at temperature T.
    distill_from: str = ""  # its run directory; "" = plain cross-entropy
    distill_sha256: str = ""  # the teacher's pretrain/last checksum, recorded when the run starts
    distill_weight: float = 0.5  # RFS: 0.5
    distill_temperature: float = 4.0  # RFS: 4
    # Born-again in one run: generations=G pre-trains G networks in a row, each taught by the one before
    # (generation g < G in RUN/generations/g, a run directory of its own; the last is this run's).
    generations: int = 1
    # Rotation self-supervision (Gidaris et al., ICCV 2019): each batch also goes through the backbone
    # turned by a random multiple of 90 degrees, and a 4-way head predicts the turn;
    # loss = CE + rotation_weight * rotation CE. 0 = off (plain pre-training, bit for bit). Twice the compute.
    rotation_weight: float = 0.0
    val_every: int = 1  # epochs between few-shot validations that pick the best checkpoint
    val_episodes: int = 600  # 5-way 1-shot episodes, a fresh FC fine-tuned on frozen features


@dataclass
class BaseLearnerConfig:
    """The linear base-learner fine-tuned on each task's support set (inner loop)."""

    steps: int = 100  # gradient steps on the support set (PyTorch port: 100; TF code: 20)
    lr: float = 0.01  # step size on the mean cross-entropy
    init: str = "zeros"  # theta's start: zeros (see docs/method.md), kaiming (PyTorch port), xavier (TF code)
    # Where each task's FC starts: theta (MTL) | prototypes: its support class means (E3BM's
    # "feature" init), with theta added as a learned offset.
    fc_init: str = "theta"
    prototype_normalise: bool = False  # prototypes scaled to unit length
    logits: str = "linear"  # linear: w.f + b (MTL) | cosine: temperature * cos(f, w) + b (Meta-Baseline, E3BM)
    temperature: float = 10.0  # scale of cosine logits (Meta-Baseline starts at 10, E3BM uses 8)
    learn_temperature: bool = False  # meta-learn the temperature (at meta_train.lr_head)
    learn_theta: bool = True  # False: theta stays at its init (with zeros and prototypes: no offset)
    feature_centre: bool = False  # subtract from each feature (support and query) its mean over its dimensions (E3BM's code)
    # E3BM (Liu, Schiele, Sun, ECCV 2020): none | e3bm: the task's head is a task-weighted sum of its
    # heads after each inner step, with task-conditioned step sizes, both from two meta-learned
    # hyperprior learners (at meta_train.lr_hyperprior). See docs/method.md.
    ensemble: str = "none"
    ensemble_init: str = "last"  # the combination weights' start: last (1 on the last step: plain MTL) | equal (1/steps each)


@dataclass
class HardTaskConfig:
    """The hard-task meta-batch (journal version; authors' preliminary TF code as default)."""

    enabled: bool = True
    normal_iterations: int = 10  # normal meta-batches whose failure classes form the pool
    hard_iterations: int = 5  # hard meta-batches re-sampled from the pool after them
    start: int = 10  # first meta-iteration at which HT may run (authors' code: after 10)


@dataclass
class MetaTrainConfig:
    iterations: int = 20000  # meta-batches, hard ones included (they count, as in the TF code)
    n_way: int = 5
    n_shot: int = 1
    n_query: int = 15
    n_tasks: int = 2  # tasks per meta-batch, forwarded through the backbone together
    first_order: bool = False  # True: query loss reaches SS through query features only
    lr_ss: float = 1e-4  # Adam learning rate of the scale-shift (or FT) parameters
    lr_head: float = 1e-3  # Adam learning rate of the base-learner initialisation theta
    lr_hyperprior: float = 1e-6  # Adam learning rate of E3BM's hyperprior learners (base_learner.ensemble=e3bm; its code: 1e-6)
    lr_decay_every: int = 1000  # iterations between halvings of both rates
    lr_gamma: float = 0.5
    val_every: int = 500  # iterations between validations that pick the best checkpoint
    val_episodes: int = 600
    # Seed of the validation episodes that pick the meta-train checkpoint. It differs from
    # meta_test.seed, whose validation episodes picked the pre-training epoch: scoring iteration 0
    # on those again would hand the start a winner's-curse bonus that later iterations must beat.
    val_seed: int = 2
    # Further shots to validate at, each keeping its own meta_train/best-<K>shot that meta-test uses
    # for K-shot tasks: the paper trains one model per shot, and a checkpoint that helps 1-shot can
    # cost 5-shot. Empty: validate at n_shot only (meta_train/best serves every shot).
    val_shots: list[int] = field(default_factory=list)
    classes: str = "all"  # base classes of the meta-training tasks: all | held_out (those pre-training left out)
    augment: bool = False  # apply the pre-training augmentation (data.augment, hflip, jitter) to episode images
    init_checkpoint: str = "best"  # the pre-trained backbone meta-training starts from: best | last | epoch-N (pretrain.save_epochs)
    hard_tasks: HardTaskConfig = field(default_factory=HardTaskConfig)


@dataclass
class MetaTestConfig:
    episodes: int = 600
    n_way: list[int] = field(default_factory=lambda: [5])
    n_shot: list[int] = field(default_factory=lambda: [1, 5])
    n_query: int = 15  # per class; the paper's protocol uses n_query = n_shot
    protocol: str = "standard"  # standard | paper (K queries, support doubled by h-flip)
    split: str = "test"
    seed: int = 1  # episodes depend on this seed only: the same on every machine
    checkpoint: str = "best"  # best (by validation; per shot with meta_train.val_shots) | last (after the final meta-iteration)


@dataclass
class Config:
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # bf16 autocast where the device has native bf16 (CUDA, AVX-512/AMX CPUs); fp32 elsewhere
    channels_last: bool = True
    checkpoint_every: int = 200  # steps between resumable checkpoints inside a phase
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    views: ViewsConfig = field(default_factory=ViewsConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    base_learner: BaseLearnerConfig = field(default_factory=BaseLearnerConfig)
    meta_train: MetaTrainConfig = field(default_factory=MetaTrainConfig)
    meta_test: MetaTestConfig = field(default_factory=MetaTestConfig)


_CHOICES = {
    "data.augment": ("none", "crop_flip", "resized_crop_flip"),
    "model.adapt": ("ss", "ft"),
    "model.ss_mode": ("kernel", "channel"),
    "model.bn_mode": ("frozen", "batch"),
    "transfer.normalisation": ("dataset", "source"),
    "pretrain.schedule": ("cosine", "step"),
    "base_learner.init": ("kaiming", "xavier", "zeros"),
    "base_learner.fc_init": ("theta", "prototypes"),
    "base_learner.logits": ("linear", "cosine"),
    "base_learner.ensemble": ("none", "e3bm"),
    "base_learner.ensemble_init": ("last", "equal"),
    "meta_train.classes": ("all", "held_out"),
    "meta_test.protocol": ("standard", "paper"),
    "meta_test.split": ("train", "val", "test"),
    "meta_test.checkpoint": ("best", "last"),
}

# Sizes, counts and intervals: the smallest value each may take (an interval of 0 would divide by
# zero mid-run, a batch of 0 would train nothing). Checked as each value is read, so a bad one stops
# a command before any work. (Keys with a check of their own in `check_config` are not repeated.)
_AT_LEAST: dict[str, int] = {
    "checkpoint_every": 1,
    "data.crop_padding": 0,
    "pretrain.epochs": 0,  # 0: keep the --init-from backbone as it is
    "pretrain.batch_size": 1,
    "pretrain.lr_step": 1,
    "pretrain.held_out_classes": 0,
    "pretrain.save_epochs": 1,
    "pretrain.val_every": 1,
    "pretrain.val_episodes": 1,
    "base_learner.steps": 0,  # 0: no fine-tuning on the support set (the FC's start scores the queries)
    "meta_train.iterations": 1,
    "meta_train.n_way": 2,
    "meta_train.n_shot": 1,
    "meta_train.n_query": 1,
    "meta_train.n_tasks": 1,
    "meta_train.lr_decay_every": 1,
    "meta_train.val_every": 1,
    "meta_train.val_episodes": 1,
    "meta_train.hard_tasks.normal_iterations": 0,
    "meta_train.hard_tasks.hard_iterations": 0,
    "meta_train.hard_tasks.start": 0,
    "meta_test.episodes": 1,
    "meta_test.n_way": 2,
    "meta_test.n_shot": 1,
    "meta_test.n_query": 1,
}
# Real-valued settings that must be positive, or lie in [0, 1).
_POSITIVE = ("model.width", "pretrain.lr_gamma", "meta_train.lr_gamma", "base_learner.temperature")
_FRACTION = ("model.drop_rate", "pretrain.momentum", "pretrain.label_smoothing")
_NOT_NEGATIVE = ("data.color_jitter", "pretrain.weight_decay")


# Settings that moved, old dotted key -> new. A config.yaml written before the move (a run to resume,
# score or transfer from, or a preset file) reads the old name as the new one; an override on the
# command line or in the API must use the new name, and the error says which it is.
RENAMED: dict[str, str] = {
    "model.flip_average": "views.flip",
    "model.shift_views": "views.shift_pixels",
    "model.init_from": "transfer.source",
    "model.init_sha256": "transfer.sha256",
    "model.init_normalisation": "transfer.normalisation",
}

# Settings that were removed (no preset used them and no measurement backed them), with the value
# that left them off. A stored config may still hold one at that value, which changes nothing;
# at any other value the run used an option this code no longer has, and reading it is an error.
REMOVED: dict[str, Any] = {
    "model.ss_shortcuts": False,  # scale-shifting of the 1x1 shortcut convs as well
    "pretrain.val_shot": 1,  # shots of the pre-training validation episodes (always 1)
    "base_learner.prototype_centre": False,  # prototypes minus the task's mean prototype
    "base_learner.prototype_scale": 1.0,  # prototypes times a constant
    "meta_train.ss_l2": 0.0,  # a pull of scaling-shifting back toward identity
    "meta_train.hard_tasks.fresh_images": True,  # False: hard tasks reused the images that failed
    "meta_train.hard_tasks.min_classes": 0,  # a hard-task pool larger than n_way
}


def _pop(values: dict[str, Any], dotted: str) -> tuple[bool, Any]:
    """Remove a dotted key from nested dicts: (whether it was there, its value)."""
    *sections, key = dotted.split(".")
    node: Any = values
    for section in sections:
        node = node.get(section) if isinstance(node, dict) else None
    if not isinstance(node, dict) or key not in node:
        return False, None
    return True, node.pop(key)


def migrate(values: dict[str, Any], source: str = "the config") -> dict[str, Any]:
    """A stored config's nested values with renamed keys under their new names and removed keys,
    at their old default, dropped; `values` itself is left as it was.

    Raises:
        ValueError: a removed key at another value (naming it and `source`), or a key given under
            both its old and its new name.
    """
    values = copy.deepcopy(values)
    for old, new in RENAMED.items():
        found, value = _pop(values, old)
        if not found:
            continue
        *sections, key = new.split(".")
        node = values
        for section in sections:
            node = node.setdefault(section, {})
        if key in node:
            raise ValueError(f"{source} sets both {old} and {new}, its new name: keep {new} only.")
        node[key] = value
    for old, default in REMOVED.items():
        found, value = _pop(values, old)
        if found and (value != default or isinstance(value, bool) != isinstance(default, bool)):
            raise ValueError(f"{source} sets {old}={value!r}, an option that has been removed (only its old default "
                             f"{default!r} can be read): that run used a removed option, which this version cannot repeat.")
    return values


def _moved(dotted: str) -> str | None:
    """Why a key is unknown, if it was renamed or removed."""
    if dotted in RENAMED:
        return f"Config key {dotted} is now {RENAMED[dotted]}: give {RENAMED[dotted]}=... instead."
    if dotted in REMOVED:
        return (f"Config key {dotted} has been removed (it was off by default, no preset used it and no measurement "
                f"backed it); leave it out.")
    return None


def _check_range(dotted: str, value: Any) -> None:
    """Raise ValueError naming `dotted` if `value` (or an item of a list) is out of its range."""
    for item in value if isinstance(value, list) else [value]:
        if dotted in _AT_LEAST and item < _AT_LEAST[dotted]:
            raise ValueError(f"Config key {dotted} must be at least {_AT_LEAST[dotted]}; got {item!r}.")
        if dotted in _POSITIVE and not item > 0:
            raise ValueError(f"Config key {dotted} must be positive; got {item!r}.")
        if dotted in _FRACTION and not 0 <= item < 1:
            raise ValueError(f"Config key {dotted} must lie in [0, 1); got {item!r}.")
        if dotted in _NOT_NEGATIVE and item < 0:
            raise ValueError(f"Config key {dotted} must be 0 or positive; got {item!r}.")


def list_presets() -> list[str]:
    """Names of the presets shipped with the package."""
    folder = resources.files("metatransfer") / "presets"
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read_preset(preset: str) -> dict[str, Any]:
    path = Path(preset)
    if not path.suffix:
        packaged = resources.files("metatransfer") / "presets" / f"{preset}.yaml"
        if not packaged.is_file():
            raise ValueError(f"Unknown preset {preset!r}. Shipped presets: {', '.join(list_presets())}; or give a YAML path.")
        return yaml.safe_load(packaged.read_text()) or {}
    if not path.is_file():
        raise FileNotFoundError(f"Preset file {path} does not exist.")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"Preset file {path} must hold a mapping of sections, not {type(values).__name__}.")
    return migrate(values, f"Preset file {path}")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check (and gently convert) one value against its field's type annotation."""
    origin = typing.get_origin(annotation)
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        items = value if isinstance(value, list) else [value]
        return [_coerce(item, item_type, key) for item in items]
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML follows YAML 1.1: 1e-3 (no dot) is read as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ValueError(f"Config key {key} expects {getattr(annotation, '__name__', annotation)}, got {value!r}.")


def _apply(target: Any, values: dict[str, Any], prefix: str = "") -> None:
    hints = typing.get_type_hints(type(target))
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in hints:
            if _moved(dotted):
                raise ValueError(_moved(dotted))
            known = ", ".join(f"{prefix}{name}" for name in hints)
            raise ValueError(f"Unknown config key {dotted!r}. Known keys here: {known}.")
        current = getattr(target, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"Config key {dotted!r} is a section; give its keys, e.g. {dotted}.<key>=...")
            _apply(current, value, f"{dotted}.")
            continue
        value = _coerce(value, hints[key], dotted)
        _check_value(dotted, value)
        setattr(target, key, value)


def _check_value(dotted: str, value: Any) -> None:
    """The checks of one setting on its own: a learning rate's range, a choice, a size's minimum.
    Run as each value is read (YAML, overrides) and, by `check_config`, on every key of a `Config`
    built in Python, which no reading went through."""
    key = dotted.rsplit(".", 1)[-1]
    if key.startswith("lr") and key not in ("lr_step", "lr_decay_every", "lr_gamma") and not 0 < value <= 100:
        raise ValueError(f"Config key {dotted} is a learning rate and must be in (0, 100]; got {value!r}.")
    if dotted in _CHOICES and value not in _CHOICES[dotted]:
        raise ValueError(f"Config key {dotted} must be one of {', '.join(_CHOICES[dotted])}; got {value!r}.")
    _check_range(dotted, value)


def _settings(section: Any, prefix: str = "") -> typing.Iterator[tuple[str, Any]]:
    """Every (dotted key, value) of a config section, its subsections walked."""
    for item in dataclasses.fields(section):
        value = getattr(section, item.name)
        if dataclasses.is_dataclass(value):
            yield from _settings(value, f"{prefix}{item.name}.")
        else:
            yield f"{prefix}{item.name}", value


def _field_type(dotted: str) -> Any:
    """The annotation of a dotted key, or None if the key does not exist (reported later)."""
    target: Any = Config
    for part in dotted.split("."):
        hints = typing.get_type_hints(target) if dataclasses.is_dataclass(target) else {}
        if part not in hints:
            return None
        target = hints[part]
    return target


def _parse_override(text: str) -> dict[str, Any]:
    """Turn 'a.b.c=value' into {'a': {'b': {'c': value}}}; the value is read as YAML (1e-3, true,
    [1, 5], or 1,5 for a list), except for text keys, which keep the raw text (paths, names)."""
    if "=" not in text:
        raise ValueError(f"Override {text!r} must look like section.key=value.")
    dotted, raw = text.split("=", 1)
    value: Any
    if _field_type(dotted.strip()) is str:
        value = raw
    else:
        value = yaml.safe_load(raw) if raw.strip() else ""
        if isinstance(value, str) and "," in value:  # meta_test.n_shot=1,5
            value = [yaml.safe_load(part) for part in value.split(",")]
    tree: dict[str, Any] = {}
    node = tree
    parts = dotted.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return tree


def config_from_dict(values: dict[str, Any], source: str = "the config") -> Config:
    """A `Config` from stored nested values (a run's config.yaml), renamed and removed keys migrated
    (see `migrate`); `source` names where they came from in errors."""
    config = Config()
    _apply(config, migrate(values, source))
    return config


def config_to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def apply_overrides(config: Config, overrides: typing.Sequence[str]) -> Config:
    """A copy of `config` with `section.key=value` overrides applied in order."""
    config = copy.deepcopy(config)
    for text in overrides:
        _apply(config, _parse_override(text))
    return config


def check_shift_pixels(shift_pixels: int) -> int:
    """views.shift_pixels, checked wherever it arrives (a run's config, a rescoring override, the API)."""
    if shift_pixels < 0:
        raise ValueError(f"views.shift_pixels={shift_pixels} is a number of pixels: 0 (off) or positive "
                         "(2 on 32x32 images, at most data.crop_padding).")
    return shift_pixels


def check_config(config: Config) -> None:
    """Settings that are each valid but do not work together; the CLI calls this before a run
    directory is written, so the error comes before any training.

    Each setting is first checked on its own as well (its range, choices, learning-rate bounds): a
    `Config` built or changed in Python reaches here without the checks that reading YAML or an
    override applies.

    Raises:
        ValueError: naming the settings and what to set instead.
    """
    for dotted, value in _settings(config):
        _check_value(dotted, value)
    learner, meta = config.base_learner, config.meta_train
    if learner.logits == "cosine" and learner.fc_init == "theta" and learner.init == "zeros":
        raise ValueError("base_learner.logits=cosine needs a non-zero start (the cosine of a zero weight is undefined): "
                         "set base_learner.fc_init=prototypes, or base_learner.init=kaiming.")
    if meta.val_seed == config.meta_test.seed:
        raise ValueError(f"meta_train.val_seed={meta.val_seed} equals meta_test.seed, whose validation episodes chose the "
                         "pre-training epoch; give meta-train validation its own seed.")
    if config.model.adapt == "ft" and config.model.ss_bn_affine:
        raise ValueError("model.ss_bn_affine acts on scaling-shifting; with model.adapt=ft there is none: "
                         "set model.adapt=ss, or model.ss_bn_affine=false.")
    if learner.learn_temperature and learner.logits != "cosine":
        raise ValueError("base_learner.learn_temperature scales cosine logits only: set base_learner.logits=cosine, or learn_temperature=false.")
    if learner.ensemble == "e3bm" and learner.steps < 1:
        raise ValueError("base_learner.ensemble=e3bm combines the heads after each inner step; with base_learner.steps=0 there "
                         "are none: set steps >= 1 (E3BM's code: 100), or ensemble=none.")
    if learner.ensemble == "none" and learner.ensemble_init != "last":
        raise ValueError(f"base_learner.ensemble_init={learner.ensemble_init} starts E3BM's combination weights; it needs "
                         "base_learner.ensemble=e3bm.")
    if meta.classes == "held_out" and not config.pretrain.held_out_classes:
        raise ValueError("meta_train.classes=held_out needs pretrain.held_out_classes > 0 (the classes pre-training leaves out).")
    if config.pretrain.epochs == 0 and not config.transfer.source:
        raise ValueError("pretrain.epochs=0 keeps the initial backbone, which only makes sense with --init-from (transfer.source).")
    if config.pretrain.generations < 1 or (config.pretrain.generations > 1 and (config.pretrain.distill_from or config.pretrain.epochs == 0)):
        raise ValueError(f"pretrain.generations={config.pretrain.generations} must be at least 1, and above 1 only without "
                         "pretrain.distill_from (the generations teach each other) and with pretrain.epochs > 0.")
    if not 0.0 <= config.pretrain.distill_weight <= 1.0 or config.pretrain.distill_temperature <= 0:
        raise ValueError(f"pretrain.distill_weight={config.pretrain.distill_weight} must lie in [0, 1] and "
                         f"pretrain.distill_temperature={config.pretrain.distill_temperature} be positive.")
    if config.model.drop_block_rate and config.model.backbone not in ("resnet12", "resnet12_wide"):
        raise ValueError(f"model.drop_block_rate={config.model.drop_block_rate} is a ResNet-12 option; model.backbone="
                         f"{config.model.backbone!r} has none: use resnet12 or resnet12_wide, or set model.drop_block_rate=0.")
    if not 0.0 <= config.model.drop_block_rate < 1.0 or config.model.drop_block_size < 1:
        raise ValueError(f"model.drop_block_rate={config.model.drop_block_rate} must lie in [0, 1) (0.1 is usual) and "
                         f"model.drop_block_size={config.model.drop_block_size} be at least 1.")
    if config.pretrain.rotation_weight < 0:
        raise ValueError(f"pretrain.rotation_weight={config.pretrain.rotation_weight} must be 0 (off) or positive (Gidaris et al.: 1.0).")
    check_shift_pixels(config.views.shift_pixels)
    if any(shot < 1 for shot in meta.val_shots):
        raise ValueError(f"meta_train.val_shots={meta.val_shots}: shots are positive integers (for example 5, or 1,5).")
    name = meta.init_checkpoint
    if name not in ("best", "last") and not (name.startswith("epoch-") and name[6:].isdigit() and int(name[6:]) in config.pretrain.save_epochs):
        raise ValueError(f"meta_train.init_checkpoint={name!r}: use best, last or epoch-N with N in pretrain.save_epochs "
                         f"({config.pretrain.save_epochs or 'empty'}).")


def load_config(preset: str | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults, then the preset's differences, then `section.key=value` overrides, in that order."""
    config = Config()
    if preset:
        _apply(config, _read_preset(preset))
    return apply_overrides(config, overrides)

