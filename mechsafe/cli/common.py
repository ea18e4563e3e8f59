"""Argument groups shared by subcommands: model, data and run-directory options, and flags generated from config
dataclasses (one flag per field, its help the docstring under the field)."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import re
import types
import typing
from typing import Callable, Iterable

from mechsafe.errors import MechsafeError


def add_model_args(parser: argparse.ArgumentParser, processing: str = "none") -> None:
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="model spec: smollm2-135m-instruct, smollm2-135m-aligned (built on first use), a TransformerLens name, a local HF dir, "
                             "a .gguf file or a mechsafe checkpoint (default: %(default)s)")
    parser.add_argument("--processing", default=processing, choices=("none", "fold"),
                        help="weight processing at load time (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")


def add_held_out_args(parser: argparse.ArgumentParser) -> None:
    """``--harmful``/``--harmless`` (held-out prompt sets) and their ``--*-text-column``."""
    for kind in ("harmful", "harmless"):
        parser.add_argument(f"--{kind}", default=kind, help=f"held-out {kind} prompts: a bundled suite (its test split), "
                                                            "a hub dataset or a local .jsonl/.csv/.parquet file "
                                                            "(default: %(default)s)")
        parser.add_argument(f"--{kind}-text-column", metavar="COLUMN",
                            help=f"text column of the {kind} file (default: text)")


def load_held_out(args: argparse.Namespace) -> dict[str, tuple[list[str], str]]:
    """``{"harmful": (texts, where), "harmless": (texts, where)}`` from :func:`add_held_out_args`'s options."""
    from mechsafe.data import load_texts

    return {kind: load_texts(getattr(args, kind), "test", getattr(args, f"{kind}_text_column"))
            for kind in ("harmful", "harmless")}


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


def field_docs(cls: type) -> dict[str, str]:
    """The documentation of each field of a config dataclass: the string under the field in the class body."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    return {node.target.id: " ".join(str(nxt.value.value).split())
            for node, nxt in zip(body, body[1:])
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)}


def base_type(tp) -> type:
    """``int`` for ``int``, ``str`` for ``str | None``, ``list`` for ``list[float]``..."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return base_type(args[0]) if len(args) == 1 else str
    return origin or tp


def _plain(doc: str | None) -> str:
    """A field docstring without reST markup, for ``--help``."""
    doc = re.sub(r":\w+:`([^`]+)`", r"\1", doc or "")
    return doc.replace("``", "").replace("%", "%%")


def add_config_flags(parser, cls: type, skip: Iterable[str] = (), dest: Callable[[str], str] = lambda name: name) -> None:
    """One flag per field of config dataclass ``cls`` (``--field-name``; ``--flag/--no-flag`` for booleans), with the
    field's docstring as its help. Flags not given stay absent from the parsed namespace (``argparse.SUPPRESS``), so
    only what the user wrote overrides a preset; the config's own validation converts and checks the values."""
    docs, hints = field_docs(cls), typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag, kind = "--" + f.name.replace("_", "-"), base_type(hints[f.name])
        if kind is bool:
            parser.add_argument(flag, dest=dest(f.name), action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=_plain(docs.get(f.name)))
        else:
            parser.add_argument(flag, dest=dest(f.name), default=argparse.SUPPRESS, metavar=f.name.upper(),
                                help=_plain(docs.get(f.name)) + (" (comma list)" if kind in (list, tuple) else ""))


def _value(text: str, tp, flag: str):
    """A flag's text as the field type ``tp`` (``none``/``null`` for an optional field gives ``None``)."""
    if text.lower() in ("none", "null") and type(None) in typing.get_args(tp):
        return None
    kind = base_type(tp)
    if kind in (list, tuple):
        args = [a for a in typing.get_args(tp) if a is not type(None) and a is not Ellipsis]
        item = base_type(typing.get_args(args[0])[0]) if args and typing.get_args(args[0]) else str
        return kind(_value(part.strip(), item, flag) for part in text.split(",") if part.strip())
    if kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            raise MechsafeError(f"{flag} expects {'an integer' if kind is int else 'a number'}, got {text!r}") from None
    return text


def config_values(cls: type, args: argparse.Namespace, dest: Callable[[str], str] = lambda name: name) -> dict:
    """The fields of config dataclass ``cls`` that flags from :func:`add_config_flags` set, converted to their types."""
    hints, out = typing.get_type_hints(cls), {}
    for f in dataclasses.fields(cls):
        if dest(f.name) in vars(args):
            value = getattr(args, dest(f.name))
            out[f.name] = value if not isinstance(value, str) else _value(value, hints[f.name],
                                                                          "--" + f.name.replace("_", "-"))
    return out
