"""Train-step speed before and after the fast lite, side by side in one process.

* before: ``lite-v1`` as the demo trained it until issue 11: the random 2-layer fusion over the
  stride-32 grid, pixels and token ids encoded every step, the top 2 text layers and 4 image
  blocks training, ITM on 3 pairs per sample (positive + 2 sampled negatives) plus the PAB hard pairs;
* after: the shipped ``minipab-lite`` config: frozen towers read from the feature cache
  (:mod:`tpas.train.cache`), only the heads, the stride-16 token projections and the [CLS]-query
  fusion training, in-batch partner pairs as ITM negatives.

Steps alternate (one before, one after, ...), so load from other jobs on a shared machine hits
both alike; the figure is the median seconds per step of each, and process CPU seconds too. The
cache itself is a one-off cost per run (``benchmarks/results/lite_ablation.md`` lists it per row).

    .venv/bin/python benchmarks/train_speed_compare.py [--threads 2] [--batch 32] [--steps 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from common import RESULTS, save_results

from train_speed import make_batch

__all__ = ["compare", "make_cached_batch", "main"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=32, help="samples per step, both sides")
    p.add_argument("--steps", type=int, default=8, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
    p.add_argument("--config", default="minipab-lite", help="the 'after' training config")
    return p.parse_args(argv)


def make_cached_batch(model, batch: int) -> dict[str, torch.Tensor]:
    """What the trainer's cached collator yields: frozen features (random pixels, real captions), with
    rows 2i and 2i+1 each other's opposite-behaviour partner, as in grouped PAB batches."""
    from tpas.train.cache import IMAGE_PREFIX, TEXT_PREFIX

    example = make_batch(model, batch, "cpu", hard=False)
    model.eval()
    with torch.no_grad():
        image = model.frozen_image_features(example["images"])
        text = model.frozen_text_features(example["input_ids"], example["attention_mask"])
    out = {"attention_mask": example["attention_mask"], "labels": example["labels"], "index": example["index"],
           "partner": torch.arange(batch) ^ 1}
    out.update({IMAGE_PREFIX + k: v.half().float() for k, v in image.items()})  # the cache stores float16
    out.update({TEXT_PREFIX + k: v.half().float() if v.is_floating_point() else v for k, v in text.items()})
    return out


def compare(threads: int, batch: int, steps: int, warmup: int, config_name: str) -> dict:
    from tpas.config import LossSection, load_config
    from tpas.models import create_model
    from tpas.train.loop import TrainStep
    from tpas.train.optim import build_optimizer

    torch.set_num_threads(threads)
    cfg = load_config(config_name)
    torch.manual_seed(0)
    before = create_model("lite-v1")
    before.set_trainable(2, 4)
    after = create_model(cfg.model.name, **cfg.model.options)
    after.set_trainable(cfg.model.train_text_layers, cfg.model.train_image_blocks)
    sides = {
        "before": (before, TrainStep(before, LossSection(itc=1.0, itm=1.0, itm_hard_pairs=True)),
                   make_batch(before, batch, "cpu", hard=True),
                   "lite-v1: pixels + ids every step, text 2 / image 4 blocks train, 3 ITM pairs per sample + hard pairs"),
        "after": (after, TrainStep(after, cfg.loss), make_cached_batch(after, batch),
                  f"{config_name}: cached frozen towers (text {cfg.model.train_text_layers} / image "
                  f"{cfg.model.train_image_blocks} blocks train), [CLS]-query fusion, in-batch partner pairs"),
    }
    optimizers = {name: build_optimizer(model, 1e-4, 0.01) for name, (model, *_) in sides.items()}
    wall: dict[str, list[float]] = {name: [] for name in sides}
    cpu: dict[str, list[float]] = {name: [] for name in sides}
    for k in range(warmup + steps):
        for name, (_, step, data, _) in sides.items():
            step.train()
            t0, c0 = time.perf_counter(), time.process_time()
            step(data)["loss"].backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            if k >= warmup:
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    rows = {}
    for name, (model, _, _, what) in sides.items():
        seconds = statistics.median(wall[name])
        rows[name] = {"what": what, "seconds_per_step": round(seconds, 3), "samples_per_s": round(batch / seconds, 2),
                      "cpu_seconds_per_step": round(statistics.median(cpu[name]), 3),
                      "trainable_params_M": round(sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6, 2)}
    return {"batch": batch, "threads": threads, "steps": steps, "config": config_name,
            "speedup": round(rows["before"]["seconds_per_step"] / rows["after"]["seconds_per_step"], 2),
            "cpu_speedup": round(rows["before"]["cpu_seconds_per_step"] / rows["after"]["cpu_seconds_per_step"], 2),
            "rows": rows, "torch": torch.__version__, "load_average": [round(x, 2) for x in os.getloadavg()]}


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = compare(args.threads, args.batch, args.steps, args.warmup, args.config)
    lines = [f"| step | what | trainable M | median s/step (batch {args.batch}) | samples/s | CPU s/step |",
             "|---|---|---|---|---|---|"]
    for name, r in result["rows"].items():
        lines.append(f"| {name} | {r['what']} | {r['trainable_params_M']} | {r['seconds_per_step']} | "
                     f"{r['samples_per_s']} | {r['cpu_seconds_per_step']} |")
    table = "\n".join(lines) + (f"\n\nspeed-up: **{result['speedup']:.2f}x** wall, {result['cpu_speedup']:.2f}x "
                                f"process CPU ({args.threads} threads, {args.steps} interleaved steps each, load "
                                f"average {result['load_average']})\n")
    print(table)
    command = " ".join(["benchmarks/train_speed_compare.py", *(sys.argv[1:] if argv is None else argv)])
    save_results(RESULTS / f"train_speed_compare_t{args.threads}", result,
                 f"# Train step speed: before vs after\n\n`{command}`\n\n{table}")
    return result


if __name__ == "__main__":
    main()
