"""Command-line options made from the stage settings: a setting is declared once.

Every field of a stage's pydantic section (:mod:`wsimil.config`) becomes an option of that
stage's command, with the field's description as help, its type (numbers, choices for
``Literal``, ``--x/--no-x`` for booleans, ``a,b,c`` for lists) and ``None`` as the default, so
an option the user does not give leaves the config file's value alone. Adding a setting is
one edit (the field) plus its use.
"""

from __future__ import annotations

import functools
import types
import typing

import click
from pydantic import BaseModel

from .config import cli_flag


class _IntList(click.ParamType):
    name = "N,N,..."

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        try:
            return [int(v) for v in str(value).split(",") if v.strip()]
        except ValueError:
            self.fail(f"{value!r}: expected comma-separated integers, e.g. 256,128", param, ctx)


class _StrList(click.ParamType):
    name = "A,B,..."

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        return [v.strip() for v in str(value).split(",") if v.strip()]


def _base_type(annotation):
    """``X | None`` -> ``X``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return annotation


def field_option(section: type[BaseModel], name: str) -> click.Option:
    """The click option of one setting."""
    field = section.model_fields[name]
    flag = cli_flag(section, name)
    ann = _base_type(field.annotation)
    default = field.default
    text = f"{field.description or name.replace('_', ' ')} [{default}]"
    if ann is bool:
        return click.Option([f"{flag}/--no-{flag[2:]}", name], default=None, help=text)
    if typing.get_origin(ann) is typing.Literal:
        kind = click.Choice([str(a) for a in typing.get_args(ann)])
    elif typing.get_origin(ann) is list:
        kind = _IntList() if typing.get_args(ann) == (int,) else _StrList()
    elif ann in (int, float, str):
        kind = ann
    else:  # pragma: no cover - a new kind of field needs a rule here
        raise TypeError(f"{section.__name__}.{name}: no command-line rule for {ann!r}")
    return click.Option([flag, name], type=kind, default=None, help=text)


def section_options(section: type[BaseModel], key: str):
    """Decorator: add every setting of ``section`` as an option of a command.

    The command receives the given values as ``overrides={key: {name: value or None}}``
    (merged with overrides from other ``section_options`` above it). Put it directly above
    the command function.
    """
    names = list(section.model_fields)

    def deco(f):
        @functools.wraps(f)
        def wrapper(*args, **kwargs):
            values = {n: kwargs.pop(n) for n in names}
            overrides = {**kwargs.pop("overrides", {}), key: values}
            return f(*args, overrides=overrides, **kwargs)

        params = getattr(wrapper, "__click_params__", [])
        wrapper.__click_params__ = params + [field_option(section, n) for n in reversed(names)]
        return wrapper

    return deco
