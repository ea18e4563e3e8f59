"""Argument groups shared by subcommands: model, data and run-directory options."""

from __future__ import annotations

import argparse
import json

from mechsafe.errors import MechsafeError


def add_model_args(parser: argparse.ArgumentParser, processing: str = "none") -> None:
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="model spec: smollm2-135m-instruct, smollm2-135m-aligned (built on first use), a TransformerLens name, a local HF dir, "
                             "a .gguf file or a mechsafe checkpoint (default: %(default)s)")
    parser.add_argument("--processing", default=processing, choices=("none", "fold"),
                        help="weight processing at load time (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")


def add_data_args(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument("--data", required=required,
                        help="bundled suite name, hub dataset name, or local .jsonl/.csv/.parquet file")
    parser.add_argument("--text-column", help="text column of a local file or hub dataset")
    parser.add_argument("--label-column", help="label column of a local file or hub dataset")
    parser.add_argument("--label-map", help='JSON object mapping raw labels to classes, e.g. \'{"unsafe": 1, "safe": 0}\'; '
                                            "rows with other labels are dropped")
    parser.add_argument("--group-column", help="column used as the group (for out-of-distribution splits)")


def data_kwargs(args: argparse.Namespace) -> dict:
    """Keyword arguments for ``mechsafe.data.load`` from parsed data options."""
    kwargs = {}
    for opt in ("text_column", "label_column", "group_column"):
        if getattr(args, opt, None):
            kwargs[opt] = getattr(args, opt)
    if getattr(args, "label_map", None):
        try:
            mapping = json.loads(args.label_map)
        except json.JSONDecodeError as exc:
            raise MechsafeError(f"--label-map is not valid JSON ({exc.msg}); write e.g. '{{\"unsafe\": 1, \"safe\": 0}}'") from None
        if not isinstance(mapping, dict) or not mapping:
            raise MechsafeError("--label-map must be a non-empty JSON object")
        kwargs["label_map"] = mapping
    return kwargs


def add_runs_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs-dir", default="runs", help="folder for run directories (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
