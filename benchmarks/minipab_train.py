"""Zero-shot vs fine-tuned retrieval on a mini-PAB test split: the proof that training works.

1. evaluate the untrained model of the config (``create_model(model.name)``) on the test split;
2. train with the config (``tpas.train.train``), timing it;
3. evaluate ``<out>/best`` the same way;
4. print a table and save ``benchmarks/results/minipab_train.{json,md}``.

Evaluation goes through ``tpas eval``'s path (``tpas.eval.run.run_eval``): ITC text-to-image, and
with ``--rerank K`` also ITM re-ranking of the ITC top-K; every test caption is a query, its positive is the image with the
same image_id (PAB rule), and the gallery holds both the normal and the anomalous image of every
test identity, so behaviour matters for R@1.

    .venv/bin/tpas synth data/minipab --identities 1500 --seed 0
    .venv/bin/python benchmarks/minipab_train.py --data data/minipab [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
from common import save_results

from tpas.eval.tables import FIGURES, markdown_table


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="mini-PAB root (tpas synth output)")
    p.add_argument("--config", default="minipab-lite", help="a shipped config's name or a YAML file")
    p.add_argument("--out", default="runs/minipab-lite-bench", help="run directory")
    p.add_argument("--results", default="benchmarks/results", help="where the table goes")
    p.add_argument("--skip-train", action="store_true", help="evaluate an existing <out>/best only")
    p.add_argument("--resume", action="store_true", help="resume the run in --out")
    p.add_argument("--rerank", type=int, default=16, help="also evaluate the trained model with ITM re-ranking "
                   "of the ITC top-k (tpas.eval.run.run_eval); 0 = skip")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return p.parse_args(argv)


def evaluate_model(model, evalset, rerank: int = 0):
    """(metrics, seconds) of ``tpas eval``'s path, ITC only or with ITM re-ranking."""
    from tpas.eval.run import run_eval

    start = time.perf_counter()
    metrics = run_eval(model, evalset, rerank=rerank, progress=False).metrics
    return metrics, round(time.perf_counter() - start, 1)


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    from tpas.config import load_config
    from tpas.data.datasets import load_eval
    from tpas.models import create_model
    from tpas.train import train

    config = load_config(args.config, [f"data.root={args.data}", f"train.out={args.out}", *args.overrides])
    if config.train.threads > 0:
        torch.set_num_threads(config.train.threads)
    test = load_eval(args.data, "pab", "test")
    print(f"test split: {len(test.queries)} queries, {len(test.gallery)} gallery images", flush=True)

    torch.manual_seed(config.train.seed)
    zero = create_model(config.model.name, checkpoint=config.model.checkpoint, **config.model.options)
    zero_shot, _ = evaluate_model(zero, test)
    del zero
    print(f"zero-shot: {json.dumps(zero_shot.to_dict())}", flush=True)

    out = Path(args.out)
    train_seconds = None
    if not args.skip_train:
        start = time.perf_counter()
        out = train(config, resume=args.resume)
        train_seconds = round(time.perf_counter() - start, 1)
    best_model = create_model(out / "best")
    trained, _ = evaluate_model(best_model, test)
    print(f"trained: {json.dumps(trained.to_dict())}", flush=True)
    reranked = None
    if args.rerank > 0:
        reranked, seconds = evaluate_model(best_model, test, rerank=args.rerank)
        print(f"trained + ITM re-rank top-{args.rerank} ({seconds} s): {json.dumps(reranked.to_dict())}", flush=True)

    logs = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in logs if "samples_per_s" in r]
    vals = [r for r in logs if "val" in r]
    sps = sorted(r["samples_per_s"] for r in steps)
    if train_seconds is None and len(steps) > 1:  # --skip-train: estimate from the log's time stamps
        span = steps[-1]["time"] - steps[0]["time"]
        train_seconds = round(span * steps[-1]["step"] / max(1, steps[-1]["step"] - steps[0]["step"]), 1)
    best = json.loads((out / "best" / "metrics.json").read_text()) if (out / "best" / "metrics.json").is_file() else {}
    result = {
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]) if argv is None else " ".join(argv),
        "data": str(args.data), "config": args.config, "overrides": args.overrides,
        "model": config.model.name, "train_pairs_steps": len(steps) and steps[-1]["step"],
        "global_batch": config.train.batch_size * max(1, config.train.grad_accum),
        "train_seconds": train_seconds,
        "samples_per_s_median": sps[len(sps) // 2] if sps else None,
        "zero_shot": zero_shot.to_dict(), "trained": trained.to_dict(),
        "trained_rerank": reranked.to_dict() if reranked is not None else None, "rerank_k": args.rerank,
        "best_val": best,
        "val_curve": [{"step": r["step"], "R@1": r["val"]["R@1"]} for r in vals],
        "cpu_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
    }
    named = [("zero-shot " + config.model.name + " (ITC)", zero_shot), ("fine-tuned, best val (ITC)", trained)]
    if reranked is not None:
        named.append((f"fine-tuned + ITM re-rank top-{args.rerank}", reranked))
    table = markdown_table(named, (*FIGURES, "normal R@1", "anomaly R@1"), first="model")
    notes = (f"train time {train_seconds} s, {result['train_pairs_steps']} steps of {result['global_batch']} "
             f"samples, median {result['samples_per_s_median']} samples/s; {len(test.queries)} test queries, "
             f"{len(test.gallery)} gallery images; load average at the end {result['load_average_at_end']}")
    print(table)
    print(notes)
    save_results(Path(args.results) / "minipab_train", result,
                 f"# mini-PAB: zero-shot vs fine-tuned (text-to-image)\n\n`{result['command']}`\n\n{table}\n{notes}\n")
    return result


if __name__ == "__main__":
    main()
