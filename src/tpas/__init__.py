"""tpas: Text-based Person Anomaly Search.

Find a pedestrian image in a large gallery from a text description of the person *and* of what
they are doing, telling normal behaviour from anomalous behaviour of the same-looking person.

The front door (imported on first use, so ``import tpas`` stays light)::

    import tpas

    model = tpas.create_model("runs/demo/model")            # or "lite", "xvlm-base", device="cuda"
    evalset = tpas.load_eval("runs/demo/minipab", "pab", "test")
    result = tpas.run_eval(model, evalset, rerank=16, post="sca")
    print(result.metrics["R@1"])
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "create_model": "tpas.models",
    "list_models": "tpas.models",
    "RetrievalModel": "tpas.models",
    "load_train": "tpas.data",
    "load_eval": "tpas.data",
    "EvalSet": "tpas.data",
    "TrainSet": "tpas.data",
    "rank": "tpas.search",
    "rank_evalset": "tpas.search",
    "Ranking": "tpas.search",
    "SearchEngine": "tpas.search",
    "build_index": "tpas.search",
    "open_index": "tpas.search",
    "postprocess": "tpas.search",
    "run_eval": "tpas.eval",
    "evaluate": "tpas.eval",
    "EvalResult": "tpas.eval",
    "Metrics": "tpas.eval",
    "train": "tpas.train",
    "load_config": "tpas.config",
    "TpasError": "tpas.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tpas' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names above load lazily
    from tpas.config import load_config
    from tpas.data import EvalSet, TrainSet, load_eval, load_train
    from tpas.errors import TpasError
    from tpas.eval import EvalResult, Metrics, evaluate, run_eval
    from tpas.models import RetrievalModel, create_model, list_models
    from tpas.search import Ranking, SearchEngine, build_index, open_index, postprocess, rank, rank_evalset
    from tpas.train import train
