"""PAB training-annotation load time and peak memory at full scale (75 files, ~1M lines).

Generates PAB-shaped ``annotation/train/attr_{0..74}.json`` files once (cached in the system temp
dir): every identity has a normal and an anomalous line pointing at each other (``hard_i``,
``hard_c``, ``hard_i_id``), ~40-word captions, a shared short ``source_caption``, action and scene,
as in the published format. Each measurement runs ``tpas.data.load_train`` in a fresh subprocess and
reads its peak RSS (``ru_maxrss``), next to the RSS of a subprocess that only imports tpas.

    .venv/bin/python benchmarks/readers.py                  # 75 files x 13,334 lines = 1,000,050 lines
    .venv/bin/python benchmarks/readers.py --lines 100000   # smaller, faster run

Prints a table and saves benchmarks/results/readers.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
from pathlib import Path

from common import REPO, save_results  # noqa: E402  (puts src/ on the path)

from tpas.utils.io import write_json, write_text  # noqa: E402

FILES = 75
SUBJECTS = ["a man", "a woman", "a young man", "an elderly woman", "a teenage boy", "a middle-aged man", "a girl"]
CLOTHES = ["wearing a red jacket and blue jeans", "in a black hoodie and grey trousers",
           "dressed in a white shirt with dark shorts", "wearing a long beige coat and brown boots",
           "in a green sweater and black leggings", "wearing a yellow raincoat over a striped dress"]
CARRY = ["carrying a backpack on the left shoulder", "holding a mobile phone in the right hand",
         "with a shopping bag in each hand", "pushing a small stroller", "with nothing in the hands"]
SCENES = ["street", "park", "subway station", "parking lot", "shopping mall", "campus", "crossroad"]
NORMAL = ["walking", "standing", "talking on the phone", "waiting", "jogging", "reading"]
ANOMALY = ["falling", "fighting", "climbing a fence", "lying on the ground", "throwing objects", "vandalizing"]
DETAILS = ["The background shows parked cars and a row of trees.", "Several other people pass by in the distance.",
           "The light is dim and the ground looks wet after rain.", "A shop window with bright signs is behind them.",
           "The camera looks down from a high corner at an angle.", "There are benches and a lamp post nearby."]


def caption(rng: random.Random, who: str, clothes: str, carry: str, action: str, scene: str) -> str:
    """About 40 words, like PAB's generated captions."""
    return (f"The image shows {who} {clothes}, {carry}, who is {action} in a busy {scene} during the day. "
            f"{rng.choice(DETAILS)} {rng.choice(DETAILS)} The person appears to be {rng.randint(20, 70)} years old.")


def generate(folder: Path, lines_per_file: int, seed: int = 0) -> None:
    from tqdm import tqdm

    train = folder / "annotation" / "train"
    train.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for f in tqdm(range(FILES), desc="generate", unit="file"):
        out = []
        for p in range(lines_per_file // 2 + lines_per_file % 2):
            who, clothes, carry, scene = (rng.choice(SUBJECTS), rng.choice(CLOTHES), rng.choice(CARRY),
                                          rng.choice(SCENES))
            normal, anomaly = rng.choice(NORMAL), rng.choice(ANOMALY)
            ids = (f"{f}_{2 * p}", f"{f}_{2 * p + 1}")
            imgs = (f"imgs_{f}/goal/{p}.jpg", f"imgs_{f}/full/{p}.jpg")
            caps = (caption(rng, who, clothes, carry, normal, scene), caption(rng, who, clothes, carry, anomaly, scene))
            source = {"source_id": f"{rng.randrange(10000)}_{rng.randrange(5)}",
                      "source_caption": f"{who} was {normal} in the {scene}"}
            for k, (label, action) in enumerate((("normal", normal), ("anomaly", anomaly))):
                o = 1 - k
                out.append(json.dumps({"image": "train/" + imgs[k], "caption": caps[k], "image_id": ids[k],
                                       "hard_i": imgs[o], "hard_c": caps[o], "hard_i_id": ids[o], **source,
                                       label: action.capitalize(), "scene": scene}))
        del out[lines_per_file:]
        (train / f"attr_{f}.json").write_text("\n".join(out) + "\n", encoding="utf-8")
    (folder / "DONE").write_text("ok")


CHILD = r"""
import json, resource, sys, time
import tpas.data.datasets as d
start = time.perf_counter()
cpu = time.process_time()
if sys.argv[1] == "load":
    train = d.load_train(sys.argv[2], "pab")
    n = len(train)
else:
    n = 0
print(json.dumps({"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu, "pairs": n,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_child(mode: str, folder: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    out = subprocess.run([sys.executable, "-c", CHILD, mode, str(folder)], env=env, check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=1_000_000, help="total lines (default 1M)")
    parser.add_argument("--repeats", type=int, default=2, help="timed loads (best and worst reported)")
    parser.add_argument("--cache", default=None, help="where to keep generated files (default: temp dir)")
    args = parser.parse_args()

    per_file = -(-args.lines // FILES)
    folder = Path(args.cache or tempfile.gettempdir()) / f"tpas-bench-pab-{FILES}x{per_file}-v1"
    if not (folder / "DONE").is_file():
        generate(folder, per_file)
    size_mb = sum(p.stat().st_size for p in (folder / "annotation" / "train").iterdir()) / 2**20

    base = run_child("import", folder)
    loads = [run_child("load", folder) for _ in range(args.repeats)]
    result = {
        "files": FILES,
        "lines": loads[0]["pairs"],
        "annotation_mb": round(size_mb, 1),
        "load_seconds_best": round(min(x["seconds"] for x in loads), 2),
        "load_seconds_worst": round(max(x["seconds"] for x in loads), 2),
        "load_cpu_seconds_best": round(min(x["cpu_seconds"] for x in loads), 2),
        "peak_rss_mb": round(max(x["peak_rss_mb"] for x in loads), 1),
        "import_only_rss_mb": round(base["peak_rss_mb"], 1),
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "command": "python benchmarks/readers.py " + " ".join(sys.argv[1:]),
    }
    rows = [("files", result["files"]), ("lines (pairs loaded)", f"{result['lines']:,}"),
            ("annotation size", f"{result['annotation_mb']:,} MB"),
            ("load time (best / worst)", f"{result['load_seconds_best']} s / {result['load_seconds_worst']} s"),
            ("load CPU time (best)", f"{result['load_cpu_seconds_best']} s"),
            ("peak RSS of the loading process", f"{result['peak_rss_mb']:,} MB"),
            ("peak RSS after `import tpas.data` only", f"{result['import_only_rss_mb']:,} MB")]
    table = "| PAB train annotations | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    print(table)
    results = REPO / "benchmarks" / "results"
    write_json(results / "readers.json", result)
    write_text(results / "readers.md", f"# PAB reader benchmark\n\n`{result['command']}` "
               f"(Python {result['python']}, {result['machine']}; wall time varies with other jobs "
               f"on the shared machine, CPU time hardly does)\n\n{table}\n")
    print(f"saved {results / 'readers.json'} and {results / 'readers.md'}")


if __name__ == "__main__":
    main()
