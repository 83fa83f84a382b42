"""Training throughput (samples/s) and peak memory of one ITC+ITM(+hard pairs) train step.

CPU (default): lite at its default input, batch 32, the freezing of src/tpas/configs/minipab-lite.yaml.
GPU (``--gpu``): xvlm-base, bf16 autocast, batch 22, 224 px (the per-GPU share of the published
PAB recipe's global batch 88 on 4 GPUs).

Inputs are synthetic (random pixels, real captions tokenised by the model), so the figure is
the model + loss cost without image decoding; the data pipeline is measured by the real runs
(benchmarks/minipab_train.py reports their samples/s).

    .venv/bin/python benchmarks/train_speed.py                       # lite on CPU
    .venv/bin/python benchmarks/train_speed.py --gpu                 # xvlm-base bf16 on a GPU
    .venv/bin/python benchmarks/train_speed.py --model xvlm-base --batch 22 --image-size 224 224 \
        --steps 1 --warmup 0 --threads 1 --flops                      # FLOPs of the GPU step, counted on a CPU

``measure_train_step`` is the measurement; ``benchmarks/gpu_check.py`` calls it too.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import torch

__all__ = ["main", "make_batch", "measure_train_step", "peak_rss_mib"]

CAPTIONS = [
    "A young man in a black jacket and blue jeans is walking along the sidewalk carrying a backpack.",
    "A woman with long hair, wearing a red coat and white shoes, suddenly falls to the ground.",
    "A man in a grey hoodie is climbing over the fence next to the parking lot at night.",
    "An old man wearing a brown hat and dark trousers is standing still near the bus stop.",
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="xvlm-base, bf16, batch 22, 224 px on cuda")
    p.add_argument("--model", default=None, help="model name (default lite, or xvlm-base with --gpu)")
    p.add_argument("--checkpoint", default=None, help="weights file for the model (optional)")
    p.add_argument("--batch", type=int, default=None, help="per-step batch (default 32 CPU, 22 GPU)")
    p.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("H", "W"))
    p.add_argument("--steps", type=int, default=6, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--train-text-layers", type=int, default=None, help="lite: top text layers that train")
    p.add_argument("--train-image-blocks", type=int, default=None, help="lite: top image blocks that train")
    p.add_argument("--no-hard-pairs", action="store_true", help="skip the PAB hard-pair ITM negatives")
    p.add_argument("--flops", action="store_true", help="count the FLOPs of one step too (always with --gpu)")
    p.add_argument("--out", default="benchmarks/results", help="folder for the JSON/markdown result")
    return p.parse_args(argv)


def peak_rss_mib() -> float:
    """Peak resident memory of this process (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def make_batch(model, batch: int, device, hard: bool) -> dict[str, torch.Tensor]:
    h, w = model.image_size
    texts = [CAPTIONS[i % len(CAPTIONS)] + f" number {i}" for i in range(batch)]
    ids, mask = model.tokenize(texts)
    out = {"images": torch.randn(batch, 3, h, w), "input_ids": ids, "attention_mask": mask,
           "labels": torch.arange(batch), "index": torch.arange(batch)}
    if hard:  # every pair has its opposite-behaviour partner, as in PAB
        out["hard_rows"] = torch.arange(batch)
        out["hard_images"] = torch.randn(batch, 3, h, w)
        out["hard_input_ids"], out["hard_attention_mask"] = model.tokenize(texts[::-1])
    return {k: v.to(device) for k, v in out.items()}


def measure_train_step(model, batch: int, dtype: torch.dtype | None, hard: bool = True, steps: int = 6,
                       warmup: int = 2, count_flops: bool = False) -> dict:
    """Time ``steps`` optimiser steps (ITC + ITM, with hard pairs when ``hard``) after ``warmup`` ones.

    Runs where ``model`` is, with ``dtype`` autocast (None = off). Peak memory is the CUDA
    allocator's over the timed steps (optimizer state included), or the process's peak RSS on a
    CPU. ``count_flops`` runs one more step under ``FlopCounterMode`` (matmuls, convolutions and
    attention, forward and backward) so that callers can compute the model FLOP utilisation.
    """
    from tpas.config import LossSection
    from tpas.train.loop import TrainStep
    from tpas.train.optim import build_optimizer

    device = model.device
    cuda = device.type == "cuda"
    step_module = TrainStep(model, LossSection(itc=1.0, itm=1.0, itm_hard_pairs=hard)).train()
    opt = build_optimizer(model, 1e-4, 0.01)
    data = make_batch(model, batch, device, hard)

    def one_step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = step_module(data)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        one_step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        one_step()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    result = {"batch": batch, "steps": steps, "seconds_per_step": seconds / steps, "samples_per_s": batch * steps / seconds,
              "peak_memory_MiB": torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss_mib(),
              "memory_kind": "cuda max_memory_allocated" if cuda else "process peak RSS"}
    if count_flops:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            one_step()
        result["flops_per_step"] = counter.get_total_flops()
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    from tpas.models import create_model

    torch.set_num_threads(args.threads)
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu: no CUDA device here")
    device = torch.device("cuda" if args.gpu else "cpu")
    name = args.model or ("xvlm-base" if args.gpu else "lite")
    batch = args.batch or (22 if args.gpu else 32)
    overrides = {}
    if args.image_size:
        overrides["image_size"] = tuple(args.image_size)
    elif args.gpu:
        overrides["image_size"] = (224, 224)
    torch.manual_seed(0)
    model = create_model(name, checkpoint=args.checkpoint, device=device, **overrides)
    text_layers, image_blocks = args.train_text_layers, args.train_image_blocks
    if not args.gpu and name == "lite" and text_layers is None and image_blocks is None:
        text_layers, image_blocks = 2, 4  # what src/tpas/configs/minipab-lite.yaml trains
    if hasattr(model, "set_trainable") and (text_layers is not None or image_blocks is not None):
        model.set_trainable(-1 if text_layers is None else text_layers, -1 if image_blocks is None else image_blocks)
    dtype = torch.bfloat16 if args.gpu else None
    speed = measure_train_step(model, batch, dtype, hard=not args.no_hard_pairs, steps=args.steps,
                               warmup=args.warmup, count_flops=args.gpu or args.flops)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result = {
        "model": name, "device": torch.cuda.get_device_name() if args.gpu else f"cpu x{args.threads} threads",
        "precision": "bf16" if args.gpu else "fp32", "batch": batch, "image_size": list(model.image_size),
        "hard_pairs": not args.no_hard_pairs, "trainable_params_M": round(n_train / 1e6, 2),
        "steps": args.steps, "seconds_per_step": round(speed["seconds_per_step"], 3),
        "samples_per_s": round(speed["samples_per_s"], 2), "peak_memory_MiB": round(speed["peak_memory_MiB"], 1),
        "memory_kind": speed["memory_kind"],
        **({"tflop_per_step": round(speed["flops_per_step"] / 1e12, 4)} if "flops_per_step" in speed else {}),
        "torch": torch.__version__, "python": platform.python_version(),
        "load_average": [round(x, 2) for x in __import__("os").getloadavg()],  # the machine may be shared
    }
    flops = "tflop_per_step" in result
    header = ("| model | device | precision | batch | image | hard pairs | trainable M | s/step | samples/s | peak MiB |"
              + (" TFLOP/step |" if flops else ""))
    row = (f"| {name} | {result['device']} | {result['precision']} | {batch} | {result['image_size'][0]}x"
           f"{result['image_size'][1]} | {result['hard_pairs']} | {result['trainable_params_M']} | "
           f"{result['seconds_per_step']} | {result['samples_per_s']} | {result['peak_memory_MiB']} |"
           + (f" {result['tflop_per_step']} |" if flops else ""))
    table = "\n".join([header, "|" + "---|" * (11 if flops else 10), row])
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = (f"train_speed_{'gpu' if args.gpu else 'cpu'}_{name}_b{batch}"
            f"{'' if args.gpu else f'_t{args.threads}'}{'_hard' if result['hard_pairs'] else ''}")
    from tpas.utils.io import write_json, write_text

    write_json(out / f"{stem}.json", result)
    write_text(out / f"{stem}.md", f"# Train step speed\n\n`{' '.join(['benchmarks/train_speed.py', *sys.argv[1:]])}`\n\n"
               f"{table}\n")
    print(f"wrote {out / stem}.json and .md")
    return result


if __name__ == "__main__":
    main()
