"""Config dataclasses -> argparse options, so every knob is defined once (with its comment as the help)."""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import typing


def _comments(cls) -> dict[str, str]:
    """The help of each field: the trailing `# comment` of its line in the dataclass source, with the comment-only
    lines below it whose `#` stands in the same column (its continuation) joined on. Base classes are read first,
    so a field that a subclass restates without a comment (a new default) keeps its base's help."""
    found: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            found |= _own_comments(klass)
    return found


def _own_comments(cls) -> dict[str, str]:
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    found, last, column = {}, None, -1
    for line in source.splitlines():
        field = re.match(r"\s+(\w+)\s*:[^#]*#\s*(.*)$", line)
        if field:
            last, column = field.group(1), line.index("#")
            found[last] = field.group(2).strip()
        elif last is not None and line[:column].isspace() and line[column:column + 1] == "#":
            found[last] += " " + line[column + 1:].strip()
        else:
            last = None
    return found


def _parser_type(annotation):
    """argparse type for a field annotation: int, float, str, bool, tuples of ints, and their Optionals."""
    if annotation in (tuple, typing.Tuple) or typing.get_origin(annotation) is tuple:
        return lambda text: tuple(float(x) if "." in x else int(x) for x in text.split(","))
    return annotation


def add_config_options(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = (),
                       overrides: tuple[str, ...] | None = None) -> None:
    """One --option per dataclass field, defaulting to the field's default. With `overrides`, only the fields it
    names, each unset by default, to change a config read from elsewhere (see `override_config`)."""
    comments, hints = _comments(cls), typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or (overrides is not None and f.name not in overrides):
            continue
        flag = "--" + f.name.replace("_", "-")
        default = None if overrides is not None else \
            f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind = hints[f.name]
        optional = [a for a in typing.get_args(kind) if a is not type(None)]
        if type(None) in typing.get_args(kind) and len(optional) == 1:
            kind = optional[0]  # Optional[X]: parse as X, default None
        help_text = f"{comments.get(f.name, '')} (default: {'unchanged' if overrides is not None else default})"
        help_text = help_text.replace("%", "%%")  # argparse formats help with %: a comment's "16%" must stay text
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                                help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=_parser_type(kind), default=default, help=help_text)


def config_from_args(cls, args: argparse.Namespace, **overrides):
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**(values | overrides))


def override_config(config, args: argparse.Namespace, overrides: tuple[str, ...]):
    """`config` with each of the `overrides` fields that was set on the command line replaced."""
    return dataclasses.replace(config, **{name: getattr(args, name) for name in overrides
                                          if getattr(args, name) is not None})
