"""Run a model's three compute calls in ONNX Runtime: the CPU fast path of search.

Why: on a CPU, PyTorch eager pays a dispatch per op and runs MobileNetV2's depthwise convolutions
slowly; ONNX Runtime's fused kernels compute the same graph several times faster for the image
tower and about 1.5x faster for the text tower (``benchmarks/encode_speed.py``). Nothing else
changes: :class:`OnnxModel` keeps the :class:`~tpas.models.base.RetrievalModel` interface, so the
index writer, :func:`~tpas.search.ranking.rank`, the engine and the server use it unchanged.

What runs where. ``encode_text``, ``encode_image`` and ``itm_logits`` are exported once per model
(whatever towers the family has, at whatever token shapes they produce: every axis but the
feature axes is dynamic) and cached by the model's weight fingerprint; tokenising, preprocessing,
the fingerprint and saving stay with the torch model.

Runtimes (``RUNTIMES``):

* ``torch`` — the model as it is;
* ``onnx`` — the exported fp32 graphs: same numbers as torch to ~1e-5;
* ``onnx-int8`` — fp32 graphs whose MatMul weights are int8 (per output channel) and whose
  activations are quantised per call (dynamic quantisation). Faster where the CPU has int8 dot
  products (AVX-512 VNNI / AMX), lossy: check it with ``benchmarks/equivalence.py`` first;
* ``auto`` — ``onnx`` on a CPU when onnxruntime is installed and the export works, else ``torch``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tpas.errors import TpasError
from tpas.models.base import ImageEncoding, TextEncoding
from tpas.utils.io import atomic_path

log = logging.getLogger(__name__)

__all__ = ["RUNTIMES", "OnnxModel", "base_model", "cache_root", "with_runtime"]

RUNTIMES = ("auto", "torch", "onnx", "onnx-int8")
OPSET = 17
PARTS = ("text", "image", "itm")


def cache_root() -> Path:
    """Where exported graphs are kept: ``$TPAS_CACHE/onnx`` (default ``~/.cache/tpas/onnx``)."""
    return Path(os.environ.get("TPAS_CACHE", Path.home() / ".cache" / "tpas")) / "onnx"


def base_model(model):
    """The torch model behind ``model`` (itself when it is not wrapped)."""
    return getattr(model, "torch_model", model)


# -- the three graphs ----------------------------------------------------------------------------
class _Text(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model.encode_text(input_ids, attention_mask)
        return out.tokens, out.embeds  # [B,L,Dt], [B,E]


class _Image(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model.encode_image(pixels)
        return out.tokens, out.embeds  # [B,T,Dv], [B,E]


class _Itm(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor,
                text_mask: torch.Tensor) -> torch.Tensor:
        return self.model.itm_logits(image_tokens, text_tokens, text_mask)  # [B,2]


def _export(model, part: str, path: Path) -> None:
    """Trace ``part`` of ``model`` at a small example size into ``path`` (atomically)."""
    h, w = model.image_size
    with torch.no_grad():  # not inference_mode: the tracer may not receive inference tensors
        probe = model.encode_image(torch.zeros(2, 3, h, w))
        ids, mask = model.tokenize(["a person walks", "a man in a red coat falls down"])
        text = model.encode_text(ids, mask)
    if part == "text":
        module, args = _Text(model), (ids, mask)
        names, outputs = ["input_ids", "attention_mask"], ["tokens", "embeds"]
        axes = {"input_ids": {0: "batch", 1: "length"}, "attention_mask": {0: "batch", 1: "length"},
                "tokens": {0: "batch", 1: "length"}, "embeds": {0: "batch"}}
    elif part == "image":
        module, args = _Image(model), (torch.zeros(2, 3, h, w),)
        names, outputs = ["pixels"], ["tokens", "embeds"]
        axes = {"pixels": {0: "batch"}, "tokens": {0: "batch"}, "embeds": {0: "batch"}}
    else:
        module, args = _Itm(model), (probe.tokens, text.tokens, mask)
        names, outputs = ["image_tokens", "text_tokens", "text_mask"], ["logits"]
        axes = {"image_tokens": {0: "pairs", 1: "image_length"}, "text_tokens": {0: "pairs", 1: "length"},
                "text_mask": {0: "pairs", 1: "length"}, "logits": {0: "pairs"}}
    import warnings

    with atomic_path(path) as tmp, warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # the tracer's notes about Python control flow
        torch.onnx.export(module.eval(), args, str(tmp), input_names=names, output_names=outputs,
                          dynamic_axes=axes, opset_version=OPSET, dynamo=False)


def _quantize(src: Path, dst: Path) -> None:
    """int8 weights per output channel for every MatMul; activations quantised per call."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with atomic_path(dst) as tmp:
        quantize_dynamic(str(src), str(tmp), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul"], extra_options={"DefaultTensorType": 1})


# -- the wrapper ---------------------------------------------------------------------------------
class OnnxModel:
    """A model whose ``encode_text`` / ``encode_image`` / ``itm_logits`` run in ONNX Runtime.

    Everything else (tokenizer, config, fingerprint, image size) is the wrapped torch model's, so
    an index built with the torch model opens with this one and vice versa. Sessions are created
    on first use (an ITC-only server never exports the ITM graph) and are safe to call from
    several threads.
    """

    def __init__(self, model, runtime: str = "onnx", cache_dir: str | Path | None = None,
                 threads: int | None = None):
        if runtime not in ("onnx", "onnx-int8"):
            raise ValueError(f"OnnxModel runtime must be 'onnx' or 'onnx-int8', got {runtime!r}")
        if base_model(model).device.type != "cpu":
            raise TpasError(f"the {runtime} runtime runs on the CPU; use --runtime torch with --device "
                            f"{base_model(model).device}")
        self.torch_model = base_model(model)
        self.runtime = runtime
        self.threads = threads or torch.get_num_threads()
        self._cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._sessions: dict[str, Any] = {}

    # -- what the search code reads from a model --------------------------------------------------
    def __getattr__(self, name: str) -> Any:  # config, family, image_size, tokenize, state_dict, ...
        if name == "torch_model":
            raise AttributeError(name)
        return getattr(self.torch_model, name)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def training(self) -> bool:
        return False

    def eval(self) -> "OnnxModel":
        return self

    def train(self, mode: bool = True) -> "OnnxModel":
        if mode:
            raise RuntimeError("an OnnxModel is for inference only; train the torch model")
        return self

    def parameters(self) -> Iterator[torch.Tensor]:  # itm_scores reads the compute dtype from here
        yield torch.zeros(0, dtype=torch.float32)

    # -- sessions -------------------------------------------------------------------------------
    @property
    def cache_dir(self) -> Path:
        if self._cache_dir is None:
            from tpas.search.index import model_fingerprint

            self._cache_dir = cache_root() / model_fingerprint(self.torch_model)[:24]
        return self._cache_dir

    def graph_path(self, part: str) -> Path:
        """The ``.onnx`` file of ``part`` for this runtime, exported (and quantised) if missing."""
        fp32 = self.cache_dir / f"{part}-fp32-opset{OPSET}.onnx"
        if not fp32.is_file():
            log.info("exporting the %s graph to %s", part, fp32)
            _export(self.torch_model, part, fp32)
        if self.runtime == "onnx":
            return fp32
        int8 = self.cache_dir / f"{part}-int8-opset{OPSET}.onnx"
        if not int8.is_file():
            _quantize(fp32, int8)
        return int8

    def session(self, part: str):
        if part not in self._sessions:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            # idle worker threads sleep instead of spinning: they share the cores with the server's
            # event loop, the image decoders and (on a shared machine) everybody else
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self._sessions[part] = ort.InferenceSession(str(self.graph_path(part)), options,
                                                        providers=["CPUExecutionProvider"])
        return self._sessions[part]

    def warm_up(self, parts: Sequence[str] = PARTS) -> "OnnxModel":
        """Export and open the sessions now (a server does this before it takes requests)."""
        for part in parts:
            self.session(part)
        return self

    # -- the interface --------------------------------------------------------------------------
    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextEncoding:
        tokens, embeds = self.session("text").run(None, {"input_ids": _np(input_ids, np.int64),
                                                         "attention_mask": _np(attention_mask, np.int64)})
        return TextEncoding(tokens=torch.from_numpy(tokens), mask=torch.as_tensor(attention_mask),
                            embeds=torch.from_numpy(embeds))

    def encode_image(self, pixels: torch.Tensor) -> ImageEncoding:
        tokens, embeds = self.session("image").run(None, {"pixels": _np(pixels, np.float32)})
        return ImageEncoding(tokens=torch.from_numpy(tokens), embeds=torch.from_numpy(embeds))

    def itm_logits(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor,
                   text_mask: torch.Tensor) -> torch.Tensor:
        (logits,) = self.session("itm").run(None, {"image_tokens": _np(image_tokens, np.float32),
                                                   "text_tokens": _np(text_tokens, np.float32),
                                                   "text_mask": _np(text_mask, np.int64)})
        return torch.from_numpy(logits)

    def __repr__(self) -> str:
        return f"OnnxModel({type(self.torch_model).__name__}, runtime={self.runtime!r}, threads={self.threads})"


def _np(x, dtype) -> np.ndarray:
    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return np.ascontiguousarray(x, dtype=dtype)


def with_runtime(model, runtime: str = "auto", cache_dir: str | Path | None = None, threads: int | None = None):
    """``model`` set up to run with ``runtime`` (one of ``RUNTIMES``); see the module docstring."""
    if runtime not in RUNTIMES:
        raise TpasError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")
    model = base_model(model)
    if runtime == "torch" or (runtime == "auto" and model.device.type != "cpu"):
        return model
    if runtime == "auto":
        try:
            import onnxruntime  # noqa: F401

            return OnnxModel(model, "onnx", cache_dir, threads).warm_up(("text",))
        except Exception as exc:  # the fast path is optional: any failure leaves the torch model
            log.warning("ONNX Runtime unavailable for this model (%s: %s); using torch", type(exc).__name__, exc)
            return model
    return OnnxModel(model, runtime, cache_dir, threads)
