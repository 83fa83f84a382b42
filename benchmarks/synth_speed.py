"""mini-PAB generation speed: images/s at 256x128 with 1 and 2 workers.

Prints a table and saves benchmarks/results/synth_speed.{json,md}. Besides wall-clock images/s it
reports images per CPU-second (parent + worker processes), which is what "per core" means and is
less disturbed by other jobs on a shared machine; the 1-minute load average is recorded too.

    .venv/bin/python benchmarks/synth_speed.py --identities 300 --workers 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from tpas.data.synth import generate

RESULTS = Path(__file__).resolve().parent / "results"


def _cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def measure(identities: int, workers: int, size: tuple[int, int], seed: int = 0) -> dict:
    out = Path(tempfile.mkdtemp(prefix="synth-speed-"))
    try:
        load = os.getloadavg()[0]
        cpu0, wall0 = _cpu(), time.perf_counter()
        summary = generate(out / "set", identities, seed=seed, size=size, workers=workers)
        wall, cpu = time.perf_counter() - wall0, _cpu() - cpu0
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {"identities": identities, "workers": workers, "size": f"{size[0]}x{size[1]}", "images": summary.images,
            "wall_s": round(wall, 2), "images_per_s": round(summary.images / wall, 1),
            "cpu_s": round(cpu, 2), "images_per_cpu_s": round(summary.images / cpu, 1),
            "load_avg_1min_before": round(load, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--identities", type=int, default=300)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--size", default="256x128")
    args = ap.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    generate(Path(tempfile.mkdtemp(prefix="synth-warm-")) / "w", 4, size=size)  # imports, caches
    rows = [measure(args.identities, w, size) for w in args.workers]
    header = "| workers | images | wall s | images/s | CPU s | images/CPU-s | load avg before |"
    lines = [header, "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['workers']} | {r['images']} | {r['wall_s']} | {r['images_per_s']} | {r['cpu_s']} | "
              f"{r['images_per_cpu_s']} | {r['load_avg_1min_before']} |" for r in rows]
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "command": f"benchmarks/synth_speed.py --identities {args.identities} --workers "
                       f"{' '.join(map(str, args.workers))} --size {args.size}"}
    (RESULTS / "synth_speed.json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    (RESULTS / "synth_speed.md").write_text(
        f"# mini-PAB generation speed\n\n`{meta['command']}` on {meta['cpus']} CPUs "
        f"(shared machine: see the load average).\n\n{table}\n")
    print(f"saved {RESULTS / 'synth_speed.json'} and {RESULTS / 'synth_speed.md'}")


if __name__ == "__main__":
    main()
