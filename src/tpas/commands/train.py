"""``tpas train --config NAME|FILE.yaml [key=value ...] [--resume] [--out DIR]``."""

from __future__ import annotations

import argparse

from tpas.commands import add_bad_image_argument


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="fine-tune a model (ITC + ITM with hard negatives); resumable, multi-GPU via accelerate",
        description="Fine-tune a model with ITC + ITM. Runs single-process on CPU, or on several GPUs/nodes "
                    "under `accelerate launch -m tpas.cli train ...`. Writes <out>/best and <out>/last "
                    "(load them with create_model), checkpoints, log.jsonl.")
    p.add_argument("--config", "-c", required=True, help="run config: a shipped config's name (minipab-lite, pab-xvlm, cuhk-xvlm) "
                                                           "or a YAML file")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. train.lr=1e-4 train.epochs=2 data.root=data/mini-pab")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the run dir")
    p.add_argument("--out", help="run directory (default: train.out, else runs/<config name>)")
    p.add_argument("--device", choices=("auto", "cpu"), help="auto = GPUs when present (the default), cpu = force the CPU "
                                                           "(same as train.device=cpu)")
    add_bad_image_argument(p, default=None)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tpas.config import load_config
    from tpas.train.loop import train

    overrides = list(args.overrides)
    if args.out:
        overrides.append(f"train.out={args.out}")
    if args.device:
        overrides.append(f"train.device={args.device}")
    if args.on_bad_image:
        overrides.append(f"data.on_bad_image={args.on_bad_image}")
    config = load_config(args.config, overrides)
    out = train(config, resume=args.resume)
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(f"run directory: {out}")
        for name in ("best", "last", "log.jsonl", "checkpoints"):
            if (out / name).exists():
                print(f"  {name}: {out / name}")
    return 0
