"""Options that are dataclass fields and command-line flags at once: each default, range and help text
is written once, beside the thing it sets.

:func:`option` declares a field with its flag's help (``{default}`` in it is replaced by the field's
default), metavar, choices and numeric range (``core/numbers.py``). :func:`add_flags` adds a dataclass's
fields to an argparse group; :meth:`Options.__post_init__` checks the same ranges when the object is
built another way (a test, a checkpoint), raising :class:`OptionError` that names the flag.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from core.errors import TinyLMError
from core.numbers import check_number, number


class UsageError(TinyLMError):
    """A problem with the command line or the inputs: printed as one line, exit status 1."""


class OptionError(UsageError):
    """An option value out of its range or inconsistent with another: one line naming the flag."""


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def option(default: Any, help: str, *, metavar: str | None = None, kind: type | None = None,
           low: float | None = None, high: float | None = None, low_open: bool = False, high_open: bool = False,
           choices: tuple[str, ...] | None = None, type: Callable[[str], Any] | None = None,
           action: Any = None, const: Any = None, nargs: str | None = None, cli_default: Any = None,
           required: bool = False) -> Any:
    """A dataclass field that is also a flag. ``kind``/``low``/``high``: a number of that kind and range
    (parsed by ``core.numbers.number``, checked again after construction); ``cli_default``: the value
    argparse stores when the flag is absent (default None: "not given", so the field's default applies)."""
    spec = {"help": help, "metavar": metavar, "kind": kind, "range": (low, high, low_open, high_open),
            "choices": choices, "type": type, "action": action, "const": const, "nargs": nargs,
            "cli_default": cli_default, "required": required}
    return field(default=default, metadata={"flag": spec})


def _shown(value: Any) -> str:
    return ",".join(value) if isinstance(value, tuple) else str(value)


def add_flags(group: Any, cls: type, names: tuple[str, ...] | None = None) -> None:
    """Add the :func:`option` fields of dataclass ``cls`` (all, or those in ``names``) to ``group``, in field
    order (flag ``--field-name``)."""
    for f in dataclasses.fields(cls):
        spec = f.metadata.get("flag")
        if spec is None or (names is not None and f.name not in names):
            continue
        kwargs: dict[str, Any] = {"help": spec["help"].replace("{default}", _shown(f.default)),
                                  "dest": f.name, "default": _absent(spec)}
        if spec["action"] is not None:
            kwargs["action"] = spec["action"]
        else:
            if spec["kind"] is not None:
                low, high, low_open, high_open = spec["range"]
                kwargs["type"] = number(spec["kind"], low, high, low_open, high_open)
            elif spec["type"] is not None:
                kwargs["type"] = spec["type"]
            if spec["choices"] is not None:
                kwargs["choices"] = spec["choices"]
            if spec["nargs"] is not None:
                kwargs["nargs"], kwargs["const"] = spec["nargs"], spec["const"]
        if spec["metavar"] is not None:
            kwargs["metavar"] = spec["metavar"]
        if spec["required"]:
            kwargs["required"] = True
        group.add_argument(flag_name(f.name), **kwargs)


def _absent(spec: dict[str, Any]) -> Any:
    """What argparse stores for the flag when it is not on the command line."""
    return False if spec["action"] == "store_true" else spec["cli_default"]


def given(values: dict[str, Any], cls: type) -> dict[str, Any]:
    """The flag fields of ``cls`` that ``values`` (parsed flags) actually set (not their absent value)."""
    specs = {f.name: f.metadata["flag"] for f in dataclasses.fields(cls) if "flag" in f.metadata}
    return {k: v for k, v in values.items() if k in specs and v is not None and v != _absent(specs[k])}


@dataclass(frozen=True)
class Options:
    """Base of the option dataclasses: after construction every numeric field is checked against its
    declared range (a value built outside argparse gets the same one-line refusal)."""

    title: ClassVar[str] = ""  # the --help group of these flags

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            spec = f.metadata.get("flag")
            value = getattr(self, f.name)
            if spec is None or spec["kind"] is None or value is None:
                continue
            if spec["kind"] is float and type(value) is int:
                value = float(value)  # an int where a float is expected is that float (beta=1)
            problem = check_number(value, spec["kind"], *spec["range"])
            if problem:
                raise OptionError(f"{flag_name(f.name)} {problem}")

    def values(self) -> dict[str, Any]:
        """Field name -> value (a shallow dict, for records and messages)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
