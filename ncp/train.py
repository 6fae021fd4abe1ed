"""Command line for `ncp.trainer`: train a LoRA with NCP-DPO (or any of the six methods) on preference Parquet.

    python -m ncp.train --model models/shapes --data data/snapshot.parquet --out adapters/v7 --max-steps 200
    accelerate launch --multi_gpu --num_processes 2 -m ncp.train --model ... --data ... --out ...

The second line runs 2 processes (DDP): on 2 GPUs, or on a machine without a GPU as 2 CPU processes (gloo); the
trainer asks accelerate for a CPU process group when no GPU exists. Note: with accelerate 1.15, `accelerate launch
--cpu --num_processes 2` starts ONE process (its simple launcher ignores --num_processes without MPI).

`--data` takes a snapshot folder of `feedback_store.export` (only its train.parquet is read; add --include-eval to
read eval.parquet too), Parquet file(s), a folder of shards, or a `datasets` folder (`save_to_disk`). The data is read
and checked before the model is loaded; unusable data (a missing column, a column of the wrong type, an empty or
non-Parquet file, images that do not decode, no strict preference pair) stops with one line naming the file, the
problem and the fix.

Every `TrainConfig` field is an option (`python -m ncp.train --help`). The only place in `ncp` that reads the
environment: `NCP_LOG_LEVEL` (default INFO), and accelerate's launch variables (a warning when `accelerate launch
--num_processes N` started one process). Exit status: 0 done, 2 unusable data, a TrainingError (e.g. non-finite loss;
the message says what to change; no adapter written), an invalid option or a missing/existing path, 1 any other
failure.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import typing
from collections.abc import Mapping, Sequence

import torch

from ncp.data import DataError
from ncp.train_config import TrainConfig
from ncp.trainer import TrainingError, train

logger = logging.getLogger("ncp.train")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    """An argparse parser generated from TrainConfig's fields (type, default, Literal choices, help metadata)."""
    parser = argparse.ArgumentParser(
        prog="python -m ncp.train",
        description="Train a LoRA on Pick-a-Pic v2 style preference pairs (METHOD.md: dpo/cpo/sft x latent/ncp).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model", required=True, help="diffusers pipeline folder (SDXL, SD1.5, shapes) or cached hub id"
    )
    parser.add_argument(
        "--data",
        required=True,
        nargs="+",
        help="snapshot folder (its train.parquet), Parquet file(s), folder(s) of shards or a datasets folder",
    )
    parser.add_argument(
        "--include-eval", action="store_true", help="also train on a snapshot folder's eval.parquet (held-out split)"
    )
    parser.add_argument("--out", required=True, help="new folder for the adapter + metrics.json (must not exist)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--no-progress-bar", action="store_true", help="hide the tqdm bar")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        kind, help_text = hints[f.name], f.metadata["help"]
        if kind is bool:
            parser.add_argument(
                _flag(f.name), action=argparse.BooleanOptionalAction, default=f.default, help=help_text
            )
        elif typing.get_origin(kind) is typing.Literal:
            parser.add_argument(_flag(f.name), choices=typing.get_args(kind), default=f.default, help=help_text)
        elif typing.get_origin(kind) is tuple:
            parser.add_argument(_flag(f.name), nargs="+", default=list(f.default), help=help_text)
        else:
            parser.add_argument(_flag(f.name), type=kind, default=f.default, help=help_text)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})


def launch_warning(env: Mapping[str, str]) -> str | None:
    """A warning when `accelerate launch --num_processes N` (N > 1) started a single process: its simple launcher (no
    --multi_gpu) sets MASTER_ADDR for the N processes but starts one, on the CPU, with no process group."""
    if "ACCELERATE_USE_CPU" in env and "MASTER_ADDR" in env and "WORLD_SIZE" not in env:
        return (
            "accelerate launch was asked for several processes but started ONE (without --multi_gpu its simple "
            "launcher ignores --num_processes); add --multi_gpu: it starts them on GPUs, or as CPU processes "
            "(gloo) on a machine without one."
        )
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("NCP_LOG_LEVEL", "INFO").upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    warning = launch_warning(os.environ)
    if warning:
        logger.warning(warning)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        config = config_from_args(args)
    except ValueError as err:
        logger.error("Invalid option: %s", err)
        return 2
    try:
        result = train(
            config,
            model=args.model,
            data=args.data,
            out=args.out,
            show_progress=not args.no_progress_bar,
            include_eval=args.include_eval,
        )
    except DataError as err:
        logger.error("Unusable training data: %s", err)
        return 2
    except (TrainingError, FileExistsError, FileNotFoundError) as err:
        logger.error("Training failed: %s", err)
        return 2
    if result.metrics:
        logger.info("Done: %d step(s), final %s -> %s", result.steps, result.metrics["final"], result.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
