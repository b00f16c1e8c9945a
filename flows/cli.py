"""A flow's command line, built from its pydantic parameter model: one ``--flag`` per field
(help = the field's form description), comma-separated lists, and validation errors as one line
naming each bad parameter.
"""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, ValidationError


def _arg_type(annotation: Any) -> tuple[Any, list | None, bool]:
    """(converter, choices, is_bool) for a pydantic field annotation."""
    origin = get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return _arg_type(args[0]) if len(args) == 1 else (str, None, False)
    if origin is Literal:
        choices = list(get_args(annotation))
        return type(choices[0]), choices, False
    if origin is list:
        (inner,) = get_args(annotation) or (str,)
        conv, choices, _ = _arg_type(inner)
        return _ListOf(conv, choices), None, False
    if annotation is bool:
        return bool, None, True
    if annotation in (int, float, str):
        return annotation, None, False
    return str, None, False


class _ListOf:
    """argparse type for a comma-separated list (``1,2,3`` or ``dlcm,prm``)."""

    def __init__(self, conv: Any, choices: list | None) -> None:
        self.conv, self.choices = conv, choices
        self.__name__ = "list"

    def __call__(self, text: str) -> list:
        values = [self.conv(v.strip()) for v in text.split(",") if v.strip()]
        bad = [v for v in values if self.choices and v not in self.choices]
        if bad:
            raise argparse.ArgumentTypeError(
                f"invalid choice {bad[0]!r} (choose from {', '.join(map(str, self.choices))})"
            )
        return values


def build_parser(model: type[BaseModel], prog: str, description: str) -> argparse.ArgumentParser:
    """An argparse parser with one ``--flag`` per field of ``model`` (help = its description)."""
    from flows.prefect_ui import form_description

    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
    )
    for name, field in model.model_fields.items():
        flag = "--" + name.replace("_", "-")
        conv, choices, is_bool = _arg_type(field.annotation)
        if name == "profile" and getattr(model, "PROFILES", None):
            choices = list(model.PROFILES)  # the flow's own profiles, not every flow's
        help_text = form_description(model, name).replace("%", "%%")
        default = field.default if field.default is not None else None
        if is_bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        else:
            if isinstance(conv, _ListOf):
                arg_type: Any = conv
            elif conv in (int, float) and not choices:
                arg_type = conv
            else:
                arg_type = str
            if isinstance(default, list):
                default = ",".join(map(str, default))
            parser.add_argument(
                flag,
                type=arg_type,
                choices=[str(c) for c in choices] if choices else None,
                default=None,
                help=f"{help_text} (default: {default})" if default is not None else help_text,
            )
    parser.set_defaults(_prog=prog)
    return parser


def parse_params(model: type[BaseModel], argv: list[str] | None, prog: str, description: str):
    """Parse ``argv`` into ``model``; only the flags given override the model's defaults.

    Returns ``(params, explicit)`` where ``explicit`` holds the names set on the command line.
    Validation errors exit with status 2 and a message naming the parameter.
    """
    parser = build_parser(model, prog, description)
    ns = vars(parser.parse_args(argv))
    ns.pop("_prog", None)
    given = {k: v for k, v in ns.items() if v is not None}
    for name, value in list(given.items()):
        _, choices, _ = _arg_type(model.model_fields[name].annotation)
        if choices and not isinstance(choices[0], str):
            given[name] = type(choices[0])(value)
    try:
        return model(**given), set(given)
    except ValidationError as exc:
        parser.exit(2, f"{prog}: error: {format_validation_error(exc)}\n")


def format_validation_error(exc: ValidationError) -> str:
    """One line per bad parameter: ``--name: message``."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err.get("loc", ())) or "parameters"
        parts.append(f"--{loc.replace('_', '-')}: {err.get('msg')}")
    return "; ".join(parts)
