"""Run configs as dataclasses: YAML files plus dotted command-line overrides (``train.lr=1e-4``).

The recipes tpas ships live in ``tpas/configs/*.yaml`` (package data, so an installed tpas has
them too); ``--config`` takes one of their names (``minipab-lite``) or a path to any YAML file.

A config file is a mapping of sections (``model``, ``data``, ``loss``, ``train``, ``val``) whose
keys are the dataclass fields below. Unknown sections or keys are errors that name the file and
the key, so a typo never silently falls back to a default. Values are coerced to the field type
(YAML reads ``1e-4`` as a string; here it becomes a float).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tpas.errors import TpasError


__all__ = ["ConfigError", "TrainConfig", "dump_config", "load_config", "resolve_config", "shipped_configs"]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # the recipes shipped with the package


class ConfigError(TpasError):
    """A bad config file or override; the message names the file/override and the key."""


def shipped_configs() -> list[str]:
    """Names of the configs that ship with tpas (``--config NAME``)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_config(name_or_path: str | Path) -> Path:
    """A config file: ``name_or_path`` if that file exists, else the shipped config of that name."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = CONFIG_DIR / f"{path.name.removesuffix('.yaml')}.yaml"
    if path.parent == Path(".") and shipped.is_file():
        return shipped
    raise ConfigError(f"{name_or_path}: config file not found (shipped configs: {', '.join(shipped_configs())})")


@dataclass
class ModelSection:
    name: str = "lite"  # a registered model name or a save_pretrained directory
    checkpoint: str | None = None  # family-specific weight file (e.g. an official X-VLM .th)
    # a model that has no pretrained weights without a checkpoint (xvlm-base) is refused unless this
    # says that training from random weights is meant
    from_scratch: bool = False
    options: dict[str, Any] = field(default_factory=dict)  # create_model(**options) overrides
    # freezing for families with set_trainable (lite): -1 = all train, 0 = frozen, k = top k
    train_text_layers: int | None = None
    train_image_blocks: int | None = None


@dataclass
class DataSection:
    root: str = ""
    format: str = "pab"  # pab | cuhk | icfg | rstp
    max_pairs: int = 0  # >0: use a seeded random subset of the training pairs (quick runs)
    # which training pairs (after the validation identities are carved out): "" = all; "random:F" or
    # "balanced:F" (F a fraction <= 1 or a pair count, seeded by train.seed); or an id list written by
    # `tpas select` (its ids.txt or folder). People stay whole; docs/selection.md
    select: str = ""
    val_identities: float = 0.05  # identities carved out for validation: a fraction (<1) or a count
    val_max_queries: int = 1000  # cap on validation captions (their images form the gallery)
    workers: int = 0  # DataLoader worker processes
    augment: bool = True  # TrainTransform (crop, flip, jitter); off = EvalTransform
    hard_pairs: bool = True  # load PAB's same-person opposite-behaviour pair (for ITM negatives)
    eda: float = 0.0  # probability of EDA-style text augmentation per caption (deletion/swap)
    group_batches: bool = False  # keep an identity's pairs (PAB: normal + anomaly) in the same batch
    # an image that is missing or does not decode: "error" stops before training with a list of them
    # (or with one line when a worker meets one later); "skip" drops or replaces it and reports it
    on_bad_image: str = "error"


@dataclass
class LossSection:
    itc: float = 1.0  # weight of the contrastive loss
    itm: float = 1.0  # weight of the matching loss
    mlm: float = 0.0  # weight of masked language modelling (needs a model with an MLM head)
    label_smoothing: float = 0.0  # ITC soft-target smoothing
    same_id_positive: bool = True  # ITC: pairs of the same person_id are positives of each other
    itm_hard_pairs: bool = True  # ITM: add PAB identity hard pairs as extra negatives
    mlm_probability: float = 0.25


@dataclass
class TrainSection:
    out: str = ""  # run directory; default runs/<config file stem>
    seed: int = 42
    epochs: int = 1
    max_steps: int = 0  # >0: stop after this many optimizer steps (overrides epochs)
    batch_size: int = 32  # per process; the global batch is batch_size * processes * grad_accum
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    # glob on parameter names -> lr multiplier (first match wins); new heads usually train faster
    lr_mult: dict[str, float] = field(default_factory=dict)
    schedule: str = "cosine"  # cosine | linear | step | constant
    warmup: float = 0.1  # <1: fraction of all steps, >=1: steps
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of the peak lr
    step_milestones: list[float] = field(default_factory=lambda: [0.6, 0.85])  # fractions of steps
    step_gamma: float = 0.1
    grad_clip: float = 0.0  # max global grad norm; 0 = off
    precision: str = "auto"  # auto (bf16 on capable GPUs, fp32 on CPU) | no | bf16 | fp16
    device: str = "auto"  # auto | cpu
    threads: int = 0  # torch CPU threads; 0 = leave as is
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0 = at each epoch end only
    keep_checkpoints: int = 2
    log_every: int = 10
    find_unused_parameters: bool = True  # DDP: needed when a loss weight is 0 or a head goes unused
    progress: bool = True
    # test hook: SIGKILL this process while the checkpoint of this step is half written (0 = off)
    debug_kill_at_step: int = 0


@dataclass
class ValSection:
    every: int = 0  # optimizer steps between validations; 0 = at each epoch end; <0 = never
    batch_size: int = 64
    at_start: bool = False  # validate the untrained model too (zero-shot reference in the log)
    # after training, pick the ITM re-rank fusion weight on the validation split for the top-K
    # (stored in best/config.json as rerank_weight; tpas.search.calibrate); 0 = keep upstream's 0.002
    calibrate_rerank: int = 16


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    loss: LossSection = field(default_factory=LossSection)
    train: TrainSection = field(default_factory=TrainSection)
    val: ValSection = field(default_factory=ValSection)
    name: str = "run"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "<dict>") -> "TrainConfig":
        return _build(cls, data, where)


# -- building and coercion ---------------------------------------------------------------------
def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'top level'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where or 'top level'}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Convert ``value`` to type ``tp`` (dataclasses, Optional, tuples, lists, dicts, scalars)."""
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, where)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return _coerce(a, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if tp is Any:
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        inner = args[0] if args else Any
        items = [_coerce(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        vt = args[1] if args else Any
        return {str(k): _coerce(vt, v, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            number = float(value) if tp is float else value
            if tp is int:
                number = int(value) if not isinstance(value, float) or value.is_integer() else None
                if number is None:
                    raise ValueError
            return number
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


# -- files and overrides -------------------------------------------------------------------------
def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=1e-4"`` -> (["train", "lr"], 1e-4); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value (e.g. train.lr=1e-4)")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: cannot parse value: {exc}") from None
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys in a nested dict (a copy); intermediate mappings are created as needed."""
    import copy

    data = copy.deepcopy(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML run config (a path or a shipped config's name; defaults when ``path`` is None)
    and apply overrides."""
    data: dict[str, Any] = {}
    where = "<defaults>"
    if path is not None:
        path = resolve_config(path)
        where = str(path)
        with open(path, encoding="utf-8") as fh:
            try:
                data = yaml.safe_load(fh) or {}
            except yaml.YAMLError as exc:
                mark = getattr(exc, "problem_mark", None)
                line = f":{mark.line + 1}" if mark is not None else ""
                raise ConfigError(f"{path}{line}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
        data.setdefault("name", path.stem)
    if overrides:
        data = apply_overrides(data, overrides)
        where += " + overrides"
    try:
        return _build(TrainConfig, data, "")
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def dump_config(config: TrainConfig) -> str:
    """YAML text of a config (tuples as lists), for the run directory."""

    def plain(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: plain(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [plain(v) for v in obj]
        return obj

    return yaml.safe_dump(plain(config.to_dict()), sort_keys=False)
