"""``tpas models``: list the named model configs, or describe one model (config + parameters)."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "models", help="list model names, or show one model's config and parameter counts",
        description="Without NAME: list every name create_model() accepts, with a description. "
                    "With NAME (a named config or a directory written by save_pretrained): build it and "
                    "print its config and parameter counts (pretrained towers are read from installed packages).")
    p.add_argument("name", nargs="?", help="named config or saved model directory to describe")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tpas.models.registry import describe_models

    if args.name is None:
        described = describe_models()
        if args.json:
            print(json.dumps(described, indent=2))
        else:
            width = max(len(n) for n in described)
            for name, text in described.items():
                print(f"{name:<{width}}  {text}")
        return 0
    print(json.dumps(describe_model(args.name), indent=None if args.json else 2))
    return 0


def describe_model(name_or_dir: str) -> dict:
    """Build one model and return its family, config, input size and parameter counts."""
    from tpas.models import create_model
    from tpas.models.base import parameter_counts

    model = create_model(name_or_dir, device="cpu")
    config = model.config.to_dict()
    config.pop("clip_config", None)  # long; saved in config.json anyway
    return {"name": str(name_or_dir), "family": model.family, "image_size": list(model.image_size),
            "parameters": parameter_counts(model), "config": config}
