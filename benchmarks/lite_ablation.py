"""One row of the lite ablation: train a config variant, then score it on validation and test.

Every design choice of the fast lite (``src/tpas/configs/minipab-lite.yaml``) is picked on the
**validation** columns: held-out *training* identities (``data.val_identities``; 200 identities
= 400 images, as large as the demo's test gallery), the same split the trainer uses to pick the
checkpoint and the re-rank fusion weight. Test columns (the mini-PAB test split, shifted camera
style) are reported alongside and never used to choose.

Per row: feature-cache and training seconds (2 shared CPU cores: compare rows of one session
only), then for validation and test: ITC R@1, + ITM re-rank of the ITC top-16 (ranked by the ITM
logit margin, fused with the validation-calibrated weight stored in ``best/config.json``), and
+ SCA on top, all through ``tpas.eval.run.run_eval`` (the code ``tpas eval`` and the demo run).

    .venv/bin/python benchmarks/lite_ablation.py --data MINIPAB --name fast \\
        [--cache-dir DIR] [key=value ...]

Rows are appended to ``benchmarks/results/lite_ablation.jsonl``; ``--table`` rewrites
``lite_ablation.md`` from all rows.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="mini-PAB root (tpas synth output)")
    p.add_argument("--name", help="row name")
    p.add_argument("--config", default="minipab-lite")
    p.add_argument("--runs", default="runs/lite-ablation", help="folder for run directories")
    p.add_argument("--cache-dir", default=None, help="shared feature-cache folder (rows with the same frozen "
                   "bottoms, data and views reuse one cache; its build time is then not in the row)")
    p.add_argument("--rerank", type=int, default=16)
    p.add_argument("--no-test", action="store_true", help="validation columns only")
    p.add_argument("--skip-train", action="store_true", help="score the run's existing best/ (no training; "
                   "the time columns then stay empty)")
    p.add_argument("--results", default=str(RESULTS / "lite_ablation"), help="results stem (.jsonl/.md)")
    p.add_argument("--table", action="store_true", help="only rewrite the markdown table from the jsonl")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p.parse_args(argv)


def score(model, evalset, rerank: int) -> dict[str, float]:
    """R@1/R@5/mAP for ITC, + ITM re-rank, + SCA: one encoding and one ITM pass, through run_eval."""
    from tpas.eval.run import run_eval
    from tpas.search.ranking import rank_evalset

    ranking = rank_evalset(model, evalset, rerank=rerank, depth=max(rerank, 10), progress=False)
    itc_only = ranking.itc_only()
    out: dict[str, float] = {}
    for key, ranked, post in (("itc", itc_only, "none"), ("itm", ranking, "none"), ("sca", ranking, "sca")):
        m = run_eval(model, evalset, post=post, ranking=ranked, progress=False).metrics
        out.update({f"{key} R@1": round(m["R@1"], 2), f"{key} R@5": round(m["R@5"], 2),
                    f"{key} mAP": round(m["mAP"], 2)})
    return out


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.table:
        write_table(Path(args.results))
        return None
    if not args.data or not args.name:
        raise SystemExit("--data and --name are required")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    import torch

    from tpas.config import load_config
    from tpas.data.datasets import load_eval
    from tpas.models import create_model
    from tpas.train.loop import Trainer

    run_dir = Path(args.runs) / f"{Path(args.data).name}-{args.name}"
    overrides = [f"data.root={args.data}", f"train.out={run_dir}", *args.overrides]
    config = load_config(args.config, overrides)
    start, cpu0 = time.perf_counter(), _cpu_seconds()
    trainer = Trainer(config, resume=args.skip_train, cache_dir=args.cache_dir)
    built = time.perf_counter() - start
    if not args.skip_train:
        trainer.fit()
    total, cpu = time.perf_counter() - start, _cpu_seconds() - cpu0
    threads = torch.get_num_threads()
    model = create_model(run_dir / "best").eval()
    metrics = json.loads((run_dir / "best" / "metrics.json").read_text())
    row = {"name": args.name, "data": Path(args.data).name, "overrides": args.overrides,
           "command": " ".join(["benchmarks/lite_ablation.py", *sys.argv[1:]]),
           **({"cache_s": None, "setup_s": None, "train_total_s": None, "train_total_cpu_s": None}
              if args.skip_train else {"cache_s": round(trainer.cache_seconds, 1), "setup_s": round(built, 1),
                                       "train_total_s": round(total, 1), "train_total_cpu_s": round(cpu, 1)}),
           "steps": trainer.total_steps, "best_step": metrics.get("step"),
           "rerank_weight": model.config.rerank_weight, "threads": threads,
           "load_average": [round(x, 2) for x in os.getloadavg()],
           "train_pairs": len(trainer.dataset), "val_queries": len(trainer.valset.queries) if trainer.valset else 0,
           "val_gallery": len(trainer.valset.gallery) if trainer.valset else 0}
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    row["val"] = score(model, trainer.valset, args.rerank)
    if not args.no_test:
        row["test"] = score(model, load_eval(args.data, "pab", "test"), args.rerank)
    row["eval_s"] = round(time.perf_counter() - t0, 1)
    stem = Path(args.results)
    stem.parent.mkdir(parents=True, exist_ok=True)
    with open(stem.with_suffix(".jsonl"), "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")
    write_table(stem)
    print(json.dumps(row, indent=1))
    return row


def _cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (DataLoader workers): a measure of the
    work done that, unlike wall time, hardly depends on what else runs on a shared machine."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def write_table(stem: Path) -> None:
    rows = [json.loads(line) for line in stem.with_suffix(".jsonl").read_text().splitlines() if line.strip()]
    head = ("| row | data | cache s | train s (all) | CPU s | steps | val ITC R@1 | val +ITM | val +SCA | "
            "test ITC R@1 | test +ITM | test +SCA | fusion w | command |")
    lines = [f"# lite ablation ({stem.name}.jsonl)", "",
             "Validation (held-out training identities) picks; test (shifted camera style) is reported only. "
             "R@1 in percent; +ITM = ITM re-rank of the ITC top-16 ranked by the logit margin and fused with "
             "the validation-calibrated weight; +SCA on top of that. Times: 2 shared CPU cores.", "",
             head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        v, t = r.get("val", {}), r.get("test", {})
        lines.append(f"| {r['name']} | {r['data']} | {r['cache_s']} | {r['train_total_s']} | "
                     f"{r.get('train_total_cpu_s', '–')} | {r['steps']} | "
                     f"{v.get('itc R@1', '–')} | {v.get('itm R@1', '–')} | {v.get('sca R@1', '–')} | "
                     f"{t.get('itc R@1', '–')} | {t.get('itm R@1', '–')} | {t.get('sca R@1', '–')} | "
                     f"{r.get('rerank_weight')} | `{r['command']}` |")
    notes = [f"- **{r['name']}**: {r['note']}" for r in rows if r.get("note")]
    what = ["", "What the rows change (each line's command holds its overrides):", "",
            "- **fast-t0**: the first fast layout (s16 grid tokens, top 5 image blocks training, frozen text, 4 "
            "cached views, 12 epochs) on the 1,000-person demo data;",
            "- **frozen-pool2-3200-e4**: both towers frozen (computed once, 2 augmented views per image), MLP ITC heads, stride-16 bands in "
            "the ITC vector, s16 tokens pooled to 6x3, 4 epochs, on 3,200 people (3,000 train);",
            "- **frozen-bands-3200-e8**: the same with the 8 band tokens as the fusion's image tokens (the shipped "
            "layout), 8 epochs. Both ran with the config of their day (2 cached views; the shipped one caches 1 "
            "view and trains 6 epochs to fit the demo's budget: its figures are the demo's, docs/demo.md)."]
    text = "\n".join(lines + what + ([""] + notes if notes else [])) + "\n"
    stem.with_suffix(".md").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
