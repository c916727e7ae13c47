"""CLI flags generated from config dataclasses, so every option is written once.

``add_dataclass_args(parser, MyConfig)`` adds ``--field-name`` for each field, with the help text
taken from the field's ``metadata["help"]`` (or its trailing comment-free name) and the type from
the annotation; nested dataclass fields get a prefix (``--ppo.lr``).
``dataclass_from_args(MyConfig, namespace)`` builds the config back, running its validation.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing


def _scalar_type(annotation):
    """The argparse ``type`` for a field annotation (``int | None`` → int, ``bool`` → bool)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return _scalar_type(args[0])
        return str
    return annotation if annotation in (int, float, str, bool) else str


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def add_dataclass_args(parser: argparse.ArgumentParser, cls, prefix: str = "") -> None:
    """Add one ``--flag`` per field of dataclass ``cls`` (recursing into nested dataclasses)."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        ftype = hints[field.name]
        name = prefix + field.name.replace("_", "-")
        if dataclasses.is_dataclass(ftype):
            add_dataclass_args(parser, ftype, prefix=name + ".")
            continue
        kind = _scalar_type(ftype)
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            default = None
        help_text = field.metadata.get("help", "")
        help_text = f"{help_text} (default: {default})" if help_text else f"default: {default}"
        choices = field.metadata.get("choices")
        extra = {"nargs": "?", "const": True} if kind is bool else {}  # `--flag` alone means true
        parser.add_argument(
            "--" + name,
            **extra,
            dest=(prefix + field.name).replace("-", "_"),
            type=_parse_bool if kind is bool else kind,
            default=default,
            choices=choices,
            help=help_text,
            metavar=None if choices else ("BOOL" if kind is bool else name.split(".")[-1].upper().replace("-", "_")),
        )


def dataclass_from_args(cls, namespace: argparse.Namespace, prefix: str = ""):
    """Build ``cls`` from the parsed ``namespace`` (inverse of :func:`add_dataclass_args`).

    Raises:
        ValueError: whatever the dataclass's ``__post_init__`` validation raises.
    """
    hints = typing.get_type_hints(cls)
    values = {}
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        ftype = hints[field.name]
        key = prefix + field.name
        if dataclasses.is_dataclass(ftype):
            values[field.name] = dataclass_from_args(ftype, namespace, prefix=key.replace("_", "-") + ".")
            continue
        dest = key.replace("-", "_")
        if hasattr(namespace, dest):
            values[field.name] = getattr(namespace, dest)
    return cls(**values)


def help_field(default=dataclasses.MISSING, help: str = "", choices=None, **kwargs):  # noqa: A002
    """``dataclasses.field`` with a one-line help text (and optional choices) for the CLI."""
    metadata = {"help": help}
    if choices is not None:
        metadata["choices"] = choices
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)
