"""What choosing PAB's pairs costs: every strategy on a million synthetic pairs, and the full-PAB bill.

1. **random, balanced, end to end.** A synthetic PAB annotation folder of ``--pairs`` training
   lines (people of two pairs each, PAB's fields, captions of PAB's length; no images: ``tpas
   select`` never opens them) is written once, then ``tpas select`` runs on it as a user would
   (a subprocess: reading the JSON lines, selecting, writing ids.txt and the PAB-format subset).
2. **diverse, hard on embeddings.** Synthetic ITC embeddings of the same number of pairs
   (``--dim`` per tower, clustered: people share appearance, behaviours shift it) go straight
   into ``tpas.search.coreset.select_pairs``: the selection cost once a model has embedded them.
3. **encoding.** lite on this CPU is measured on a few mini-PAB images and captions; a GPU rate
   is *not* measured here (no GPU in this session): ``--gpu-images-per-s`` and
   ``--gpu-texts-per-s`` are stated assumptions, printed as such, to be replaced by the GPU
   check's figures.

The extrapolation to PAB's 1,013,605 pairs is linear in the pairs for random, balanced and hard,
and quadratic for diverse at a fixed fraction (pairs x centers).

    python benchmarks/select_speed.py --work /work/data/select-speed --sizes 0.01 0.1 0.25
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import REPO, RESULTS, save_results

PAB_PAIRS = 1_013_605
WORDS = ("person wearing a red jacket blue jeans white shoes black backpack short hair walking along the "
         "street near a parked car holding a phone in the left hand while looking at the shop window").split()


def write_synthetic_pab(root: Path, pairs: int, seed: int = 0, per_file: int = 13_600) -> Path:
    """PAB's training layout with ``pairs`` lines (two per person), PAB-like labels and caption lengths.

    Label vocabularies are assumptions (PAB's are not published as counts): 60 normal and 90
    anomalous actions, 40 scenes, drawn with Zipf-like weights so that ``balanced`` has work to do.
    """
    done = root / "annotation" / "train" / "complete.json"
    if done.is_file() and json.loads(done.read_text()).get("pairs") == pairs:
        return root
    rng = random.Random(seed)
    normal = [f"normal action {i}" for i in range(60)]
    anomaly = [f"anomalous action {i}" for i in range(90)]
    scenes = [f"scene {i}" for i in range(40)]

    def zipf(values: list[str]) -> list[float]:
        return [1 / (i + 1) ** 0.8 for i in range(len(values))]

    def caption() -> str:
        return " ".join(rng.choices(WORDS, k=rng.randint(30, 55))) + "."

    folder = root / "annotation" / "train"
    folder.mkdir(parents=True, exist_ok=True)
    people = pairs // 2
    weights = (zipf(normal), zipf(anomaly), zipf(scenes))
    for f, start in enumerate(range(0, people, per_file // 2)):
        lines = []
        for p in range(start, min(people, start + per_file // 2)):
            n_action = rng.choices(normal, weights[0])[0]
            a_action = rng.choices(anomaly, weights[1])[0]
            scene = rng.choices(scenes, weights[2])[0]
            caps = (caption(), caption())
            j = 2 * (p - start)
            for b in (0, 1):
                lines.append(json.dumps({
                    "image": f"train/imgs_{f}/{'goal' if b == 0 else 'full'}/{p}.jpg", "caption": caps[b],
                    "image_id": f"{f}_{j + b}", "hard_i": f"imgs_{f}/{'full' if b == 0 else 'goal'}/{p}.jpg",
                    "hard_c": caps[1 - b], "hard_i_id": f"{f}_{j + 1 - b}", "source_id": f"{p}_{2 * b}",
                    "source_caption": "a person did something",
                    ("normal" if b == 0 else "anomaly"): n_action if b == 0 else a_action, "scene": scene}))
        (folder / f"attr_{f}.json").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "train").mkdir(exist_ok=True)
    done.write_text(json.dumps({"pairs": pairs}))
    return root


def cli_select(root: Path, out: Path, strategy: str, size: float) -> dict:
    """``tpas select`` in a subprocess: wall seconds, peak RSS and the command's own timings."""
    command = [sys.executable, "-m", "tpas.cli", "select", str(root), "--out", str(out), "--strategy", strategy,
               "--size", f"{size:g}"]
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", *command], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"tpas select failed:\n{proc.stderr[-2000:]}")
    summary = json.loads((out / "selection.json").read_text())
    return {"strategy": strategy, "size": size, "pairs_in": summary["candidates"], "pairs_out": summary["pairs"],
            "wall_s": round(wall, 1), "peak_rss_gib": round(int(proc.stderr.strip().splitlines()[-1]) / 2**20, 2),
            "steps_s": summary["seconds"], "command": "tpas select ROOT --out OUT " + " ".join(command[7:])}


def synthetic_embeddings(pairs: int, dim: int, seed: int = 0):
    """Clustered unit vectors: 5,000 looks, each person a noisy look, behaviours a shared offset."""
    from tpas.search.coreset import PairEmbeddings

    rng = np.random.default_rng(seed)
    people = pairs // 2
    looks = rng.standard_normal((5000, dim), dtype=np.float32)
    behaviour = rng.standard_normal((2, dim), dtype=np.float32)
    person = looks[rng.integers(0, 5000, people)] + 0.7 * rng.standard_normal((people, dim), dtype=np.float32)
    image = np.repeat(person, 2, axis=0) + np.tile(behaviour, (people, 1))
    image += 0.3 * rng.standard_normal(image.shape, dtype=np.float32)
    text = image + 0.8 * rng.standard_normal(image.shape, dtype=np.float32)
    for a in (image, text):
        a /= np.linalg.norm(a, axis=1, keepdims=True)
    rows = np.arange(2 * people)
    return PairEmbeddings(image=image, image_row=rows, text=text, partner_row=rows ^ 1)


def model_select(emb, strategy: str, size: float, **options) -> dict:
    from tpas.data.records import ImageText
    from tpas.search.coreset import select_pairs

    pairs = [ImageText(image="", caption="", image_id=str(i), person_id=str(i), hard_image_id=str(i ^ 1))
             for i in range(len(emb))]
    start = time.perf_counter()
    selection = select_pairs(pairs, strategy, size, embeddings=emb, progress=False, **options)
    seconds = time.perf_counter() - start
    return {"strategy": strategy if not options.get("mix") else f"hard+diverse (mix {options['mix']})",
            "size": size, "pairs_in": len(emb), "pairs_out": selection.pairs, "seconds": round(seconds, 1),
            "pairs_per_s": round(len(emb) / seconds), "settings": selection.settings}


def encoding_rates(data: Path, images: int, texts: int) -> dict:
    """lite on this CPU: images/s and captions/s (measured), 1 torch thread as the CPU configs use."""
    import torch

    from tpas.data.datasets import load_train
    from tpas.models import create_model
    from tpas.search.encode import encode_images, encode_texts

    torch.set_num_threads(1)
    pairs = load_train(data, "pab").pairs
    model = create_model("lite", device="cpu")
    paths = [data / p.image for p in pairs[:images]]
    captions = [p.caption for p in pairs[:texts]]
    encode_images(model, paths[:8], progress=False)  # warm-up
    start = time.perf_counter()
    encode_images(model, paths, batch_size=64, progress=False)
    image_s = time.perf_counter() - start
    start = time.perf_counter()
    encode_texts(model, captions, batch_size=128, progress=False)
    text_s = time.perf_counter() - start
    return {"model": "lite (192x96, MiniLM-L6)", "threads": 1, "images": len(paths), "texts": len(captions),
            "images_per_s": round(len(paths) / image_s, 1), "texts_per_s": round(len(captions) / text_s, 1)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="scratch folder for the synthetic annotation and selections")
    p.add_argument("--pairs", type=int, default=1_000_000)
    p.add_argument("--sizes", type=float, nargs="+", default=[0.01, 0.1, 0.25])
    p.add_argument("--diverse-sizes", type=float, nargs="+", help="sizes for diverse (default: --sizes)")
    p.add_argument("--dim", type=int, default=256, help="ITC embedding width per tower (X-VLM, lite: 256)")
    p.add_argument("--dims", type=int, default=64, help="diverse: PCA dimensions")
    p.add_argument("--data", default="/work/data/minipab-1000-s0", help="mini-PAB root for the encoding rates")
    p.add_argument("--gpu-images-per-s", type=float, default=1000.0,
                   help="ASSUMED image encoding rate on one GPU (X-VLM base, 224 px, bf16); not measured here")
    p.add_argument("--gpu-texts-per-s", type=float, default=10000.0, help="ASSUMED caption rate on one GPU")
    p.add_argument("--skip", nargs="*", default=[], choices=("cli", "embeddings", "encoding"))
    p.add_argument("--name", default="", help="results file suffix")
    return p.parse_args(argv)


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def main(argv=None) -> dict:
    args = parse_args(argv)
    work = Path(args.work)
    scale = PAB_PAIRS / args.pairs
    result: dict = {"pairs": args.pairs, "load_average_start": os.getloadavg(), "cpus": os.cpu_count()}
    rows = []
    if "cli" not in args.skip:
        start = time.perf_counter()
        root = write_synthetic_pab(work / "pab-synthetic", args.pairs)
        print(f"synthetic annotation ready ({time.perf_counter() - start:.0f} s)", flush=True)
        for strategy in ("random", "balanced"):
            for size in args.sizes:
                row = cli_select(root, work / f"sel-{strategy}-{size:g}", strategy, size)
                row["pairs_per_s"] = round(row["pairs_in"] / row["wall_s"])
                row["pab_s"] = round(row["wall_s"] * scale, 1)
                rows.append(row)
                print(json.dumps(row), flush=True)
    if "embeddings" not in args.skip:
        emb = synthetic_embeddings(args.pairs, args.dim)
        plans = [("hard", s, {}) for s in args.sizes]
        plans += [("hard", min(args.sizes), {"mix": 0.5, "dims": args.dims})]
        plans += [("diverse", s, {"dims": args.dims}) for s in (args.diverse_sizes or args.sizes)]
        for strategy, size, options in plans:
            row = model_select(emb, strategy, size, **options)
            quadratic = strategy == "diverse" or options.get("mix")
            row["pab_s"] = round(row["seconds"] * (scale ** 2 if quadratic else scale), 1)
            row["wall_s"] = row["seconds"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    result["rows"] = rows
    if "encoding" not in args.skip:
        result["cpu_encoding"] = encoding_rates(Path(args.data), 256, 2048)
        print(json.dumps(result["cpu_encoding"]), flush=True)
    result["gpu_assumed"] = {"images_per_s": args.gpu_images_per_s, "texts_per_s": args.gpu_texts_per_s}
    result["load_average_end"] = os.getloadavg()
    command = " ".join(["python", Path(sys.argv[0]).as_posix(), *sys.argv[1:]]) if argv is None else " ".join(argv)
    result["command"] = command

    lines = ["# Selection cost at PAB scale", "", f"`{command}`", "",
             f"{args.pairs:,} synthetic pairs on {os.cpu_count()} shared CPU cores; load average "
             f"{result['load_average_start'][0]:.1f} at the start, {result['load_average_end'][0]:.1f} at the end. "
             "random/balanced: `tpas select` end to end (read the JSON lines, select, write ids.txt and the PAB "
             "subset); hard/diverse: the selection on embeddings already computed (section 2 of the docstring). "
             f"PAB column: scaled to {PAB_PAIRS:,} pairs (linear; diverse quadratic).", "",
             "| strategy | size | pairs chosen | seconds | pairs/s | peak RSS GiB | at PAB scale |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['strategy']} | {r['size']:g} | {r['pairs_out']:,} | {r['wall_s']:.1f} | "
                     f"{r['pairs_in'] / r['wall_s']:,.0f} | {r.get('peak_rss_gib', '')} | {hours(r['pab_s'])} |")
    if "cpu_encoding" in result:
        enc, gpu = result["cpu_encoding"], result["gpu_assumed"]
        cpu_s = PAB_PAIRS / enc["images_per_s"] + PAB_PAIRS / enc["texts_per_s"]
        gpu_s = PAB_PAIRS / gpu["images_per_s"] + PAB_PAIRS / gpu["texts_per_s"]
        result["pab_encoding_s"] = {"cpu_lite_measured_rate": round(cpu_s), "gpu_assumed_rate": round(gpu_s)}
        lines += ["", "Encoding every PAB image and caption once (diverse and hard only):", "",
                  f"- measured here: lite on 1 CPU thread, {enc['images_per_s']} images/s and {enc['texts_per_s']} "
                  f"captions/s -> {hours(cpu_s)} for PAB;",
                  f"- **assumed, not measured**: one GPU at {gpu['images_per_s']:g} images/s and "
                  f"{gpu['texts_per_s']:g} captions/s -> {hours(gpu_s)} for PAB (sharded over k GPUs with "
                  "`accelerate launch`: images / k). Replace with the GPU check's figures."]
    lines.append("")
    markdown = "\n".join(lines)
    print(markdown)
    save_results(RESULTS / ("select_speed" + (f"_{args.name}" if args.name else "")), result, markdown)
    return result


if __name__ == "__main__":
    main()
