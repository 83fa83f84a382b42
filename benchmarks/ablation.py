"""Ablation of the retrieval pipeline on mini-PAB, one query per image (1:1) and with distractors.

Rows, each on the same rankings: ITC; + ITM re-rank of the top-k (the model's fusion weight);
+ SCA (the seed rule: the lower raw ITM confidence moves, look-alike descriptions only); + SCA's
margin rule (the query that loses least by moving moves); + global assignment (per collision
component, each query's top-2 plus a slack that keeps its top-1); one-to-one (no slack, top-10,
for reference); + fusion of two trained models (reciprocal-rank fusion of their re-ranked
orders); + fusion + global assignment.

Protocols: ``test`` = the mini-PAB test split (every caption has its own image); ``track4`` = the
AICity'26 Track 4-style masked copy written by ``tpas synth --distractors N`` (the same queries
against a gallery that adds both images of N people who are in no query; scored with its
answer key). Post-processing reads the rankings' raw scores (``tpas.search.postprocess``).

Nothing is chosen on a test split. SCA's text threshold, the margin rule's tau and the slack
prices are picked on validation identities carved out of the *training* split exactly as
training carves them (``--val-identities``, ``--val-seed`` = the run's ``data.val_identities``
and ``train.seed``; both models must have been trained with those, so that neither saw them):
``tpas.search.calibrate.calibrate_post`` over a grid. Tau and slack grids are multiples of the
median top-1 - top-2 gap of the validation confidences, so they follow the score's units (ITM
logits, ITM margins, RRF values) whatever the model.

    .venv/bin/python benchmarks/ablation.py --model RUN/best --second-model RUN2/best --data MINIPAB
    .venv/bin/python benchmarks/ablation.py --model runs/demo/model --data runs/demo/minipab --protocols test

Prints markdown tables and saves ``benchmarks/results/ablation.{json,md}`` (``--out``).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import RESULTS, save_results

from tpas.data.datasets import load_eval, load_train
from tpas.data.loader import split_by_identity, validation_set
from tpas.eval.fusion import System, fuse_systems
from tpas.eval.metrics import Metrics
from tpas.eval.run import run_eval
from tpas.eval.tables import markdown_table
from tpas.models import create_model
from tpas.search.calibrate import THRESHOLD_GRID, calibrate_post, calibrate_sca_threshold
from tpas.search.postprocess import candidates
from tpas.search.ranking import Ranking, rank_evalset, ranking_from_scores

COLUMNS = ("R@1", "R@5", "R@10", "mAP", "mAP@10", "normal R@1", "anomaly R@1")
GAP_MULTIPLES = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)  # tau and slack grids, in units of the median top-1 gap
PROTOCOL_SPLITS = {"test": "test", "track4": "track4"}


def median_gap(ranking: Ranking) -> float:
    """Median over queries of (top-1 - top-2) raw confidence: the unit the tau and slack grids scale by."""
    conf = candidates(ranking).conf
    gap = conf[:, 0] - conf[:, 1]
    gap = gap[np.isfinite(gap)]
    return float(np.median(gap)) if len(gap) and np.median(gap) > 0 else 1.0


def fused(first: Ranking, second: Ranking) -> Ranking:
    """Reciprocal-rank fusion of two models' full orders (re-ranked heads included)."""
    return fuse_systems([System("first", first.score_matrix(), comparable=False, text_embeds=first.text_embeds),
                         System("second", second.score_matrix(), comparable=False)], "rrf", depth=10)


def rank_pair(models, evalset, rerank: int, work: Path) -> list[Ranking]:
    """Each model's ranking of ``evalset`` with its top-``rerank`` re-scored by ITM."""
    return [rank_evalset(m, evalset, rerank=rerank, depth=max(rerank, 10), index_dir=work / f"index-{i}",
                         progress=False) for i, m in enumerate(models)]


def calibrate(models, args, work: Path) -> dict:
    """Pick every post-processing knob on the validation identities (never the test split)."""
    train = load_train(args.data, "pab")
    _, val_pairs = split_by_identity(train.pairs, args.val_identities, args.val_seed)
    valset = validation_set(val_pairs, train.root, args.val_max_queries)
    targets = (valset.query_targets(), valset.gallery_targets())
    rankings = rank_pair(models, valset, args.rerank, work / "val")
    first = rankings[0]
    threshold, threshold_table = calibrate_sca_threshold(first, *targets, grid=THRESHOLD_GRID)
    unit = median_gap(first)
    grid = tuple(round(unit * m, 6) for m in GAP_MULTIPLES)
    tau, tau_table = calibrate_post(first, *targets, "sca", "tau", (0.0, *grid), "max", threshold=threshold,
                                    rule="margin")
    slack, slack_table = calibrate_post(first, *targets, "assign", "slack", grid, "min", k=2)
    out = {"val_queries": len(valset.queries), "val_gallery": len(valset.gallery), "unit": unit,
           "threshold": threshold, "tau": tau, "slack": slack,
           "tables": {"threshold": threshold_table, "tau": tau_table, "slack": slack_table}}
    if len(rankings) > 1:
        both = fused(*rankings)
        fused_unit = median_gap(both)
        fused_grid = tuple(float(f"{fused_unit * m:.3g}") for m in GAP_MULTIPLES)
        out["fused_slack"], out["tables"]["fused_slack"] = calibrate_post(both, *targets, "assign", "slack",
                                                                          fused_grid, "min", k=2)
        out["fused_unit"] = fused_unit
    return out


def rows_for(args, knobs: dict, two: bool) -> list[tuple[str, str, str, dict]]:
    """(label, which ranking, post method, options)."""
    r, thr = args.rerank, knobs["threshold"]
    rows = [
        ("ITC", "itc", "none", {}),
        (f"+ ITM re-rank top-{r}", "first", "none", {}),
        (f"+ SCA (seed rule, text threshold {thr:g})", "first", "sca", {"threshold": thr}),
        (f"+ SCA (margin rule, tau {knobs['tau']:.3g})", "first", "sca",
         {"threshold": thr, "rule": "margin", "tau": knobs["tau"]}),
        (f"+ global assignment (top-2, slack {knobs['slack']:.3g})", "first", "assign",
         {"k": 2, "slack": knobs["slack"]}),
        ("one-to-one (top-10, no slack)", "first", "one_to_one", {"k": 10}),
    ]
    if two:
        rows += [
            ("+ fusion of two models (RRF, k = 60)", "fused", "none", {}),
            (f"+ fusion + global assignment (slack {knobs['fused_slack']:.3g})", "fused", "assign",
             {"k": 2, "slack": knobs["fused_slack"]}),
        ]
    return rows


def run_protocol(models, args, knobs: dict, protocol: str, work: Path) -> dict:
    """Rank once per model, then evaluate every row through run_eval on those rankings."""
    evalset = load_eval(args.data, "pab", PROTOCOL_SPLITS[protocol])
    if not evalset.has_ground_truth:
        raise SystemExit(f"{protocol}: no ground truth (its answer_key.json is missing)")
    t0 = time.perf_counter()
    rankings = rank_pair(models, evalset, args.rerank, work / protocol)
    first = rankings[0]
    by_name = {"first": first, "itc": ranking_from_scores(first.itc_scores, depth=10, text_embeds=first.text_embeds)}
    if len(rankings) > 1:
        by_name["fused"] = fused(*rankings)
    ranking_s = time.perf_counter() - t0
    rows = []
    for label, which, post, options in rows_for(args, knobs, len(models) > 1):
        res = run_eval(models[0], evalset, ranking=by_name[which], post=post, post_options=options,
                       assume_one_to_one=True, progress=False)
        rows.append({"setting": label, "ranking": which, "post": post, "options": res.settings["post_options"],
                     "metrics": res.metrics.to_dict(), "post_seconds": round(res.timings["post_s"], 3)})
    return {"protocol": protocol, "eval_set": evalset.name, "queries": len(evalset.queries),
            "gallery": len(evalset.gallery), "ranking_seconds": round(ranking_s, 1), "rows": rows}


def markdown(result: dict) -> str:
    rows = [(r["setting"], Metrics.from_dict(r["metrics"])) for r in result["rows"]]
    kind = "one query per image" if result["protocol"] == "test" else "with distractors (Track 4 style)"
    return (f"### {result['protocol']}: {kind} ({result['eval_set']}: {result['queries']} queries, "
            f"{result['gallery']} gallery images)\n\n" + markdown_table(rows, COLUMNS))


def calibration_markdown(knobs: dict) -> str:
    lines = [f"Picked on {knobs['val_queries']} validation queries / {knobs['val_gallery']} images "
             f"(training identities held out by the run; R@1 in percent per value):", ""]
    for name, table in knobs["tables"].items():
        cells = ", ".join(f"{v:g}: {r:.1f}" for v, r in table.items())
        chosen = knobs[name] if name in knobs else None
        lines.append(f"- {name} = **{chosen:g}** ({cells})")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="trained model directory (RUN/best) or a named model")
    ap.add_argument("--second-model", default=None, help="a second trained model for the fusion rows")
    ap.add_argument("--data", required=True, help="mini-PAB root (with track4/ for the distractor protocol)")
    ap.add_argument("--protocols", nargs="+", default=["test", "track4"], choices=tuple(PROTOCOL_SPLITS))
    ap.add_argument("--rerank", type=int, default=16, help="ITM re-rank depth (default 16)")
    ap.add_argument("--val-identities", type=float, default=0.05, help="the run's data.val_identities (default 0.05)")
    ap.add_argument("--val-seed", type=int, default=42, help="the run's train.seed (default 42, minipab-lite's)")
    ap.add_argument("--val-max-queries", type=int, default=300, help="the run's data.val_max_queries (default 300)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--note", default="", help="a line printed above the tables (e.g. which models these are)")
    ap.add_argument("--out", default=str(RESULTS / "ablation"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    models = [create_model(args.model).eval()]
    if args.second_model:
        models.append(create_model(args.second_model).eval())
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tpas-ablation-") as tmp:
        knobs = calibrate(models, args, Path(tmp))
        results = [run_protocol(models, args, knobs, p, Path(tmp)) for p in args.protocols]
    header = (f"## Retrieval ablation: post-processing on raw scores, 1:1 and with distractors\n\n"
              f"model `{args.model}`" + (f", second model `{args.second_model}`" if args.second_model else "")
              + f", data `{args.data}`, ITM re-rank top-{args.rerank} (fusion weight "
              f"{models[0].config.rerank_weight}), {time.perf_counter() - started:.0f} s.\n")
    if args.note:
        header += f"\n{args.note}\n"
    text = header + "\n" + calibration_markdown(knobs) + "\n" + "\n".join(markdown(r) for r in results)
    print(text)
    save_results(Path(args.out), {"model": args.model, "second_model": args.second_model, "data": str(args.data),
                                  "rerank": args.rerank, "note": args.note, "calibration": knobs,
                                  "protocols": results}, text)


if __name__ == "__main__":
    main()
