"""Training throughput (samples/s) and peak memory of one ITC+ITM(+hard pairs) train step.

CPU (default): lite at its default input, batch 32, the freezing of configs/minipab-lite.yaml.
GPU (``--gpu``): xvlm-base, bf16 autocast, batch 22, 224 px (the per-GPU share of the published
PAB recipe's global batch 88 on 4 GPUs).

Inputs are synthetic (random pixels, real captions tokenised by the model), so the figure is
the model + loss cost without image decoding; the data pipeline is measured by the real runs
(benchmarks/minipab_train.py reports their samples/s).

    .venv/bin/python benchmarks/train_speed.py                       # lite on CPU
    .venv/bin/python benchmarks/train_speed.py --gpu                 # xvlm-base bf16 on a GPU
    .venv/bin/python benchmarks/train_speed.py --compare             # before vs after, side by side

``--compare`` times the original lite step (``lite-v1``: the 2-layer random fusion over the
stride-32 grid, pixels and ids encoded every step, top 2 text layers / 4 image blocks training,
3 ITM pairs per sample) against the current one (``lite`` as ``configs/minipab-lite.yaml``
trains it: frozen tower bottoms read from a feature cache, cached-path step, in-batch partner
pairs) in one process, alternating a step of each so that load from other jobs on a shared
machine hits both alike; it reports the median seconds per step of each. Neither side decodes
JPEGs (the old trainer spent a data-worker core on that too, which favours "before").
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

CAPTIONS = [  # mini-PAB-length captions (~55 WordPiece tokens): the fusion's cost grows with the length
    "An individual dressed in a bright red long-sleeve top, royal blue trousers, white running shoes and a beige "
    "cap is sitting on a bench in an indoor hall. The person is lanky with brown skin and chestnut hair pulled "
    "back in a ponytail, with a bright green purse.",
    "In this picture a lanky pedestrian with brown skin and chestnut hair tied in a ponytail is collapsing to the "
    "ground inside a large hall, wearing a scarlet long-sleeve top, royal blue pants, white running shoes and a "
    "beige baseball cap, carrying a bright green purse.",
    "The image shows a dark-skinned pedestrian scaling a fence along an urban street. This pedestrian is "
    "broad-shouldered, has a bald head and has on a violet shirt with long sleeves, bright green long pants, "
    "open sandals and a bright red knitted hat, with eyeglasses.",
    "A young man in a black jacket and blue jeans is walking along the sidewalk carrying a backpack, wearing "
    "white sneakers and a grey cap; he has short black hair, light skin and a slim build, and no glasses.",
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
    p.add_argument("--cached", action="store_true", help="train from cached frozen features (lite)")
    p.add_argument("--compare", action="store_true", help="lite-v1 per-step encoding vs lite from the cache, "
                   "interleaved (see the module doc)")
    p.add_argument("--config", default="configs/minipab-lite.yaml", help="--compare: the 'after' config")
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


def make_cached_batch(model, batch: int) -> dict[str, torch.Tensor]:
    """What the trainer's CachedCollator yields: frozen features of random pixels and real captions,
    with adjacent rows as each other's opposite-behaviour partner (grouped PAB batches)."""
    from tpas.train.cache import IMAGE_PREFIX, TEXT_PREFIX

    h, w = model.image_size
    texts = [CAPTIONS[i % len(CAPTIONS)] + f" number {i}" for i in range(batch)]
    ids, mask = model.tokenize(texts)
    model.eval()
    with torch.no_grad():
        img = model.frozen_image_features(torch.randn(batch, 3, h, w))
        txt = model.frozen_text_features(ids, mask)
    out = {"attention_mask": mask, "labels": torch.arange(batch), "index": torch.arange(batch),
           "partner": torch.arange(batch) ^ 1}
    out.update({IMAGE_PREFIX + k: v.half().float() for k, v in img.items()})
    out.update({TEXT_PREFIX + k: v.half().float() if v.is_floating_point() else v for k, v in txt.items()})
    return out


def compare(args) -> dict:
    """Median s/step of the 'before' and 'after' train steps, interleaved step by step."""
    from tpas.config import load_config
    from tpas.models import create_model
    from tpas.train.loop import TrainStep
    from tpas.train.optim import build_optimizer

    torch.set_num_threads(args.threads)
    batch = args.batch or 32
    cfg = load_config(args.config)
    sides = {}
    torch.manual_seed(0)
    before = create_model("lite-v1")
    before.set_trainable(2, 4)
    sides["before"] = (before, TrainStep(before, type(cfg.loss)(itc=1.0, itm=1.0, itm_hard_pairs=False)),
                       make_batch(before, batch, "cpu", hard=False),
                       "lite-v1, pixels + ids every step, text 2 / image 4 blocks train, 3 ITM pairs per sample")
    after = create_model(cfg.model.name, **cfg.model.options)
    after.set_trainable(cfg.model.train_text_layers, cfg.model.train_image_blocks)
    sides["after"] = (after, TrainStep(after, cfg.loss), make_cached_batch(after, batch),
                      f"{cfg.model.name} from cached frozen features, text {cfg.model.train_text_layers} / image "
                      f"{cfg.model.train_image_blocks} blocks train, ITM + partner pairs ({args.config})")
    opts = {name: build_optimizer(m, 1e-4, 0.01) for name, (m, *_rest) in sides.items()}
    times: dict[str, list[float]] = {name: [] for name in sides}
    cpu: dict[str, list[float]] = {name: [] for name in sides}  # process CPU seconds: robust to other jobs
    for k in range(args.warmup + args.steps):
        for name, (model, step_module, data, _) in sides.items():
            step_module.train()
            t0, c0 = time.perf_counter(), time.process_time()
            step_module(data)["loss"].backward()
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
            if k >= args.warmup:
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    import statistics

    rows = {}
    for name, (model, _, _, what) in sides.items():
        med = statistics.median(times[name])
        cpu_med = statistics.median(cpu[name])
        rows[name] = {"what": what, "seconds_per_step": round(med, 3), "samples_per_s": round(batch / med, 2),
                      "cpu_seconds_per_step": round(cpu_med, 3),
                      "all_seconds": [round(t, 3) for t in times[name]],
                      "trainable_params_M": round(sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6, 2)}
    speedup = rows["before"]["seconds_per_step"] / rows["after"]["seconds_per_step"]
    cpu_speedup = rows["before"]["cpu_seconds_per_step"] / rows["after"]["cpu_seconds_per_step"]
    result = {"batch": batch, "threads": args.threads, "steps": args.steps, "speedup": round(speedup, 2),
              "cpu_time_speedup": round(cpu_speedup, 2),
              "rows": rows, "torch": torch.__version__, "load_average": [round(x, 2) for x in __import__("os").getloadavg()]}
    lines = ["| step | what | trainable M | median s/step (batch %d) | samples/s | CPU s/step |" % batch,
             "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['what']} | {r['trainable_params_M']} | {r['seconds_per_step']} | "
                     f"{r['samples_per_s']} | {r['cpu_seconds_per_step']} |")
    table = "\n".join(lines) + f"\n\nspeed-up: **{speedup:.2f}x** wall, {cpu_speedup:.2f}x process CPU time " \
                                f"({args.threads} threads, {args.steps} interleaved steps each, " \
                                f"load average {result['load_average']})\n"
    print(table)
    from tpas.utils.io import save_results

    cmd = " ".join(["benchmarks/train_speed.py", *sys.argv[1:]])
    save_results(Path(args.out) / f"train_speed_compare_t{args.threads}", result,
                 f"# Train step speed: before vs after\n\n`{cmd}`\n\n{table}")
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.compare:
        return compare(args)
    from tpas.config import LossSection
    from tpas.models import create_model
    from tpas.train.loop import TrainStep
    from tpas.train.optim import build_optimizer

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
    model = create_model(name, checkpoint=args.checkpoint, **overrides)
    text_layers, image_blocks = args.train_text_layers, args.train_image_blocks
    if not args.gpu and name == "lite" and text_layers is None and image_blocks is None:
        text_layers, image_blocks = 2, 4  # what configs/minipab-lite.yaml trains
    if hasattr(model, "set_trainable") and (text_layers is not None or image_blocks is not None):
        model.set_trainable(-1 if text_layers is None else text_layers, -1 if image_blocks is None else image_blocks)
    model.to(device)
    step_module = TrainStep(model, LossSection(itc=1.0, itm=1.0, itm_hard_pairs=not args.no_hard_pairs))
    opt = build_optimizer(model, 1e-4, 0.01)
    data = make_cached_batch(model, batch) if args.cached else make_batch(model, batch, device,
                                                                          hard=not args.no_hard_pairs)
    dtype = torch.bfloat16 if args.gpu else None
    step_module.train()

    def one_step() -> float:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = step_module(data)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    for _ in range(args.warmup):
        one_step()
    if args.gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        one_step()
    if args.gpu:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result = {
        "model": name, "device": torch.cuda.get_device_name() if args.gpu else f"cpu x{args.threads} threads",
        "precision": "bf16" if args.gpu else "fp32", "batch": batch, "image_size": list(model.image_size),
        "hard_pairs": not args.no_hard_pairs, "trainable_params_M": round(n_train / 1e6, 2),
        "steps": args.steps, "seconds_per_step": round(seconds / args.steps, 3),
        "samples_per_s": round(batch * args.steps / seconds, 2),
        "peak_memory_MiB": round(torch.cuda.max_memory_allocated() / 2**20 if args.gpu else peak_rss_mib(), 1),
        "memory_kind": "cuda max_memory_allocated" if args.gpu else "process peak RSS",
        "torch": torch.__version__, "python": platform.python_version(),
        "load_average": [round(x, 2) for x in __import__("os").getloadavg()],  # the machine may be shared
    }
    header = "| model | device | precision | batch | image | hard pairs | trainable M | s/step | samples/s | peak MiB |"
    row = (f"| {name} | {result['device']} | {result['precision']} | {batch} | {result['image_size'][0]}x"
           f"{result['image_size'][1]} | {result['hard_pairs']} | {result['trainable_params_M']} | "
           f"{result['seconds_per_step']} | {result['samples_per_s']} | {result['peak_memory_MiB']} |")
    table = "\n".join([header, "|" + "---|" * 10, row])
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
