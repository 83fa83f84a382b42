"""Load test of the search server: N concurrent clients x M queries, with and without ITM re-ranking.

The server runs as a separate process (``tpas serve``) so the clients do not share its GIL. The
gallery is a folder of generated 256x128 pedestrian-sized images (content does not change search
cost), indexed once with the chosen model and reused on later runs. Server variants
(``--variants RUNTIME/MAX_BATCH ...``) run one after the other in the same invocation, so before
and after are measured side by side under the same machine load (reported at start and end).

The clients speak minimal HTTP/1.1 over one keep-alive connection each (plain asyncio streams):
a full HTTP client library costs about as much CPU per request as the server's work, and on a
2-core machine the clients share the cores with the server.

    .venv/bin/python benchmarks/serve_load.py                       # 10,000 images, lite, torch/16 vs auto/64
    .venv/bin/python benchmarks/serve_load.py --images 500 --model lite-tiny --clients 4 --queries 10
    .venv/bin/python benchmarks/serve_load.py --variants torch/1 --out benchmarks/results/serve_load_nobatch

Prints a table and saves benchmarks/results/serve_load.{json,md}. Any error fails the run (exit 1).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

COLOURS = ["black", "white", "red", "blue", "green", "grey", "yellow", "brown", "pink", "purple", "orange"]
CLOTHES = ["jacket", "coat", "t-shirt", "shirt", "dress", "hoodie", "sweater"]
LOWER = ["jeans", "trousers", "shorts", "skirt", "leggings"]
ACTIONS = ["is walking", "is running", "falls down", "is fighting", "rides a bicycle", "is standing",
           "climbs over a fence", "is carrying a bag", "throws something", "is talking on the phone"]


def make_images(folder: Path, n: int, seed: int = 0) -> None:
    """Write ``n`` cheap pedestrian-shaped JPEGs (a body of colour blocks on a noisy background)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    existing = len(list(folder.glob("*.jpg")))
    if existing >= n:
        return
    rng = np.random.default_rng(seed)
    from tqdm import tqdm

    for i in tqdm(range(n), desc="images", unit="img"):
        path = folder / f"{i:05d}.jpg"
        if path.exists():
            continue
        img = rng.integers(60, 200, size=(256, 128, 3), dtype=np.uint8)
        img[:] = (img.astype(np.int16) // 4 + rng.integers(40, 160, size=3)).clip(0, 255).astype(np.uint8)
        top, legs = rng.integers(0, 255, size=3), rng.integers(0, 255, size=3)
        x0 = int(rng.integers(30, 50))
        img[30:60, x0 + 15:x0 + 45] = rng.integers(150, 230, size=3)  # head
        img[60:150, x0:x0 + 60] = top
        img[150:240, x0 + 5:x0 + 55] = legs
        Image.fromarray(img).save(path, quality=85)


def build(images: Path, index: Path, model_name: str) -> Path:
    """Index ``images`` with ``model_name``; the model is saved next to the index so the server loads the same weights."""
    import torch

    from tpas.models import create_model
    from tpas.search.index import build_index, gallery_from_folder
    from tpas.search.runtime import with_runtime

    model_dir = index.parent / f"{index.name}-model"
    if (index / "meta.json").is_file() and (model_dir / "config.json").is_file():
        return model_dir
    torch.manual_seed(0)
    model = create_model(model_name).eval()
    model.save_pretrained(model_dir)
    model = create_model(model_dir).eval()
    build_index(with_runtime(model, "auto"), gallery_from_folder(images), images, index, overwrite=True, workers=1,
                token_codec="int8")
    return model_dir


def queries(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        out.append(f"a person in a {rng.choice(COLOURS)} {rng.choice(CLOTHES)} and {rng.choice(COLOURS)} "
                   f"{rng.choice(LOWER)} {rng.choice(ACTIONS)}")
    return out


def start_server(index: Path, model_dir: Path, threads: int, max_batch: int,
                 runtime: str) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "tpas.cli", "serve", "--index", str(index), "--model", str(model_dir),
           "--port", "0", "--max-batch", str(max_batch), "--runtime", runtime]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + 300
    assert proc.stdout is not None
    for line in proc.stdout:
        match = re.search(r"(http://\S+/)", line)
        if match:
            break
        if time.monotonic() > deadline:
            break
    else:
        raise RuntimeError("server exited before announcing its address")
    url = match.group(1)
    import httpx

    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not become healthy")


async def get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target: str) -> tuple[int, bytes]:
    """One GET on a kept-alive connection: (status, body)."""
    writer.write(f"GET {target} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    length = re.search(rb"(?i)content-length:\s*(\d+)", head)
    body = await reader.readexactly(int(length.group(1))) if length else b""
    return int(head.split(b" ", 2)[1]), body


async def run_load(url: str, texts: list[str], clients: int, per_client: int, k: int, rerank: int) -> dict:
    from urllib.parse import urlencode, urlsplit

    host, port = urlsplit(url).hostname, urlsplit(url).port
    latencies: list[float] = []
    server_ms: list[float] = []
    batches: list[int] = []
    errors: list[str] = []

    async def client(c: int) -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            for j in range(per_client):
                text = texts[(c * per_client + j) % len(texts)]
                target = "/api/search?" + urlencode({"q": text, "k": k, "rerank": rerank})
                t0 = time.perf_counter()
                try:
                    status, raw = await get(reader, writer, target)
                    elapsed = (time.perf_counter() - t0) * 1000
                    if status != 200:
                        errors.append(f"HTTP {status}: {raw[:200]!r}")
                        continue
                    body = json.loads(raw)
                    if len(body["results"]) != k:
                        errors.append(f"expected {k} results, got {len(body['results'])}")
                        continue
                    latencies.append(elapsed)
                    server_ms.append(body["search_ms"])
                    batches.append(body.get("batch", 1))
                except Exception as exc:  # every failure counts, none is hidden
                    errors.append(f"{type(exc).__name__}: {exc}")
                    reader, writer = await asyncio.open_connection(host, port)
        finally:
            writer.close()

    reader, writer = await asyncio.open_connection(host, port)
    await get(reader, writer, "/api/search?" + urlencode({"q": "warm up", "k": k, "rerank": rerank}))
    writer.close()
    t0 = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(clients)))
    wall = time.perf_counter() - t0
    lat = np.array(latencies) if latencies else np.zeros(1)
    return {
        "rerank": rerank, "k": k, "clients": clients, "queries_per_client": per_client,
        "requests": clients * per_client, "ok": len(latencies), "errors": len(errors), "error_samples": errors[:5],
        "wall_s": round(wall, 2), "throughput_qps": round(len(latencies) / wall, 2),
        "p50_ms": round(float(np.percentile(lat, 50)), 1), "p90_ms": round(float(np.percentile(lat, 90)), 1),
        "p99_ms": round(float(np.percentile(lat, 99)), 1), "max_ms": round(float(lat.max()), 1),
        "model_ms_p50": round(float(np.percentile(server_ms or [0], 50)), 1),
        "batch_mean": round(float(np.mean(batches or [1])), 2),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=10_000, help="gallery size (default 10000)")
    ap.add_argument("--model", default="lite", help="named model or model directory to index with (default lite, "
                                                     "untrained weights: search cost does not depend on training)")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "serve_load", help="where images and index go")
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--queries", type=int, default=100, help="queries per client")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--rerank", type=int, nargs="+", default=[0, 16], help="re-rank depths to test (0 = ITC only)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in the server")
    ap.add_argument("--variants", nargs="+", default=["torch/16", "auto/64"],
                    help="server variants RUNTIME/MAX_BATCH run one after the other (runtime: torch, onnx, "
                         "onnx-int8, auto; max batch 1 = one query per model call); default torch/16 auto/64")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "serve_load")
    args = ap.parse_args()

    from common import save_results

    images = args.work / f"images-{args.images}"
    index = args.work / f"index-{args.images}-{Path(args.model).name}"
    t0 = time.perf_counter()
    make_images(images, args.images)
    model_dir = build(images, index, args.model)
    print(f"gallery ready: {args.images} images, index {index} ({time.perf_counter() - t0:.0f} s)")

    rows = []
    load_start = os.getloadavg()
    texts = queries(args.clients * args.queries, seed=1)
    for variant in args.variants:
        runtime, max_batch = variant.split("/")
        proc, url = start_server(index, model_dir, args.threads, int(max_batch), runtime)
        try:
            for rerank in args.rerank:
                row = {"runtime": runtime, "max_batch": int(max_batch),
                       **asyncio.run(run_load(url, texts, args.clients, args.queries, args.k, rerank))}
                rows.append(row)
                print(f"{variant} rerank={rerank}: {row['ok']}/{row['requests']} ok, {row['errors']} errors, "
                      f"p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms, {row['throughput_qps']} q/s")
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    setup = {"images": args.images, "model": args.model, "clients": args.clients, "queries_per_client": args.queries,
             "k": args.k, "server_threads": args.threads, "variants": args.variants, "cpus": os.cpu_count(),
             "machine": platform.machine(), "python": platform.python_version(),
             "load_avg_at_start": [round(x, 2) for x in load_start],
             "load_avg_at_end": [round(x, 2) for x in os.getloadavg()], "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    lines = [f"# serve load: {args.clients} clients x {args.queries} queries, {args.images}-image index ({args.model})",
             "", f"setup: {json.dumps(setup)}", "",
             "| runtime | max batch | re-rank | requests | errors | p50 ms | p90 ms | p99 ms | max ms | throughput q/s "
             "| model call ms (p50) | batch (mean) | load (1 min) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['runtime']} | {r['max_batch']} | {r['rerank'] or 'off'} | {r['requests']} | {r['errors']} | "
                     f"{r['p50_ms']} | {r['p90_ms']} | {r['p99_ms']} | {r['max_ms']} | {r['throughput_qps']} | "
                     f"{r['model_ms_p50']} | {r['batch_mean']} | {r['load_avg_1m']} |")
    table = "\n".join(lines) + "\n"
    print(table)
    save_results(args.out, {"setup": setup, "rows": rows}, table)
    return 0 if all(r["errors"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
