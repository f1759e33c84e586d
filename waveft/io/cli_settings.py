"""Settings dataclasses that are also a CLI's arguments: one declaration per setting, parsed and rendered back.

A CLI's settings are declared once, as dataclass fields with `metadata=cli(help)`; `add_arguments` turns them
into argparse options (`--guidance-scale` for `guidance_scale`), `from_args` reads them back, and `to_argv`
renders a value as the arguments that reproduce it, so that a caller (the sweep) holds the same dataclass the
CLI parses and passes it on without spelling any flag itself. Supported field types: str, int, float, bool
(`--x` / `--no-x`), Literal (choices), Optional of those (None: the flag is left out), list[int | float | str].
"""
import argparse
import dataclasses
import math
import types
import typing
from typing import Literal

from waveft.errors import UserError


def cli(help: str | None = None, choices=None, none: str | None = None) -> dict:
    """A field's metadata as a CLI option: `field(default=..., metadata=cli("what it is"))`. `none` is the word
    that stands for None on the command line (e.g. "off"), for an Optional field that YAML spells null."""
    return {"help": help, "choices": choices, "none": none}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _strip_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _none_word_option(word: str, choices) -> dict:
    """argparse keywords for an option whose value `word` means None."""
    allowed = [word, *(choices or [])]

    def convert(value: str):
        if choices is not None and value not in allowed:
            raise argparse.ArgumentTypeError(f"invalid choice {value!r} (choose from {', '.join(allowed)})")
        return None if value == word else value

    return {"type": convert, "metavar": "{" + ",".join(allowed) + "}" if choices else None}


def non_finite(value) -> float | None:
    """The first NaN or infinity in a number or list of numbers, else None. Such a value passes every range check
    (comparisons with NaN are false), so each flag or key that takes a number refuses it first."""
    for number in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(number, float) and not math.isfinite(number):
            return number
    return None


def refuse_non_finite(value, flag: str) -> None:
    """For a plain argparse option of type float: a UserError naming `flag` if `value` is NaN or infinite."""
    if non_finite(value) is not None:
        raise UserError(f"{flag} must be a finite number, got {non_finite(value)!r}")


class CliSettings:
    """Mixin for a settings dataclass (see the module docstring)."""

    @classmethod
    def _fields(cls):
        hints = typing.get_type_hints(cls)
        return [(f, _strip_optional(hints[f.name])) for f in dataclasses.fields(cls)]

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, defaults=None) -> None:
        """One option per field; `defaults` (an instance) overrides the dataclass defaults shown in --help."""
        defaults = defaults if defaults is not None else cls()
        for f, tp in cls._fields():
            default = getattr(defaults, f.name)
            kwargs: dict = {"dest": f.name, "default": default, "help": f.metadata.get("help")}
            if kwargs["help"] and default not in (None, "", []):
                kwargs["help"] += " (default: %(default)s)"
            if tp is bool:
                parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, **kwargs)
                continue
            if typing.get_origin(tp) is list:
                kwargs.update(nargs="+", type=typing.get_args(tp)[0])
            elif typing.get_origin(tp) is Literal:
                kwargs["choices"] = list(typing.get_args(tp))
            else:
                kwargs["type"] = tp
            if f.metadata.get("choices") is not None:
                kwargs["choices"] = list(f.metadata["choices"])
            if f.metadata.get("none"):
                kwargs.update(_none_word_option(f.metadata["none"], kwargs.pop("choices", None)))
            parser.add_argument(_flag(f.name), **kwargs)

    @classmethod
    def from_args(cls, args: argparse.Namespace):
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})

    def problems(self) -> list[tuple[str, str]]:
        """(field, what is wrong) for each bad value; subclasses add their checks."""
        return []

    def check(self, source: str | None = None, section: str | None = None) -> None:
        """Raise a UserError for the first problem, naming the CLI option, or `source: key 'section.field'`."""
        problems = [(f.name, f"must be a finite number, got {non_finite(getattr(self, f.name))!r}")
                    for f in dataclasses.fields(self) if non_finite(getattr(self, f.name)) is not None]
        problems = problems or self.problems()
        if not problems:
            return
        name, message = problems[0]
        where = f"{source}: key '{section}.{name}'" if source else _flag(name)
        raise UserError(f"{where} {message}")

    def to_argv(self) -> list[str]:
        """The arguments that make `from_args` rebuild these settings (None values are left out)."""
        argv = []
        for f, tp in self._fields():
            value = getattr(self, f.name)
            if value is None and f.metadata.get("none"):
                value = f.metadata["none"]
            if value is None:
                continue
            if tp is bool:
                argv.append(_flag(f.name) if value else "--no-" + f.name.replace("_", "-"))
            elif isinstance(value, (list, tuple)):
                argv += [_flag(f.name), *map(str, value)]
            else:  # --flag=value: a value that starts with "-" is not taken for an option
                argv.append(f"{_flag(f.name)}={value}")
        return argv
