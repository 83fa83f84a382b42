"""``create_model`` / ``list_models``: configs as data, one factory for every family.

A *family* is a RetrievalModel subclass (xvlm, lite, clip). A *named config* is a family plus
default hyper-parameters (``xvlm-base``, ``lite``, ...). Families register themselves when their
module is imported; modules are imported lazily so that ``import tpas`` stays light.

A name stands for one set of weights: whatever a named config initialises at random (lite's new
heads, all of an X-VLM built without a checkpoint) is drawn from a seed derived from the name, in a
private RNG, so ``tpas index --model lite`` and a later ``tpas search --model lite`` in another
process use the same model, and building a model never moves the caller's global RNG.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from tpas.errors import TpasError
from tpas.models.base import CONFIG_NAME, WEIGHTS_NAME, RetrievalModel, read_config_file
from tpas.utils.device import resolve_device

log = logging.getLogger(__name__)

__all__ = ["check_starting_weights", "create_model", "describe_models", "from_pretrained", "get_family",
           "list_models", "name_seed", "register_config", "register_family"]

# family -> module that defines it (imported on first use)
FAMILY_MODULES: dict[str, str] = {
    "xvlm": "tpas.models.xvlm",
    "lite": "tpas.models.lite",
    "clip": "tpas.models.clip",
}

_FAMILIES: dict[str, type[RetrievalModel]] = {}


@dataclass
class NamedConfig:
    family: str
    defaults: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    # optional builder for families that need more than cls(config) + weights (e.g. X-VLM from
    # upstream config files); called as builder(config_dict, checkpoint, **kwargs)
    builder: Callable[..., RetrievalModel] | None = None
    # True when the config has no pretrained weights of its own: without a checkpoint every weight
    # is random, which training refuses unless asked (model.from_scratch)
    needs_checkpoint: bool = False


_NAMED: dict[str, NamedConfig] = {}


def register_family(name: str) -> Callable[[type[RetrievalModel]], type[RetrievalModel]]:
    def wrap(cls: type[RetrievalModel]) -> type[RetrievalModel]:
        cls.family = name
        _FAMILIES[name] = cls
        return cls

    return wrap


def register_config(name: str, family: str, description: str = "", builder=None, needs_checkpoint: bool = False,
                    **defaults: Any) -> None:
    _NAMED[name] = NamedConfig(family=family, defaults=defaults, description=description, builder=builder,
                               needs_checkpoint=needs_checkpoint)


def _import_family_module(module: str) -> bool:
    """Import a family module; a module that does not exist (yet) is logged and skipped."""
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module:
            raise  # the module exists but one of its own imports is missing: a real error
        log.debug("model family module %s is not available", module)
        return False
    return True


def _load_all_families() -> None:
    for module in FAMILY_MODULES.values():
        _import_family_module(module)


def get_family(name: str) -> type[RetrievalModel]:
    if name not in _FAMILIES:
        if name not in FAMILY_MODULES:
            raise KeyError(f"unknown model family {name!r}; known: {sorted(FAMILY_MODULES)}")
        if not _import_family_module(FAMILY_MODULES[name]) or name not in _FAMILIES:
            raise KeyError(f"model family {name!r} is not available (module {FAMILY_MODULES[name]})")
    return _FAMILIES[name]


def list_models() -> list[str]:
    """Every named config (``create_model`` also takes a saved model directory)."""
    _load_all_families()
    return sorted(_NAMED)


def describe_models() -> dict[str, str]:
    _load_all_families()
    return {name: nc.description for name, nc in sorted(_NAMED.items())}


def name_seed(name: str | Path) -> int:
    """The seed a named config's random parts are drawn from: a stable 63-bit hash of the name."""
    return int.from_bytes(hashlib.sha256(f"tpas-model:{name}".encode()).digest()[:8], "big") >> 1


def create_model(name_or_dir: str | Path, checkpoint: str | Path | None = None, *,
                 device: str | torch.device | None = None, seed: int | None = None,
                 **overrides: Any) -> RetrievalModel:
    """Build a model from a named config or a directory written by ``save_pretrained``, on ``device``.

    ``checkpoint`` is a family-specific weight file (e.g. an official X-VLM ``.th``) loaded after
    construction; ``overrides`` replace config fields (``image_size=(384, 128)``) or are passed to
    the family's builder. ``device`` None/"auto" = this process's GPU when there is one, else the
    CPU (:func:`tpas.utils.device.resolve_device`). The model comes back in eval mode.

    Randomly initialised parts come from ``seed`` (default :func:`name_seed` of the name, so a name
    always gives the same weights; training passes ``train.seed``), in a forked RNG: the caller's
    global torch RNG is the same afterwards.

    Example::

        model = create_model("runs/demo/model", device="cpu")
        enc = model.encode_text(*model.tokenize(["a man falls off his bicycle"]))
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(name_seed(name_or_dir) if seed is None else seed)
        model = _create(name_or_dir, checkpoint, overrides)
    if device is None and any(p.is_meta for p in model.parameters()):
        return model.eval()  # built under `with torch.device("meta")` (shapes only): nothing to move
    return model.to(resolve_device(device)).eval()


def _create(name_or_dir: str | Path, checkpoint: str | Path | None, overrides: dict[str, Any]) -> RetrievalModel:
    path = Path(name_or_dir)
    if path.is_dir() and (path / CONFIG_NAME).is_file():
        model = from_pretrained(path, **overrides)
        if checkpoint is not None:
            _load_checkpoint(model, checkpoint)
        return model
    name = str(name_or_dir)
    if name not in _NAMED:
        _load_all_families()
    if name in FAMILY_MODULES and name not in _NAMED:
        cls = get_family(name)
        return _build(cls, {}, checkpoint, overrides, builder=None)
    if name not in _NAMED and path.is_dir():
        raise FileNotFoundError(f"{path}: not a saved model directory (no {CONFIG_NAME})")
    if name not in _NAMED:
        raise KeyError(f"unknown model {name!r}: not a saved model directory nor one of {list_models()}")
    named = _NAMED[name]
    cls = get_family(named.family)
    return _build(cls, dict(named.defaults), checkpoint, overrides, builder=named.builder)


def check_starting_weights(name_or_dir: str | Path, checkpoint: str | Path | None, from_scratch: bool) -> None:
    """Refuse to train a model that would start from random weights without the user asking for it
    (a named config with ``needs_checkpoint`` and no ``checkpoint``, unless ``from_scratch``)."""
    name = str(name_or_dir)
    if Path(name).is_dir() or checkpoint is not None or from_scratch:
        return
    if name not in _NAMED:
        _load_all_families()
    named = _NAMED.get(name)
    if named is not None and named.needs_checkpoint:
        raise TpasError(f"model {name!r} has no pretrained weights of its own and model.checkpoint is not set: "
                        "it would train from random weights. Set model.checkpoint=PATH (for X-VLM the official "
                        "16m_base_model_state_step_199999.th), or model.from_scratch=true to train from scratch "
                        "on purpose")


def _build(cls, defaults, checkpoint, overrides, builder) -> RetrievalModel:
    if builder is not None:
        return builder({**defaults, **overrides}, checkpoint)
    known = {f for f in cls.config_class.__dataclass_fields__}
    config_kwargs = {k: v for k, v in {**defaults, **overrides}.items() if k in known}
    extra = {k: v for k, v in overrides.items() if k not in known}
    if extra:
        raise TypeError(f"{cls.family}: unknown options {sorted(extra)}")
    config = cls.config_class.from_dict(config_kwargs)
    model = cls(config)
    if checkpoint is not None:
        _load_checkpoint(model, checkpoint)
    return model


def _load_checkpoint(model: RetrievalModel, checkpoint: str | Path) -> None:
    load = getattr(model, "load_checkpoint", None)
    if load is None:
        raise TypeError(f"{model.family} models take no checkpoint file")
    load(checkpoint)


def from_pretrained(directory: str | Path, **overrides: Any) -> RetrievalModel:
    """Load a directory written by ``save_pretrained`` (config.json + model.safetensors)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    data = read_config_file(directory)
    cls = get_family(data["family"])
    config = cls.config_class.from_dict({**data["config"], **overrides})
    model = cls(config, pretrained=False) if _accepts_pretrained(cls) else cls(config)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{directory}: {CONFIG_NAME} present but {WEIGHTS_NAME} is missing")
    state = load_file(str(weights))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ValueError(f"{directory}: weights do not fit config: {exc}") from None
    if missing or unexpected:
        raise ValueError(f"{directory}: weights do not fit config (missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.load_extras(directory)
    log.info("loaded %s model from %s", data["family"], directory)
    return model


def _accepts_pretrained(cls) -> bool:
    import inspect

    return "pretrained" in inspect.signature(cls.__init__).parameters
