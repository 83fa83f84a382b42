"""What the training pre-flight image check costs, next to decoding every image (``tpas check-data``).

Generates a mini-PAB (cached in the system temp dir), then times, in this process:

* reading the training annotations alone (``load_train``, images not looked at);
* the same read with the pre-flight check (``check_images=True``: open + two small reads per file,
  each file once although PAB's hard pairs refer to every image twice);
* a full PIL decode of every training image (what ``check-data`` does, and what the pre-flight
  deliberately does not do before training).

Each is run five times and the fastest (warm page cache) run is reported: a cold disk adds its random-read
latency per file to the pre-flight, which this script cannot measure without dropping the caches.

    .venv/bin/python benchmarks/preflight.py [--identities 1000]

Prints a table and saves benchmarks/results/preflight.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

from common import RESULTS, save_results  # noqa: E402  (puts src/ on the path)

from tpas.data.datasets import load_train  # noqa: E402
from tpas.data.images import decode_problem  # noqa: E402


def dataset(identities: int) -> Path:
    from tpas.data.synth.writer import generate

    root = Path(tempfile.gettempdir()) / f"tpas-preflight-minipab-{identities}"
    if not (root / "minipab.json").is_file():
        generate(root, identities, seed=0, workers=min(4, os.cpu_count() or 1))
    return root


def timed(fn, repeat: int = 5) -> float:
    """The fastest of ``repeat`` runs (the first warms the page cache; the machine may be shared)."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--identities", type=int, default=1000)
    args = parser.parse_args()
    root = dataset(args.identities)
    train = load_train(root, "pab")
    images = sorted({p.image for p in train.pairs} | {p.hard_image for p in train.pairs if p.hard_image})
    read = timed(lambda: load_train(root, "pab"))
    checked = timed(lambda: load_train(root, "pab", check_images=True))
    decoded = timed(lambda: [decode_problem(root / rel) for rel in images])
    n = len(images)
    data = {"identities": args.identities, "pairs": len(train.pairs), "images": n,
            "read_s": round(read, 4), "read_and_preflight_s": round(checked, 4), "full_decode_s": round(decoded, 4),
            "preflight_us_per_image": round((checked - read) / n * 1e6, 1),
            "decode_us_per_image": round(decoded / n * 1e6, 1),
            "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
    table = (f"# Pre-flight image check vs full decode ({data['pairs']} training pairs, {n} images, warm cache)\n\n"
             "| step | seconds | per image |\n|---|---|---|\n"
             f"| read annotations | {read:.3f} | |\n"
             f"| read + pre-flight check | {checked:.3f} | {data['preflight_us_per_image']} µs (the check) |\n"
             f"| full decode of every image | {decoded:.3f} | {data['decode_us_per_image']} µs |\n\n"
             f"`.venv/bin/python benchmarks/preflight.py --identities {args.identities}`; "
             f"{data['cpus']} CPUs, single thread.\n")
    print(table)
    save_results(RESULTS / "preflight", data, table)


if __name__ == "__main__":
    main()
