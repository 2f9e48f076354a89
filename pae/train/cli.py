"""Command line for :func:`pae.train.run`: one flag per :class:`TrainConfig` field.

    python experiments/train.py --model resnet20 --dataset cifar10 --epochs 200 --schedule step \
        --milestones 100 150 --learning-rate 0.1
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import typing

from pae.train.loop import TrainConfig, run


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train a pae model; writes runs/<name>/.")
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        default = field.default if field.default is not dataclasses.MISSING else None
        hint = hints[field.name]
        if field.name == "model_kwargs":
            parser.add_argument(flag, type=json.loads, default={},
                                help='JSON object of model keyword arguments, e.g. \'{"dropout": 0.3}\'')
        elif field.name == "milestones":
            parser.add_argument(flag, type=int, nargs="*", default=())
        elif hint in (bool, bool | None):
            parser.add_argument(flag, type=_parse_bool, default=default)
        elif hint in (str | None,):
            parser.add_argument(flag, type=str, default=default)
        else:
            parser.add_argument(flag, type=hint, default=default)
    parser.add_argument("--workdir", default=None, help="default: runs/<name>")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv=None) -> dict:
    args = vars(build_parser().parse_args(argv))
    workdir, progress = args.pop("workdir"), not args.pop("no_progress")
    args["milestones"] = tuple(args["milestones"])
    result = run(TrainConfig(**args), workdir=workdir, progress=progress)
    print(json.dumps({"workdir": result.workdir, "num_params": result.num_params, **result.final},
                     indent=2))
    return result.final


if __name__ == "__main__":
    main()
