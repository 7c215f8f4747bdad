"""The command line's validation layer: argparse ``type=`` callables that check a value at parse time.

Every option of every ``diffkit`` subcommand that takes a value has one of these as its ``type``, so a
bad value is refused while the arguments are parsed: before any model loads and before anything is
written. A refused value raises :class:`argparse.ArgumentTypeError` with a message that reads after the
option's name (``"must be a positive integer, got 0"``); :class:`DiffkitArgumentParser` prints it as the
project's one line ``diffkit: error: --steps must be a positive integer, got 0`` with exit status 2.

Numbers are never NaN or infinite. Seeds are integers in ``[0, 2**63)`` everywhere (the demo's and the
erasure config's range); denoising steps are at most :data:`MAX_STEPS` (the ``num_train_timesteps`` of
every Stable Diffusion scheduler; the loaded scheduler's own value is checked again after loading).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

#: Seeds: [0, SEED_LIMIT).
SEED_LIMIT = 2**63
#: The most denoising steps a Stable Diffusion scheduler has (its num_train_timesteps).
MAX_STEPS = 1000

DEVICES = ("cpu", "cuda", "mps")
DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def parse_device(value: str) -> str:
    import torch

    base = value.split(":", 1)[0]
    if base not in DEVICES:
        raise CLIError(f"unknown device {value!r}; use one of {', '.join(DEVICES)} (optionally cuda:N)")
    if base == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"device {value!r} requested but CUDA is not available on this machine")
    if base == "mps" and not torch.backends.mps.is_available():
        raise CLIError(f"device {value!r} requested but MPS is not available on this machine")
    return value



class UsageError(Exception):
    """A command line that does not parse (bad option value, unknown option, missing argument)."""


class DiffkitArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise :class:`UsageError` with a one-line message naming the option.

    ``diffkit.cli.main`` prints it as ``diffkit: error: ...`` and returns 2 (argparse's own ``error``
    prints a usage block and exits). Subparsers inherit the class.
    """

    def error(self, message: str):
        raise UsageError(option_message(message))


def option_message(message: str) -> str:
    """argparse's ``"argument --steps: must be ..."`` -> ``"--steps must be ..."`` (other messages: ``"--x: ..."``)."""
    if message.startswith("argument ") and ": " in message:
        name, rest = message[len("argument "):].split(": ", 1)
        name = name.split("/")[0]
        return f"{name} {rest}" if rest.startswith("must ") else f"{name}: {rest}"
    return message


def _number_text(x) -> str:
    return repr(x) if isinstance(x, float) and x != int(x) else (f"{x:g}" if isinstance(x, float) else str(x))


class Validator:
    """Base of the ``type=`` callables; ``__call__(text)`` returns the parsed value or raises ArgumentTypeError."""

    #: What a good value is, after "must be " (used in messages and by the tests).
    allowed: str = ""

    def fail(self, text) -> argparse.ArgumentTypeError:
        return argparse.ArgumentTypeError(f"must be {self.allowed}, got {text!r}")

    def __repr__(self) -> str:  # argparse shows repr(type) in some messages
        return f"{type(self).__name__}({self.allowed})"


class Number(Validator):
    """A finite int or float in a range: ``Number(int, low=1)``, ``Number(float, low=0, high=1, high_open=True)``."""

    def __init__(self, kind=float, low=None, high=None, *, low_open=False, high_open=False, multiple=None,
                 allowed=None, note=None):
        self.kind, self.low, self.high = kind, low, high
        self.low_open, self.high_open, self.multiple = low_open, high_open, multiple
        self.range = allowed or self._range_text()
        noun = "an integer" if kind is int else "a finite number"
        if allowed:
            self.allowed = allowed
        elif kind is int and low == 1 and high is None and not multiple:
            self.allowed = "a positive integer"
        else:
            self.allowed = f"{noun}{',' if multiple else ''} {self.range}".strip()
        if note:
            self.allowed += f" ({note})"
            self.range += f" ({note})"

    def _range_text(self) -> str:
        lo, hi = self.low, self.high
        parts = []
        if self.multiple:
            parts.append(f"a multiple of {self.multiple}")
        if lo is not None and hi is not None:
            parts.append(f"in {'(' if self.low_open else '['}{_number_text(lo)}, {_number_text(hi)}"
                         f"{')' if self.high_open else ']'}")
        elif lo is not None:
            parts.append(f"{'>' if self.low_open else '>='} {_number_text(lo)}")
        elif hi is not None:
            parts.append(f"{'<' if self.high_open else '<='} {_number_text(hi)}")
        if self.multiple:
            return ", ".join(parts) if len(parts) == 1 else f"{parts[0]} {parts[1]}"
        return " ".join(parts)

    def in_range(self, x) -> bool:
        if self.low is not None and (x < self.low or (self.low_open and x == self.low)):
            return False
        if self.high is not None and (x > self.high or (self.high_open and x == self.high)):
            return False
        return not (self.multiple and x % self.multiple)

    def __call__(self, text):
        if isinstance(text, bool):
            raise self.fail(text)
        try:
            x = self.kind(text.strip() if isinstance(text, str) else text)
        except (TypeError, ValueError, OverflowError):
            raise self.fail(text) from None
        if isinstance(x, float) and not math.isfinite(x):
            raise self.fail(text)
        if not self.in_range(x):
            # a finite value out of range: "must be >= 0, got -1.0" (the range, the parsed value)
            low_int = self.kind is int and self.low == 1 and x < 1 and not self.multiple
            shown = "a positive integer" if low_int else self.range
            raise argparse.ArgumentTypeError(f"must be {shown}, got {x}")
        return x


def Int(low=None, high=None, **kw) -> Number:  # noqa: N802 - reads as a type
    return Number(int, low, high, **kw)


def Float(low=None, high=None, **kw) -> Number:  # noqa: N802
    return Number(float, low, high, **kw)


def Seed() -> Number:  # noqa: N802
    return Number(int, 0, SEED_LIMIT, high_open=True, allowed="an integer in [0, 2**63)")


def Steps() -> Number:  # noqa: N802
    return Number(int, 1, MAX_STEPS)


class Choice(Validator):
    """One of a fixed set of words."""

    def __init__(self, options):
        self.options = tuple(options)
        self.allowed = f"one of {', '.join(self.options)}"

    def __call__(self, text):
        value = text.strip() if isinstance(text, str) else text
        if value not in self.options:
            raise self.fail(text)
        return value


class Text(Validator):
    """A string that is not blank (a prompt, a path, a model id); ``blank_ok``: any string, e.g. an anchor."""

    def __init__(self, blank_ok: bool = False):
        self.blank_ok = blank_ok
        self.allowed = "text" if blank_ok else "non-blank text"

    def __call__(self, text):
        if not isinstance(text, str) or "\x00" in text or (not self.blank_ok and not text.strip()):
            raise self.fail(text)
        return text


class OutputDir(Validator):
    """A folder to write into: may not exist yet, but neither it nor a parent may be a file."""

    allowed = "a folder"

    def __call__(self, text):
        Text()(text)
        path = Path(text).expanduser()
        for p in (path, *path.parents):
            if p.exists() or p.is_symlink():
                if not p.is_dir():
                    what = "" if p == path else " (a parent)"
                    raise argparse.ArgumentTypeError(f"must be a folder, but {str(p)!r}{what} is a file")
                break
        return text


class OutputFile(Validator):
    """A file to write: in an existing folder, and not itself a folder."""

    allowed = "a file path"

    def __call__(self, text):
        Text()(text)
        path = Path(text).expanduser()
        if path.is_dir():
            raise argparse.ArgumentTypeError(f"must be a file path, but {text!r} is a folder")
        parent = path.resolve().parent
        if not parent.is_dir():
            raise argparse.ArgumentTypeError(f"must be in an existing folder; {str(parent)!r} does not exist")
        return text


class Device(Validator):
    """cpu, cuda, cuda:N or mps, available on this machine (see :func:`diffkit.cli.parse_device`)."""

    allowed = "cpu, cuda, cuda:N or mps"

    def __call__(self, text):
        try:
            return parse_device(Text()(text).strip())
        except CLIError as e:
            raise argparse.ArgumentTypeError(str(e)) from None


class Dtype(Validator):
    """float32, float16 or bfloat16 (and their short names); the value stays a string."""

    allowed = "float32, float16 or bfloat16"

    def __call__(self, text):
        value = Text()(text).strip()
        if value not in DTYPES:
            raise argparse.ArgumentTypeError(f"unknown dtype {value!r}; use one of {', '.join(sorted(DTYPES))}")
        return value


def check_seed_range(first: int, count: int, flag: str = "--seed") -> None:
    """Seeds ``first .. first + count - 1`` must all lie in [0, 2**63)."""

    if count > 0 and first + count - 1 >= SEED_LIMIT:
        raise CLIError(f"{flag} {first} with {count} image(s) needs seeds up to {first + count - 1}, "
                       "beyond 2**63 - 1")


def check_steps_for(pipe, steps: int, flag: str = "--steps") -> None:
    """``steps`` may not exceed the loaded scheduler's ``num_train_timesteps``."""

    limit = getattr(getattr(pipe, "scheduler", None), "config", {}).get("num_train_timesteps")
    if isinstance(limit, int) and steps > limit:
        raise CLIError(f"{flag} must be at most {limit} (this scheduler's num_train_timesteps), got {steps}")
