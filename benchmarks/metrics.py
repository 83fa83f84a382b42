"""Chunked metrics at gallery scale: time per query and peak memory for a 1M-image gallery.

Score rows are produced on the fly by a callable (seeded per row block), so the full
queries x gallery matrix never exists; this measures what ``tpas.eval.evaluate`` itself costs.
Two cases: one positive per query (PAB: the image id) and five positives per query (TBPS-like:
the person id). Each runs in a fresh subprocess; peak RSS is its ``ru_maxrss``.

    .venv/bin/python benchmarks/metrics.py                          # 1,000 queries x 1,000,000 gallery
    .venv/bin/python benchmarks/metrics.py --queries 200 --gallery 100000

Prints a table and saves benchmarks/results/metrics.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from common import REPO, save_results  # noqa: E402  (puts src/ on the path)

from tpas.utils.io import write_json, write_text  # noqa: E402

CHILD = r"""
import json, resource, sys, time
import numpy as np
from tpas.eval import evaluate
n, g, positives = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
gallery_ids = np.arange(g) // positives                 # person p owns `positives` consecutive images
query_ids = np.random.default_rng(0).integers(0, g // positives, size=n)

def rows(start, stop):
    rng = np.random.default_rng(start)
    block = rng.random((stop - start, g), dtype=np.float32)
    block[:, :: 97] = 0.5                                 # plenty of exact ties
    return block

gen = time.process_time()
for a in range(0, n, 32):
    rows(a, min(a + 32, n))
gen = time.process_time() - gen
start = time.process_time()
res = evaluate(rows, query_ids.tolist(), gallery_ids.tolist(), chunk_size=32)
total = time.process_time() - start
print(json.dumps({"cpu_seconds": total - gen, "generate_seconds": gen, "R@1": res["R@1"],
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--gallery", type=int, default=1_000_000)
    args = parser.parse_args()
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    cases = []
    for positives in (1, 5):
        out = subprocess.run([sys.executable, "-c", CHILD, str(args.queries), str(args.gallery), str(positives)],
                             env=env, check=True, capture_output=True, text=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        ms = 1000 * r["cpu_seconds"] / args.queries
        cases.append({"positives_per_query": positives, "queries": args.queries, "gallery": args.gallery,
                      "metric_cpu_seconds": round(r["cpu_seconds"], 2), "ms_per_query": round(ms, 2),
                      "hours_for_100k_queries": round(ms * 100_000 / 3.6e6, 2),
                      "score_generation_cpu_seconds": round(r["generate_seconds"], 2),
                      "peak_rss_mb": round(r["peak_rss_mb"], 1)})
    command = "python benchmarks/metrics.py " + " ".join(sys.argv[1:])
    table = ("| positives/query | queries x gallery | metric CPU s | ms/query | 100k queries (h) | peak RSS MB |\n"
             "|---|---|---|---|---|---|\n" + "\n".join(
                 f"| {c['positives_per_query']} | {c['queries']:,} x {c['gallery']:,} | {c['metric_cpu_seconds']} | "
                 f"{c['ms_per_query']} | {c['hours_for_100k_queries']} | {c['peak_rss_mb']} |" for c in cases))
    print(table)
    results = REPO / "benchmarks" / "results"
    meta = {"command": command, "python": platform.python_version(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}
    write_json(results / "metrics.json", {**meta, "cases": cases})
    write_text(results / "metrics.md", f"# Chunked metrics benchmark\n\n`{command}` (Python {meta['python']}, "
               f"{meta['machine']}, one thread; CPU time of `evaluate` only, score generation subtracted; "
               f"peak RSS includes one 32-row block of scores)\n\n{table}\n")
    print(f"saved {results / 'metrics.json'} and {results / 'metrics.md'}")


if __name__ == "__main__":
    main()
