"""``tpas demo``: the whole method on a generated mini-PAB, in one run folder.

Steps (each logged, each skipped when its finished-marker is already there, so an interrupted demo
resumes where it stopped):

1. ``data``   generate mini-PAB (procedural pedestrians + captions, PAB layout)
2. ``train``  train the ``lite`` model with the shipped ``minipab-lite`` config; once the best model
              is copied to ``model/``, the checkpoints (optimizer state included) and the run's
              ``last/`` and ``best/`` copies are removed: the demo never reads them again
3. ``index``  index the test gallery (with image tokens, for ITM): shared by eval and the page
4. ``eval``   evaluate on the test split: ITC only, + ITM re-ranking, + SCA, + global assignment
              (SCA and assignment with the options training picked on validation) -> results.md/json
5. ``report`` report.html: the table plus links to each setting's retrieval report
6. ``serve``  the search page on 127.0.0.1 until Ctrl-C (skipped with ``--no-serve``)

A step writes ``.steps/<step>.json`` (its parameters) only once its outputs are complete; if a
later run asks for different parameters in the same folder it stops with a clear error instead of
mixing results.
"""

from __future__ import annotations

import hashlib
import html
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from tpas.config import resolve_config
from tpas.errors import TpasError
from tpas.eval.metrics import Metrics
from tpas.eval.tables import FIGURES, html_table, markdown_table
from tpas.utils.io import write_json, write_text

log = logging.getLogger(__name__)

__all__ = ["DemoOptions", "Setting", "default_out", "run_demo", "serve_demo", "settings_for"]

CONFIG_NAME = "minipab-lite"  # a config shipped in tpas/configs/
COLUMNS = (*FIGURES, "normal R@1", "anomaly R@1")  # the demo table's columns


@dataclass
class Setting:
    """One row of the results table: how the trained (or untrained) model is evaluated."""

    name: str
    label: str
    rerank: int = 0
    post: str = "none"
    trained: bool = True


@dataclass
class DemoOptions:
    out: Path
    # 3,000 training people: the lite model's frozen towers need many people more than many epochs
    # (benchmarks/results/lite_ablation.md), and the test split of a seed depends only on its size,
    # so these 200 test people are the same whatever the training size
    identities: int = 3200
    test_identities: int = 200
    seed: int = 0
    config: str | Path | None = None  # a shipped config name or a YAML path; default minipab-lite
    overrides: list[str] = field(default_factory=list)  # dotted key=value for the training config
    rerank: int = 16  # ITM re-ranks the ITC top-K in the evaluation table
    zero_shot: bool = False  # also evaluate the untrained lite model
    workers: int = 2
    serve: bool = True
    host: str = "127.0.0.1"
    port: int = 8000
    examples: int = 12
    device: str = "auto"  # where the model runs (training follows train.device)


def default_config() -> Path:
    return resolve_config(CONFIG_NAME)


def default_out() -> Path:
    """A fixed folder, so that running ``make demo`` again resumes instead of starting over."""
    return Path("runs") / "demo"


def settings_for(opts: DemoOptions) -> list[Setting]:
    rows = []
    if opts.zero_shot:
        rows.append(Setting("zero-shot", "untrained lite, ITC", trained=False))
    rows += [
        Setting("itc", "trained lite, ITC only"),
        Setting("itc+itm", f"+ ITM re-rank top-{opts.rerank}", rerank=opts.rerank),
        Setting("itc+itm+sca", f"+ ITM re-rank top-{opts.rerank} + SCA", rerank=opts.rerank, post="sca"),
        Setting("itc+itm+assign", f"+ ITM re-rank top-{opts.rerank} + global assignment", rerank=opts.rerank,
                post="assign"),
    ]
    return rows


class Steps:
    """Finished-step markers in ``<out>/.steps``: a step is done when its marker holds the same params."""

    def __init__(self, out: Path):
        self.dir = out / ".steps"

    def done(self, name: str, params: dict[str, Any]) -> bool:
        marker = self.dir / f"{name}.json"
        if not marker.is_file():
            return False
        recorded = json.loads(marker.read_text(encoding="utf-8")).get("params")
        if recorded != json.loads(json.dumps(params)):
            raise TpasError(
                f"{marker.parent.parent}: step '{name}' was run with {recorded}, now asked for {params}; "
                "use a new --out folder (or delete that folder) to start over")
        return True

    def mark(self, name: str, params: dict[str, Any], seconds: float, **extra: Any) -> None:
        write_json(self.dir / f"{name}.json", {"params": params, "seconds": round(seconds, 1), **extra})

    def run(self, name: str, params: dict[str, Any], fn: Callable[[], Any]) -> None:
        if self.done(name, params):
            log.info("[demo] %-6s already done, skipping (%s)", name, self.dir / f"{name}.json")
            return
        log.info("[demo] %-6s starting", name)
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
        self.mark(name, params, seconds)
        log.info("[demo] %-6s done in %.1f s", name, seconds)


# -- the steps ------------------------------------------------------------------------------------

def make_data(opts: DemoOptions, data_dir: Path) -> None:
    from tpas.data.synth.writer import generate

    if data_dir.exists():
        shutil.rmtree(data_dir)  # a half-written dataset from an interrupted run
    generate(data_dir, identities=opts.identities, seed=opts.seed, workers=opts.workers, preview=True,
             test_fraction=opts.test_identities / opts.identities)


def train_model(opts: DemoOptions, data_dir: Path, train_dir: Path) -> Path:
    """Train lite on the generated data; an interrupted run resumes from its latest checkpoint."""
    from tpas.config import load_config
    from tpas.train.loop import train

    overrides = [f"data.root={data_dir}", f"train.out={train_dir}", *opts.overrides]
    config = load_config(opts.config or default_config(), overrides)
    resume = (train_dir / "checkpoints" / "latest").is_file()
    if resume:
        log.info("[demo] resuming training from %s", train_dir / "checkpoints")
    run_dir = Path(train(config, resume=resume))
    best = run_dir / "best"
    if not (best / "config.json").is_file():
        raise TpasError(f"training finished but wrote no best model at {best}")
    return best


def evaluate(opts: DemoOptions, data_dir: Path, model_dir: Path, index_dir: Path, eval_dir: Path) -> list[dict[str, Any]]:
    """Run every setting (each writes ``metrics.json`` + ``report.html`` in its own folder).

    Settings of one model at one re-rank depth share one ranking ("+ SCA" post-processes the
    ranking of "+ ITM re-rank": ITM is the costly part), and the trained model's rankings use the
    gallery index of the ``index`` step, so the gallery is encoded once for the table and the page.
    """
    from tpas.data.datasets import load_eval
    from tpas.eval.run import run_eval
    from tpas.models import create_model
    from tpas.search.ranking import rank_evalset

    evalset = load_eval(data_dir, "pab", "test")
    rows = []
    models: dict[bool, Any] = {}
    rankings: dict[tuple[bool, int], Any] = {}
    for s in settings_for(opts):
        out = eval_dir / s.name
        if (out / "metrics.json").is_file():
            log.info("[demo] eval %-12s already done", s.name)
            metrics = Metrics.from_dict(json.loads((out / "metrics.json").read_text(encoding="utf-8")))
        else:
            if s.trained not in models:
                models[s.trained] = create_model(model_dir if s.trained else "lite", device=opts.device)
            model, key = models[s.trained], (s.trained, s.rerank)
            if key not in rankings:
                rankings[key] = rank_evalset(model, evalset, rerank=s.rerank, workers=opts.workers,
                                             index_dir=index_dir if s.trained else None)
            log.info("[demo] eval %-12s (%s)", s.name, s.label)
            metrics = run_eval(model, evalset, post=s.post, out_dir=out, ranking=rankings[key]).metrics
        rows.append({**asdict(s), "metrics": metrics.to_dict(), "report": f"eval/{s.name}/report.html"})
    return rows


def results_markdown(rows: list[dict[str, Any]], header: str = "") -> str:
    table = markdown_table([(r["label"], Metrics.from_dict(r["metrics"])) for r in rows], COLUMNS)
    return f"{header}\n{table}" if header else table


def write_report(out: Path, rows: list[dict[str, Any]], info: dict[str, Any]) -> Path:
    """``report.html``: the table, what was run, and links to each setting's retrieval report."""
    links = [r["report"] if (out / r["report"]).is_file() else None for r in rows]
    table = html_table([(r["label"], Metrics.from_dict(r["metrics"])) for r in rows], COLUMNS, links=links)
    facts = "".join(f"<li><b>{html.escape(str(k))}</b>: {html.escape(str(v))}</li>" for k, v in info.items())
    timings = []
    for marker in sorted((out / ".steps").glob("*.json")):
        seconds = json.loads(marker.read_text(encoding="utf-8")).get("seconds")
        timings.append(f"{html.escape(marker.stem)} {seconds} s")
    if timings:
        facts += f"<li><b>step times</b>: {', '.join(timings)}</li>"
    preview = ""
    if (out / "minipab" / "preview.png").is_file():
        preview = ('<h2>The data</h2><p>A few generated identities (normal and anomalous image of each):</p>'
                   '<img src="minipab/preview.png" alt="mini-PAB preview" style="max-width:100%">')
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tpas demo report</title>
<style>
body {{ font: 15px/1.5 system-ui, sans-serif; margin: 28px; color: #1d2330; max-width: 980px; }}
table {{ border-collapse: collapse; margin: 12px 0 20px; }}
th, td {{ border-bottom: 1px solid #dfe3ea; padding: 6px 12px; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
th {{ background: #f5f6f8; }}
code {{ background: #f1f3f6; padding: 1px 4px; border-radius: 4px; }}
</style></head><body>
<h1>tpas demo</h1>
<p>Text-to-image retrieval on a generated mini-PAB test split (R@K, mAP and mINP in percent; every
query has exactly one positive image). ITM re-ranking re-scores the ITC top-K with the fusion
head; SCA then resolves queries that claim the same top-1 image (the weaker claim moves on), and
global assignment resolves them all at once (each query takes one of its top candidates, each image
goes to one query). Both use settings picked on held-out training people, never on this split.</p>
{table}
<h2>Run</h2><ul>{facts}</ul>
{preview}
<p>Search it yourself: <code>tpas serve --index {html.escape(str(out / 'index'))} --model {html.escape(str(out / 'model'))} --examples {html.escape(str(out / 'examples.txt'))}</code></p>
</body></html>
"""
    path = out / "report.html"
    write_text(path, page)
    return path


def prune_training(train_dir: Path) -> None:
    """Remove what only an unfinished training run needs (checkpoints to resume from) and the copies
    of weights ``model/`` already holds; the run's config and log stay. Safe to call again."""
    for name in ("checkpoints", "last", "best"):
        if (train_dir / name).exists():
            shutil.rmtree(train_dir / name)
            log.info("[demo] removed %s (model/ holds the trained weights)", train_dir / name)


def build_gallery_index(data_dir: Path, model_dir: Path, index_dir: Path, workers: int = 0,
                        device: str = "auto") -> None:
    """Index the test gallery with image tokens (``build_index`` resumes an interrupted build)."""
    from tpas.data.datasets import load_eval
    from tpas.models import create_model
    from tpas.search.index import build_index

    gallery = load_eval(data_dir, "pab", "test").gallery
    build_index(create_model(model_dir, device=device), gallery, data_dir, index_dir, keep_tokens=True,
                workers=workers)


def pick_examples(data_dir: Path, n: int) -> list[str]:
    """One caption each from ``n`` test images spread over the gallery (normal and anomalous alike)."""
    from tpas.data.datasets import load_eval

    by_target: dict[str, list[str]] = {}
    for q in load_eval(data_dir, "pab", "test", check_images=False).queries:
        by_target.setdefault(str(q.target), []).append(q.caption)
    targets = list(by_target)
    if not targets or n < 1:
        return []
    step = max(1, len(targets) // n)
    picked = [by_target[t][i % len(by_target[t])] for i, t in enumerate(targets[::step][:n])]
    return list(dict.fromkeys(picked))


# -- driver ---------------------------------------------------------------------------------------

def run_demo(opts: DemoOptions) -> dict[str, Any]:
    """Run (or resume) every step; returns the results rows and the paths written."""
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    opts.config = resolve_config(opts.config) if opts.config else default_config()
    data_dir, train_dir, model_dir = out / "minipab", out / "train", out / "model"
    eval_dir, index_dir = out / "eval", out / "index"
    steps = Steps(out)
    started = time.perf_counter()
    log.info("[demo] run folder: %s", out.resolve())

    data_params = {"identities": opts.identities, "test_identities": opts.test_identities, "seed": opts.seed}
    steps.run("data", data_params, lambda: make_data(opts, data_dir))

    config_sha = hashlib.sha256(Path(opts.config).read_bytes()).hexdigest()[:16]
    train_params = {**data_params, "config_sha256": config_sha, "overrides": list(opts.overrides)}

    def do_train() -> None:
        best = train_model(opts, data_dir, train_dir)
        if model_dir.exists():
            shutil.rmtree(model_dir)
        shutil.copytree(best, model_dir)

    steps.run("train", train_params, do_train)
    prune_training(train_dir)

    steps.run("index", train_params,
              lambda: build_gallery_index(data_dir, model_dir, index_dir, opts.workers, opts.device))

    eval_params = {**train_params, "settings": [asdict(s) for s in settings_for(opts)]}
    rows: list[dict[str, Any]] = []

    def do_eval() -> None:
        rows.extend(evaluate(opts, data_dir, model_dir, index_dir, eval_dir))
        write_json(out / "results.json", {"rows": rows})
        table = results_markdown(rows, header=f"# tpas demo: mini-PAB test ({opts.test_identities} of {opts.identities} "
                                                       f"identities, seed {opts.seed})\n")
        write_text(out / "results.md", table)

    steps.run("eval", eval_params, do_eval)
    if not rows:
        rows = json.loads((out / "results.json").read_text(encoding="utf-8"))["rows"]

    def do_report() -> None:
        info = {"data": data_dir, "model": model_dir, "identities": opts.identities,
                "test_identities": opts.test_identities, "seed": opts.seed,
                "config": opts.config, "overrides": " ".join(opts.overrides) or "none"}
        write_report(out, rows, info)

    steps.run("report", eval_params, do_report)

    examples = pick_examples(data_dir, opts.examples)
    write_text(out / "examples.txt", "\n".join(examples) + "\n")

    print()
    print(results_markdown(rows, header=f"tpas demo results ({out / 'results.md'}):\n"))
    print(f"report:  {out / 'report.html'}")
    print(f"index:   {index_dir}")
    print(f"model:   {model_dir}")
    print(f"elapsed: {time.perf_counter() - started:.0f} s")
    return {"out": out, "rows": rows, "report": out / "report.html", "index": index_dir, "model": model_dir,
            "examples": examples}


def serve_demo(result: dict[str, Any], host: str = "127.0.0.1", port: int = 8000, device: str = "auto",
               allow_remote: bool = False, token: str | None = None) -> None:
    from tpas.serve.run import build_app_for, serve_forever

    app = build_app_for(result["index"], result["model"], examples=result["examples"], device=device, token=token)
    serve_forever(app, host=host, port=port, allow_remote=allow_remote)

