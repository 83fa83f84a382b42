"""``tpas demo`` end to end on a tiny configuration: every output, resuming, refusing mixed runs,
and the search app over the demo's own index."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

TINY_CONFIG = """\
model:
  name: lite-tiny
data:
  val_identities: 2
train:
  seed: 0
  epochs: 1
  max_steps: 2
  batch_size: 4
  lr: 1.0e-3
  threads: 2
  progress: false
val:
  every: 0
"""


def flat(d: dict, prefix: str = "") -> dict:
    """{"groups": {"normal": {"R@1": x}}} -> {"groups/normal/R@1": x} (pytest.approx compares flat dicts)."""
    out = {}
    for key, value in d.items():
        out.update(flat(value, f"{prefix}{key}/") if isinstance(value, dict) else {prefix + key: value})
    return out


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    from tpas.cli import main

    root = tmp_path_factory.mktemp("demo")
    config = root / "tiny.yaml"
    config.write_text(TINY_CONFIG)
    out = root / "run"
    argv = ["demo", "--out", str(out), "--identities", "10", "--config", str(config), "--rerank", "4",
            "--workers", "1", "--no-serve"]
    assert main(argv) == 0
    return out, argv


def test_demo_writes_every_output(demo_run, capsys):
    out, _ = demo_run
    for rel in ["minipab/annotation/test/attr.json", "model/config.json", "index/meta.json", "results.md",
                "results.json", "report.html", "examples.txt", "eval/itc/metrics.json", "eval/itc+itm/report.html",
                "eval/itc+itm+sca/metrics.json", "eval/itc+itm+assign/metrics.json"]:
        assert (out / rel).is_file(), rel
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["itc", "itc+itm", "itc+itm+sca", "itc+itm+assign"]
    assert [(r["rerank"], r["post"]) for r in rows] == [(0, "none"), (4, "none"), (4, "sca"), (4, "assign")]
    # every row is what `tpas eval` gives for that setting on the demo's model and test split
    from tpas.data.datasets import load_eval
    from tpas.eval.run import run_eval
    from tpas.models import create_model

    model, evalset = create_model(out / "model", device="cpu"), load_eval(out / "minipab", "pab", "test")
    for r in rows:
        again = run_eval(model, evalset, rerank=r["rerank"], post=r["post"], progress=False).metrics
        assert flat(r["metrics"]) == pytest.approx(flat(again.to_dict())), r["name"]
        saved = json.loads((out / "eval" / r["name"] / "metrics.json").read_text())
        assert saved["R@1"] == r["metrics"]["R@1"] and saved["settings"]["rerank"] == r["rerank"]
    table = (out / "results.md").read_text()
    assert "| setting | R@1 |" in table and "+ ITM re-rank top-4 + SCA" in table
    report = (out / "report.html").read_text()
    assert "eval/itc+itm/report.html" in report and "http" not in report.split("<body>")[1].split("tpas serve")[0]
    steps = sorted(p.stem for p in (out / ".steps").glob("*.json"))
    assert steps == ["data", "eval", "index", "report", "train"]
    assert (out / "examples.txt").read_text().strip()
    # nothing the demo never reads again: no checkpoints (optimizer state), no second and third copy of
    # the weights next to model/; the training log stays
    assert sorted(p.name for p in (out / "train").iterdir() if p.name != "tensorboard") == ["config.yaml", "log.jsonl"]
    weights = [p for p in out.rglob("*.safetensors")]
    assert weights == [out / "model" / "model.safetensors"], weights


def test_demo_resumes_and_refuses_other_parameters(demo_run, capsys):
    from tpas.cli import main

    out, argv = demo_run
    before = {p.name: p.stat().st_mtime_ns for p in (out / ".steps").glob("*.json")}
    capsys.readouterr()
    assert main(argv) == 0  # everything done: every step is skipped
    after = {p.name: p.stat().st_mtime_ns for p in (out / ".steps").glob("*.json")}
    assert before == after
    assert "R@1" in capsys.readouterr().out  # the table is printed again

    changed = [a if a != "10" else "12" for a in argv]
    assert main(changed) == 2
    err = capsys.readouterr().err
    assert "step 'data' was run with" in err and "new --out" in err


def test_demo_index_serves(demo_run):
    from fastapi.testclient import TestClient

    from tpas.serve.run import build_app_for, read_examples

    out, _ = demo_run
    examples = read_examples(out / "examples.txt")
    client = TestClient(build_app_for(out / "index", out / "model", examples=examples))
    assert client.get("/api/examples").json()["examples"] == examples
    body = client.get("/api/search", params={"q": examples[0], "k": 3, "rerank": 2}).json()
    assert len(body["results"]) == 3
    assert client.get(body["results"][0]["url"]).headers["content-type"] == "image/jpeg"
