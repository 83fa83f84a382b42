"""Which training pairs to keep: each strategy at several fractions, the same number of steps.

For every strategy (random, balanced, diverse, hard) and fraction (e.g. 0.1, 0.25) a selection of
the training pairs is made with ``tpas.search.coreset.select_pairs``, a model is trained on it for
``--steps`` optimizer steps with the given config (``data.select`` = the selection's id list), and
its best-validation checkpoint is evaluated on the test split as is (ITC; the test split is
rendered in mini-PAB's shifted style, validation in the training style). Fraction 1.0 is one run
on all the pairs (every strategy keeps everything).

Validation identities are carved out of the *full* training set before any selection, exactly as
the trainer does (``data.val_identities``, ``train.seed``), so every run validates on the same
held-out people and no selection trains on them. The strategy to recommend is read off the
validation column; the test columns are reported, never used to choose.

``diverse`` and ``hard`` look at the pairs through a model: ``--select-model`` (a name, zero-shot
and seeded, or a trained directory), or by default a proxy trained here for ``--proxy-steps`` on a
random ``--proxy-size`` of the pairs (its cost is reported).

Resumable: every selection and run has its own folder under ``--out`` and is skipped when its
result exists; a killed training run resumes from its last checkpoint.

    python benchmarks/select_ablation.py --data /work/data/minipab-3000-s1 --out /work/data/select-ablation \\
        --steps 150 --fractions 0.1 0.25 1.0 --strategies random balanced diverse hard \\
        --config minipab-lite val.calibrate_rerank=0
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from common import RESULTS, save_results

from tpas.utils.io import write_json

STRATEGIES = ("random", "balanced", "diverse", "hard")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="dataset root (train and test splits)")
    p.add_argument("--config", default="minipab-lite", help="training config: a shipped name or a YAML file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="training config overrides")
    p.add_argument("--out", required=True, help="work folder: selections/, runs/, embeddings/, proxy/")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps of every run (the training budget)")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25, 1.0])
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    p.add_argument("--seed", type=int, default=0, help="selection seed")
    p.add_argument("--val-every", type=int, default=0, help="steps between validations (default: steps / 3)")
    p.add_argument("--select-model", help="model for diverse/hard (name or directory); default: a proxy")
    p.add_argument("--proxy-steps", type=int, default=60, help="steps of the proxy model for diverse/hard")
    p.add_argument("--proxy-size", type=float, default=0.1, help="random share of the pairs the proxy trains on")
    p.add_argument("--mix", type=float, default=0.0, help="hard: share of the budget left to diverse")
    p.add_argument("--dims", type=int, default=64, help="diverse: PCA dimensions")
    p.add_argument("--gallery", type=int, default=1024, help="hard: sampled gallery size")
    p.add_argument("--rerank", type=int, default=0, help="test evaluation: ITM re-rank depth (0 = ITC only)")
    p.add_argument("--name", default="", help="results file suffix: the results are written as select_ablation_NAME.{json,md} beside the other results")
    return p.parse_args(argv)


def run_config(args, extra: list[str]):
    """The training config of one run: the file, then the command line's overrides, then the run's own."""
    from tpas.config import load_config

    val_every = args.val_every or max(1, args.steps // 3)
    return load_config(args.config, [f"data.root={args.data}", f"train.max_steps={args.steps}",
                                     f"val.every={val_every}", *args.overrides, *extra])


def candidates(config):
    """The training pairs left after the validation identities are carved out, as the trainer does it."""
    from tpas.data.datasets import load_train
    from tpas.data.loader import split_by_identity, subsample

    trainset = subsample(load_train(config.data.root, config.data.format), config.data.max_pairs, config.train.seed)
    pairs, held = split_by_identity(trainset.pairs, config.data.val_identities, config.train.seed)
    return trainset, pairs, held


def train_once(config, out: Path, trainset, work: Path) -> float:
    """Train into ``out`` (resuming a killed run); seconds spent here.

    With a frozen-bottom model (``train_cache_views``) every run reads one feature cache of all the
    candidate pairs under ``work/feature-cache``: the first run pays for it, the others load it.
    """
    from tpas.train import train

    start = time.perf_counter()
    config.train.out = str(out)
    train(config, resume=(out / "checkpoints" / "latest").is_file(), trainset=trainset,
          cache_dir=work / "feature-cache", cache_pool=True)
    return time.perf_counter() - start


def selection_model(args, trainset, work: Path) -> tuple[str, dict]:
    """The model diverse/hard see the pairs through: --select-model, or a proxy trained here."""
    if args.select_model:
        return args.select_model, {"select_model": args.select_model}
    proxy = work / "proxy"
    done = proxy / "proxy.json"
    if not done.is_file():
        seconds = train_once(run_config(args, [f"train.max_steps={args.proxy_steps}",
                                               f"data.select=random:{args.proxy_size}",
                                               f"val.every={args.proxy_steps}"]), proxy, trainset, work)
        write_json(done, {"steps": args.proxy_steps, "size": args.proxy_size, "train_seconds": round(seconds, 1)})
    return str(proxy / "best"), {"proxy": json.loads(done.read_text())}


def make_selections(args, config, trainset, pairs, work: Path) -> tuple[dict[tuple[str, float], Path], dict]:
    """One id list per (strategy, fraction < 1), skipped when already written."""
    import torch

    from tpas.data.select import SELECTION_FILE, write_selection
    from tpas.search.coreset import pair_embeddings, select_pairs
    from tpas.search.index import model_fingerprint

    wanted = [(s, f) for s in args.strategies for f in args.fractions if f < 1]
    folders = {(s, f): work / "selections" / f"{s}-{f:g}" for s, f in wanted}
    todo = [key for key, folder in folders.items() if not (folder / SELECTION_FILE).is_file()]
    info: dict = {}
    embeddings = None
    if any(s in ("diverse", "hard") for s, _ in wanted):
        from tpas.models import create_model

        name, info = selection_model(args, trainset, work)
        if any(s in ("diverse", "hard") for s, _ in todo):
            torch.manual_seed(args.seed)
            model = create_model(name)
            start = time.perf_counter()
            embeddings = pair_embeddings(model, pairs, trainset.root,
                                         work / "embeddings" / model_fingerprint(model)[:16], progress=False)
            info["embed_seconds"] = round(time.perf_counter() - start, 1)
    for strategy, fraction in todo:
        selection = select_pairs(pairs, strategy, fraction, seed=args.seed, embeddings=embeddings, dims=args.dims,
                                 gallery=args.gallery, mix=args.mix, progress=False)
        write_selection(folders[strategy, fraction], pairs, selection, {"source": str(args.data), "size": fraction})
        print(f"selection {strategy} {fraction:g}: {selection.pairs} pairs ({selection.groups} identities)",
              flush=True)
    return folders, info


def run_one(args, name: str, select: Path | None, trainset, test, work: Path) -> dict:
    """Train one run and evaluate its best checkpoint on the test split; cached in result.json."""
    from tpas.eval.run import run_eval
    from tpas.models import create_model

    out = work / "runs" / name
    result_file = out / "result.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    config = run_config(args, [f"data.select={select / 'ids.txt'}"] if select else [])
    load_before = os.getloadavg()
    seconds = train_once(config, out, trainset, work)
    test_metrics = run_eval(create_model(out / "best"), test, rerank=args.rerank, progress=False).metrics
    best = json.loads((out / "best" / "metrics.json").read_text())
    result = {"run": name, "train_seconds": round(seconds, 1), "best_step": best.get("step"),
              "val": {k: best[k] for k in ("R@1", "R@5", "mAP") if k in best}, "test": test_metrics.to_dict(),
              "load_average": [round(x, 2) for x in (*load_before, *os.getloadavg())]}
    write_json(result_file, result)
    return result


def table(rows: list[dict]) -> str:
    head = ("| strategy | fraction | pairs | epochs | val R@1 | val mAP | test R@1 | test R@5 | test mAP | "
            "test R@1 normal | test R@1 anomaly | train min | load |")
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        t, v = r["test"], r["val"]
        groups = t.get("groups", {})
        lines.append(f"| {r['strategy']} | {r['fraction']:g} | {r['pairs']} | {r['epochs']:.1f} | {v['R@1']:.2f} | "
                     f"{v['mAP']:.2f} | {t['R@1']:.2f} | {t['R@5']:.2f} | {t['mAP']:.2f} | "
                     f"{groups.get('normal', {}).get('R@1', float('nan')):.2f} | "
                     f"{groups.get('anomaly', {}).get('R@1', float('nan')):.2f} | {r['train_seconds'] / 60:.1f} | "
                     f"{r['load']:.1f} |")
    return "\n".join(lines)


def verdict(rows: list[dict]) -> list[str]:
    """Best strategy per fraction by validation R@1, and how it compares with all the pairs on test."""
    notes = []
    full = next((r for r in rows if r["fraction"] >= 1), None)
    for fraction in sorted({r["fraction"] for r in rows if r["fraction"] < 1}):
        at = [r for r in rows if r["fraction"] == fraction]
        best = max(at, key=lambda r: r["val"]["R@1"])
        line = (f"at {fraction:g}: best on validation is **{best['strategy']}** (val R@1 {best['val']['R@1']:.2f}; "
                f"test R@1 {best['test']['R@1']:.2f}")
        if full is not None:
            gap = best["test"]["R@1"] - full["test"]["R@1"]
            line += f", {gap:+.2f} vs all pairs' {full['test']['R@1']:.2f}"
        notes.append(line + ")")
    return notes


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from tpas.data.datasets import load_eval

    work = Path(args.out)
    config = run_config(args, [])
    trainset, pairs, held = candidates(config)
    test = load_eval(args.data, config.data.format, "test")
    print(f"{len(pairs)} candidate pairs, {len(held)} validation pairs held out; test: {len(test.queries)} queries",
          flush=True)
    folders, select_info = make_selections(args, config, trainset, pairs, work)
    rows = []
    plan = [(s, f) for f in sorted(args.fractions) for s in args.strategies if f < 1]
    plan += [("all", 1.0)] if any(f >= 1 for f in args.fractions) else []
    batch = config.train.batch_size * max(1, config.train.grad_accum)
    for strategy, fraction in plan:
        select = folders.get((strategy, fraction))
        chosen = json.loads((select / "selection.json").read_text())["pairs"] if select else len(pairs)
        result = run_one(args, f"{strategy}-{fraction:g}", select, trainset, test, work)
        rows.append({"strategy": strategy, "fraction": fraction, "pairs": chosen,
                     "epochs": args.steps * batch / chosen, "load": sum(result["load_average"][::3]) / 2, **result})
        print(f"{strategy} {fraction:g}: val R@1 {result['val']['R@1']:.2f}, test R@1 {result['test']['R@1']:.2f} "
              f"({result['train_seconds'] / 60:.1f} min)", flush=True)
    command = " ".join(["python", Path(sys.argv[0]).as_posix(), *sys.argv[1:]]) if argv is None else " ".join(argv)
    data = {"command": command, "data": args.data, "config": args.config, "overrides": args.overrides,
            "steps": args.steps, "global_batch": batch, "candidates": len(pairs), "validation_pairs": len(held),
            "test_queries": len(test.queries), "selection": select_info, "rows": rows}
    notes = verdict(rows)
    markdown = "\n".join([
        "# Choosing the training pairs: strategies x fractions, same steps", "",
        f"`{command}`", "",
        f"{len(pairs)} candidate pairs ({len(held)} validation pairs of held-out identities, the same for every "
        f"run), {args.steps} steps of {batch} samples per run, test split as is ({len(test.queries)} queries, "
        "shifted style). val = best checkpoint on the held-out training identities (training style); "
        "test = that checkpoint on the test split, ITC" + (f" + ITM top-{args.rerank}" if args.rerank else "") + ".",
        f"Selection model for diverse/hard: {json.dumps(select_info) if select_info else 'not needed'}. "
        "load = mean of the 1-minute load average before and after the run (2 cores).", "",
        table(rows), "", *[f"- {n}" for n in notes], ""])
    print(markdown)
    save_results(RESULTS / ("select_ablation" + (f"_{args.name}" if args.name else "")), data, markdown)
    return data


if __name__ == "__main__":
    main()
