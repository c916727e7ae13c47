"""Command-line flags generated from config dataclasses, so every option is written once.

* :func:`add_dataclass_args` adds ``--field-name`` for each field of a dataclass, with the help
  text of :func:`help_field` and the type of the annotation. A nested dataclass field adds its
  fields under a prefix (``--ppo.lr``) in an argument group of its own; :func:`nested` declares
  one, and names the fields its parent sets itself (they get no flag).
* :func:`dataclass_from_args` builds the config back from the parsed namespace, running each
  ``__post_init__`` validation; :func:`parse_config` does both for one argv.
* :func:`to_argv` is the inverse: the flags that rebuild a config in a child process.

One boolean style everywhere: ``--flag`` alone or ``--flag true`` sets it, ``--flag false``
clears it (also 1/0, yes/no, on/off).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Sequence

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def help_field(default=dataclasses.MISSING, help: str = "", choices=None, **kwargs):  # noqa: A002
    """``dataclasses.field`` with a one-line help text (and optional choices) for the CLI."""
    metadata = {"help": help}
    if choices is not None:
        metadata["choices"] = choices
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def nested(cls, help: str = "", set_by_parent: Sequence[str] = (), flat: bool = False):  # noqa: A002
    """A nested config field (flags ``--name.field``; with ``flat``, ``--field``: a group of
    settings several configs share under the same flags). ``set_by_parent``: fields of ``cls`` the
    parent's ``__post_init__`` sets from its own settings; they get no flag of their own."""
    return dataclasses.field(default_factory=cls, metadata={"help": help, "set_by_parent": tuple(set_by_parent),
                                                            "flat": flat})


def parse_bool(text: str | bool) -> bool:
    """``true/false``, ``1/0``, ``yes/no``, ``on/off`` (any case) as a bool.

    Raises:
        argparse.ArgumentTypeError: anything else.
    """
    if isinstance(text, bool):
        return text
    lowered = text.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _scalar_type(annotation):
    """The argparse ``type`` for a field annotation (``int | None`` → int, ``bool`` → bool)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _scalar_type(args[0]) if len(args) == 1 else str
    return annotation if annotation in (int, float, str, bool) else str


def _fields(cls, skip: Sequence[str] = ()):
    """``(field, annotation)`` of the init fields of ``cls`` that have flags."""
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.init and f.name not in skip]


def _default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def _flag(prefix: str, name: str) -> str:
    return "--" + prefix + name.replace("_", "-")


def _dest(prefix: str, name: str) -> str:
    return (prefix + name).replace("-", "_").replace(".", "__")


def _inner(prefix: str, field: dataclasses.Field) -> tuple[str, tuple[str, ...]]:
    """``(prefix, skip)`` of a nested config field's own fields: ``prefix + "name."`` (``prefix``
    for a flat one) and the fields its parent sets (no flag)."""
    inner = prefix if field.metadata.get("flat") else prefix + field.name.replace("_", "-") + "."
    return inner, field.metadata.get("set_by_parent", ())


def add_dataclass_args(parser: argparse.ArgumentParser, cls, prefix: str = "", skip: Sequence[str] = (),
                       group=None) -> None:
    """Add one ``--flag`` per field of dataclass ``cls``, recursing into nested dataclasses."""
    target = group or parser
    for field, annotation in _fields(cls, skip):
        if dataclasses.is_dataclass(annotation):
            inner, inner_skip = _inner(prefix, field)
            title = f"{field.name if field.metadata.get('flat') else inner[:-1]} ({annotation.__name__})"
            sub = parser.add_argument_group(title, field.metadata.get("help") or annotation.__doc__.split("\n")[0])
            add_dataclass_args(parser, annotation, inner, inner_skip, sub)
            continue
        kind = _scalar_type(annotation)
        default = _default(field)
        help_text = field.metadata.get("help", "")
        help_text = f"{help_text} (default: {default})" if help_text else f"default: {default}"
        choices = field.metadata.get("choices")
        extra = {"nargs": "?", "const": True} if kind is bool else {}  # `--flag` alone means true
        target.add_argument(
            _flag(prefix, field.name),
            **extra,
            dest=_dest(prefix, field.name),
            type=parse_bool if kind is bool else kind,
            default=default,
            choices=choices,
            help=help_text.replace("%", "%%"),
            metavar=None if choices else ("BOOL" if kind is bool else field.name.upper()),
        )


def flag_names(cls, prefix: str = "", skip: Sequence[str] = ()) -> list[str]:
    """Every flag :func:`add_dataclass_args` adds for ``cls`` (``["--lr", "--lora.r", ...]``)."""
    names: list[str] = []
    for field, annotation in _fields(cls, skip):
        if dataclasses.is_dataclass(annotation):
            names += flag_names(annotation, *_inner(prefix, field))
        else:
            names.append(_flag(prefix, field.name))
    return names


def dataclass_from_args(cls, namespace: argparse.Namespace, prefix: str = "", skip: Sequence[str] = ()):
    """Build ``cls`` from the parsed ``namespace`` (inverse of :func:`add_dataclass_args`).

    Raises:
        ValueError: whatever a ``__post_init__`` validation raises.
    """
    values = {}
    for field, annotation in _fields(cls, skip):
        if dataclasses.is_dataclass(annotation):
            values[field.name] = dataclass_from_args(annotation, namespace, *_inner(prefix, field))
            continue
        dest = _dest(prefix, field.name)
        if hasattr(namespace, dest):
            values[field.name] = getattr(namespace, dest)
    return cls(**values)


def parse_config(cls, argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None):
    """Parse ``argv`` into a ``cls`` with a parser generated from it (or ``parser``, with the
    flags of ``cls`` added); a validation error exits as a usage error (code 2)."""
    parser = parser or argparse.ArgumentParser(description=(cls.__doc__ or "").split("\n")[0])
    add_dataclass_args(parser, cls)
    args = parser.parse_args(argv)
    try:
        return dataclass_from_args(cls, args)
    except ValueError as exc:
        parser.error(str(exc))


def to_argv(config, prefix: str = "", skip: Sequence[str] = ()) -> list[str]:
    """The flags that rebuild ``config`` through :func:`dataclass_from_args`: one ``--flag
    value`` per field that differs from its default (nested configs included).

    Raises:
        ValueError: a field holds a value a flag cannot carry (a list, None).
    """
    argv: list[str] = []
    for field, annotation in _fields(type(config), skip):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(annotation):
            argv += to_argv(value, *_inner(prefix, field))
            continue
        if value == _default(field):
            continue
        if not isinstance(value, (str, int, float)):  # bool is an int
            raise ValueError(f"{_flag(prefix, field.name)}: {value!r} has no flag form (str, int, float or bool only)")
        text = ("true" if value else "false") if isinstance(value, bool) else str(value)
        argv.append(f"{_flag(prefix, field.name)}={text}")  # "=": a value may start with "-"
    return argv
