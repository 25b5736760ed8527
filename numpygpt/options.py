"""One options dataclass per command: its defaults, its help and its checks, written once.

    @dataclass
    class MyOptions(Options):
        batch_size: int = option(8, "windows per micro-batch", check=POSITIVE_INT, metavar="B")

    add_arguments(parser, MyOptions)          # --batch-size, type, help "(default 8)"
    opts = MyOptions.from_dict(given)         # the defaults fill what was not given
    opts.validate()                           # the same checks as the command line's

argparse takes every flag's default, help, type and choices from the dataclass, and the
library functions take the dataclass (or its fields as keywords), so a default or a check is
never written twice and a flag means the same for every command that has it.
"""

from __future__ import annotations

import argparse
import dataclasses
import math

__all__ = ["Options", "option", "add_arguments", "from_fields", "Check", "POSITIVE_INT", "NONNEG_INT", "NONNEG_FLOAT",
           "POSITIVE_FLOAT", "FRACTION", "FRACTION_OR_ONE", "DROP_RATE"]


class Check:
    """A value check shared by argparse (``type=``) and ``Options.validate``: ``convert`` a
    string, then ``ok(value)`` must hold, else ``message`` (formatted with the value)."""

    def __init__(self, convert, ok, message: str):
        self.convert, self.ok, self.message = convert, ok, message
        self.__name__ = message  # argparse names the type in some errors

    def __call__(self, text: str):
        try:
            value = self.convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(self.message.format(text)) from None
        if not self.ok(value):
            raise argparse.ArgumentTypeError(self.message.format(text))
        return value

    def check(self, name: str, value) -> None:
        good = isinstance(value, (int, float)) and not isinstance(value, bool)
        if self.convert is int:
            good = good and float(value).is_integer()
        if not (good and self.ok(value)):
            raise ValueError(f"--{name.replace('_', '-')} {self.message.format(value)}")


POSITIVE_INT = Check(int, lambda v: v >= 1, "must be a positive integer, got {}")
NONNEG_INT = Check(int, lambda v: v >= 0, "must be an integer >= 0, got {}")
NONNEG_FLOAT = Check(float, lambda v: math.isfinite(v) and v >= 0.0, "must be a finite number >= 0, got {}")
POSITIVE_FLOAT = Check(float, lambda v: math.isfinite(v) and v > 0.0, "must be a finite number > 0, got {}")
FRACTION = Check(float, lambda v: 0.0 < v < 1.0, "must be between 0 and 1 (exclusive), got {}")
FRACTION_OR_ONE = Check(float, lambda v: 0.0 < v <= 1.0, "must be in (0, 1], got {}")
DROP_RATE = Check(float, lambda v: 0.0 <= v < 1.0, "must be in [0, 1), got {}")


def option(default, help: str = "", *, check: Check | None = None, choices=None, metavar: str | None = None,
           group: str | None = None, flag: str | None = None, negatable: bool = False, cli: bool = True,
           show_default: bool = True):
    """A dataclass field that is also a command-line flag (``--name-with-dashes``).

    check: the value's check (argparse's type and ``validate``'s). choices: allowed values.
    group: the help section. negatable: a bool flag with a ``--no-`` form. cli: False for an
    option only Python callers set. show_default: append "(default X)" to the help.
    """
    meta = dict(help=help, check=check, choices=choices, metavar=metavar, group=group, flag=flag,
                negatable=negatable, cli=cli, show_default=show_default)
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


class Options:
    """Base of the commands' options dataclasses. ``ARGPARSE_CHECKS``: the checks run in
    argparse (a bad value is a usage error); False: argparse only converts the type, and
    ``validate`` reports a bad value as one line."""

    ARGPARSE_CHECKS = True

    @classmethod
    def from_dict(cls, given: dict):
        """The options with ``given``'s entries set (unknown names: TypeError), defaults elsewhere."""
        return from_fields(cls, given, TypeError, "options")

    @classmethod
    def defaults(cls) -> dict:
        return dataclasses.asdict(cls())

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def validate(self) -> None:
        """Every field's check and choices (ValueError naming the flag), then ``check_more``."""
        for f in dataclasses.fields(self):
            value, m = getattr(self, f.name), f.metadata
            if value is None:
                continue
            if m.get("check") is not None:
                m["check"].check(f.name, value)
            if m.get("choices") is not None and value not in m["choices"]:
                raise ValueError(f"--{f.name.replace('_', '-')} must be one of {', '.join(map(str, m['choices']))}, "
                                 f"got {value!r}")
        self.check_more()

    def check_more(self) -> None:
        """Checks between options (a subclass's)."""


def from_fields(cls, given: dict, error=TypeError, what: str = "fields"):
    """``cls(**given)`` for a dataclass, after refusing names it has no field for (``error``)."""
    unknown = set(given) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise error(f"unknown {what}: {sorted(unknown)}")
    return cls(**given)


def add_arguments(parser, cls, suppress: bool = False, skip=()) -> None:
    """One flag per field of ``cls`` (those with ``cli=True``, not in ``skip``), with its help,
    type, choices and default. ``suppress``: a flag that is not given is left out of the
    parsed namespace (its default is then applied later, e.g. after a resumed run's options)."""
    groups = {}
    for f in dataclasses.fields(cls):
        m = f.metadata
        if not m.get("cli", True) or f.name in skip:
            continue
        target = parser
        if m.get("group"):
            if m["group"] not in groups:
                groups[m["group"]] = parser.add_argument_group(m["group"])
            target = groups[m["group"]]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = m.get("help", "")
        if m.get("show_default", True) and default is not None and not isinstance(default, bool):
            help_text += f" (default {default:g})" if isinstance(default, float) else f" (default {default})"
        kw = dict(help=help_text.replace("%", "%%").strip(), dest=f.name)
        if isinstance(default, bool) or m.get("negatable"):
            kw["action"] = argparse.BooleanOptionalAction if m.get("negatable") else "store_true"
        else:
            check = m.get("check") if cls.ARGPARSE_CHECKS else None
            choices = m.get("choices") if cls.ARGPARSE_CHECKS else None
            kw.update(type=check or _plain_type(f), choices=choices, metavar=m.get("metavar"))
        kw["default"] = argparse.SUPPRESS if suppress else default
        target.add_argument(m.get("flag") or "--" + f.name.replace("_", "-"), **kw)


def _plain_type(f):
    """str, int or float from the field's annotation (``"int | None"`` -> int)."""
    annotation = str(f.type)
    for name, kind in (("int", int), ("float", float)):
        if annotation.split(" ")[0] == name:
            return kind
    return str
