"""CLI subcommands. Each module defines ``register(subparsers)``; the work lives in library functions."""

# name of the module under tpas.commands for each group of subcommands, in help order
MODULES = ["data", "synth", "train", "search", "evaluate", "serve", "demo", "models"]
