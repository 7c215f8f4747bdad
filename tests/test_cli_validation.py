"""The command line's validation layer (diffkit.cli_validation), table-driven over every option.

The tables are checked against the parsers themselves: every option of every subcommand that takes a
value must have a validator of diffkit.cli_validation as its ``type`` (so a bad value is refused at
parse time), and a row below; a new option without either fails ``test_every_option_is_validated``.
Numeric options get their bad values from their validator's range (NaN, infinities, just outside the
range, not a number); the others from ``BAD_TEXT``. Each bad value must give one line
``diffkit: error: <option> ...`` with exit status 2, load no model and write nothing.
"""

from __future__ import annotations

import argparse

import pytest

import diffkit.cli as cli
from diffkit.cli import build_parser, main
from diffkit.cli_validation import (
    SEED_LIMIT,
    Choice,
    Number,
    OutputDir,
    OutputFile,
    Text,
    Validator,
    option_message,
)

FLAG_ACTIONS = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction,
                argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)


def _subparsers(parser):
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def _value_actions():
    """(command, option or positional dest, action) of every action that takes a value."""
    for command, sub in _subparsers(build_parser()).items():
        for action in sub._actions:
            if isinstance(action, FLAG_ACTIONS):
                continue
            yield command, (action.option_strings[0] if action.option_strings else action.dest), action


#: Placeholders replaced per test: OUT (a fresh folder path), FILE (an existing file), DIR (an existing
#: folder), JOBS (a batch file).
#: command -> (positional arguments, options) that parse; the bad value is added to them.
BASE = {
    "generate": (["x"], []),
    "erase": ([], ["--out", "OUT", "--concept", "red"]),
    "erase-batch": (["JOBS"], ["--out", "OUT"]),
    "prune": (["x"], ["--out", "OUT", "--target-reduction", "0.2"]),
    "eval": ([], []),
    "export": (["DIR"], ["--out", "OUT"]),
}

#: (command, option) -> [(bad value, message after "diffkit: error: ")] for the options that are not numbers.
BLANK = "must be non-blank text, got "
BAD_TEXT = {
    ("generate", "prompt"): [(" ", "prompt " + BLANK + "' '"), ("", "prompt " + BLANK + "''")],
    ("generate", "--model"): [("", "--model " + BLANK)],
    ("generate", "--prompts-file"): [(" ", "--prompts-file " + BLANK)],
    ("generate", "--guidance"): [("cfgg", "--guidance must be one of cfg, apg, cfgpp, pag, seg, skip-layer, "
                                          "cfg-zero-star, tcfg, fdg, mambo, apg-mix, autoguidance, got 'cfgg'")],
    ("generate", "--pruning"): [("", "--pruning " + BLANK)],
    ("generate", "--erasure"): [("", "--erasure " + BLANK)],
    ("generate", "--lora"): [("", "--lora " + BLANK)],
    ("generate", "--out"): [("FILE", "--out must be a folder, but 'FILE' is a file"),
                            ("FILE/sub", "--out must be a folder, but 'FILE' (a parent) is a file")],
    ("generate", "--device"): [("tpu", "--device: unknown device 'tpu'; use one of cpu, cuda, mps")],
    ("generate", "--dtype"): [("int8", "--dtype: unknown dtype 'int8'; use one of")],
    ("erase", "--model"): [("", "--model " + BLANK)],
    ("erase", "--method"): [(" ", "--method " + BLANK)],
    ("erase", "--concept"): [(" ", "--concept " + BLANK)],
    ("erase", "--anchor"): [("a\x00b", "--anchor must be text, got ")],
    ("erase", "--retain"): [("", "--retain " + BLANK)],
    ("erase", "--config"): [("", "--config " + BLANK)],
    ("erase", "--out"): [("FILE", "--out must be a folder, but 'FILE' is a file")],
    ("erase", "--parameters"): [("", "--parameters " + BLANK)],
    ("erase", "--mixed-precision"): [("", "--mixed-precision " + BLANK)],
    ("erase-batch", "jobs"): [(" ", "jobs " + BLANK)],
    ("erase-batch", "--out"): [("FILE", "--out must be a folder, but 'FILE' is a file")],
    ("erase-batch", "--model"): [("", "--model " + BLANK)],
    ("prune", "prompt"): [("\t", "prompt " + BLANK)],
    ("prune", "--model"): [("", "--model " + BLANK)],
    ("prune", "--prompts-file"): [("", "--prompts-file " + BLANK)],
    ("prune", "--out"): [("FILE", "--out must be a folder, but 'FILE' is a file")],
    ("prune", "--penalty"): [("l2", "--penalty must be one of l1, l0, got 'l2'")],
    ("prune", "--kinds"): [("", "--kinds " + BLANK)],
    ("prune", "--logits"): [("", "--logits " + BLANK)],
    ("prune", "--scheduler"): [("dpm", "--scheduler must be one of keep, ddim, euler, got 'dpm'")],
    ("prune", "--mixed-precision"): [("fp8", "--mixed-precision must be one of no, fp16, bf16, got 'fp8'")],
    ("prune", "--device"): [("gpu", "--device: unknown device 'gpu'")],
    ("export", "artifact"): [(" ", "artifact " + BLANK)],
    ("export", "--out"): [("FILE", "--out must be a folder, but 'FILE' is a file")],
    ("export", "--model"): [("", "--model " + BLANK)],
    ("export", "--dtype"): [("int8", "--dtype: unknown dtype 'int8'; use one of")],
    ("eval", "--model"): [("", "--model " + BLANK)],
    ("eval", "--erased"): [("", "--erased " + BLANK)],
    ("eval", "--concept"): [(" ", "--concept " + BLANK)],
    ("eval", "--factor"): [("shape", "--factor must be one of object, color, style, got 'shape'")],
    ("eval", "--words"): [("fancy", "--words must be one of canonical, eval_only, got 'fancy'")],
    ("eval", "--classifier"): [("", "--classifier " + BLANK)],
    ("eval", "--device"): [("tpu", "--device: unknown device 'tpu'")],
    ("eval", "--dtype"): [("half", "--dtype: unknown dtype 'half'")],
    ("eval", "--out"): [("DIR", "--out must be a file path, but 'DIR' is a folder"),
                        ("DIR/no/r.json", "--out must be in an existing folder; 'DIR/no' does not exist")],
}

#: Ranges the issue asks for explicitly (checked against the validators, so that a loosened one fails).
EXPECTED_RANGES = {
    ("generate", "--seed"): (0, SEED_LIMIT), ("prune", "--seed"): (0, SEED_LIMIT),
    ("erase", "--seed"): (0, SEED_LIMIT), ("eval", "--seed"): (0, SEED_LIMIT),
    ("generate", "--steps"): (1, 1000), ("prune", "--steps"): (1, 1000), ("eval", "--steps"): (1, 1000),
    ("erase", "--sample-steps"): (1, 1000),
    ("generate", "--guidance-scale"): (0, None), ("prune", "--guidance-scale"): (0, None),
    ("eval", "--guidance-scale"): (0, None),
}


def bad_numbers(v: Number) -> list[str]:
    """Values a number validator must refuse: never finite-or-not-a-number, and just outside its range."""
    bad = ["nan", "inf", "-inf", "NaN", "abc", ""]
    if v.kind is int:
        bad += ["1.5", "1e3"]
    step = 1 if v.kind is int else 0.5
    if v.low is not None:
        bad.append(str(v.low if v.low_open else v.low - step))
    if v.high is not None:
        bad.append(str(v.high if v.high_open else v.high + step))
    if v.multiple:
        bad.append(str((v.low or 0) + v.multiple + 1))
    return bad


def good_number(v: Number):
    if v.low is not None:
        x = v.low + (v.multiple or 1) * (1 if v.low_open else 0)
        return x if v.kind is int else float(x if not v.low_open else v.low + 0.25)
    return v.kind(v.high - 1 if v.high is not None else 1)


NUMERIC = [(c, o, a) for c, o, a in _value_actions() if isinstance(a.type, Number)]
NUMERIC_CASES = [pytest.param(c, o, bad, id=f"{c} {o} {bad}") for c, o, a in NUMERIC for bad in bad_numbers(a.type)]
TEXT_CASES = [pytest.param(c, o, bad, msg, id=f"{c} {o} {bad!r}") for (c, o), rows in BAD_TEXT.items()
              for bad, msg in rows]


def test_every_option_is_validated():
    seen = set()
    for command, option, action in _value_actions():
        seen.add((command, option))
        assert isinstance(action.type, Validator), f"{command} {option}: type must be a cli_validation validator"
        assert action.choices is None, f"{command} {option}: use Choice(...) as type, not choices="
        if isinstance(action.type, Number):
            assert (command, option) not in BAD_TEXT
        else:
            assert (command, option) in BAD_TEXT, f"{command} {option}: add its bad values to BAD_TEXT"
    assert set(BAD_TEXT) <= seen, f"rows for options that do not exist: {set(BAD_TEXT) - seen}"
    assert set(BASE) == set(_subparsers(build_parser())), "every subcommand needs a BASE command line"
    for key, (low, high) in EXPECTED_RANGES.items():
        v = next(a.type for c, o, a in _value_actions() if (c, o) == key)
        assert (v.low, v.high) == (low, high), key
    assert len(NUMERIC) >= 35  # the numeric options of generate, erase, prune and eval


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A working folder that must stay empty, fixtures outside it, and a load_pipeline that must not run."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "a-file").write_text("x")
    (inputs / "jobs.yaml").write_text("jobs: [{concept: red}]\n")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)

    def no_load(*a, **k):
        raise AssertionError("a model was loaded for a refused command line")

    monkeypatch.setattr(cli, "load_pipeline", no_load)
    names = {"OUT": str(cwd / "o"), "FILE": str(inputs / "a-file"), "DIR": str(inputs),
             "JOBS": str(inputs / "jobs.yaml")}

    def fill(text: str) -> str:
        for key, value in names.items():
            text = text.replace(key, value)
        return text

    def argv(command: str, option: str, value: str) -> list[str]:
        positional, options = BASE[command]
        options = [fill(a) for a in options]
        if not option.startswith("-"):  # the positional argument itself
            return [command, fill(value), *options]
        return [command, *[fill(a) for a in positional], *options, f"{option}={fill(value)}"]

    yield argv, fill
    assert list(cwd.iterdir()) == [], "a refused command line wrote files"


def _assert_refused(capsys, argv, start: str):
    rc = main(argv)
    out = capsys.readouterr()
    assert rc == 2, out.err
    assert out.err.startswith("diffkit: error: " + start), out.err
    assert out.err.count("\n") == 1 and "usage:" not in out.err and out.out == ""
    return out.err


@pytest.mark.parametrize("command, option, bad", NUMERIC_CASES)
def test_numeric_options_refuse_bad_values(sandbox, capsys, command, option, bad):
    argv, _ = sandbox
    err = _assert_refused(capsys, argv(command, option, bad), f"{option} must be ")
    assert "got " in err


@pytest.mark.parametrize("command, option, action", [pytest.param(*n, id=f"{n[0]} {n[1]}") for n in NUMERIC])
def test_numeric_options_accept_their_range(sandbox, command, option, action):
    argv, _ = sandbox
    good = good_number(action.type)
    args = build_parser().parse_args(argv(command, option, str(good)))
    assert getattr(args, action.dest) == good and type(getattr(args, action.dest)) is action.type.kind


@pytest.mark.parametrize("command, option, bad, message", TEXT_CASES)
def test_other_options_refuse_bad_values(sandbox, capsys, command, option, bad, message):
    argv, fill = sandbox
    err = _assert_refused(capsys, argv(command, option, bad), option)
    assert fill(message) in err


def test_messages_name_the_option():
    assert option_message("argument --steps: must be a positive integer, got 0") == \
        "--steps must be a positive integer, got 0"
    assert option_message("argument --x: invalid thing") == "--x: invalid thing"
    assert option_message("the following arguments are required: --out") == \
        "the following arguments are required: --out"


@pytest.mark.parametrize("argv, message", [
    (["generate", "x", "--seed", "18446744073709551616"],
     "--seed must be an integer in [0, 2**63), got 18446744073709551616"),
    (["generate", "x", "--seed", "-1"], "--seed must be an integer in [0, 2**63), got -1"),
    (["prune", "x", "--out", "OUT", "--target-reduction", "0.2", "--seed", "-1"], "--seed must be an integer in"),
    (["generate", "x", "--steps", "100000"], "--steps must be in [1, 1000], got 100000"),
    (["generate", "x", "--guidance-scale", "nan"], "--guidance-scale must be a finite number >= 0, got 'nan'"),
    (["generate", "x", "--guidance-scale", "inf"], "--guidance-scale must be a finite number >= 0, got 'inf'"),
    (["eval", "--guidance-scale", "nan"], "--guidance-scale must be a finite number >= 0, got 'nan'"),
    (["prune", "x", "--out", "OUT", "--target-reduction", "0.2", "--guidance-scale", "-1"],
     "--guidance-scale must be >= 0, got -1.0"),
    (["prune", "x", "--out", "OUT", "--target-reduction", "0.2", "--height", "-64"],
     "--height must be a multiple of 8 >= 8, got -64"),
    (["prune", "x", "--out", "OUT", "--target-reduction", "0.2", "--height", "7"],
     "--height must be a multiple of 8 >= 8, got 7"),
    (["generate", "x", "--guidance", "cfgpp", "--guidance-scale", "1.5"],
     "--guidance-scale must be in [0, 1] with --guidance cfgpp"),
    (["generate", "x", "  "], "prompt must be non-blank text"),
    (["prune", "", "--out", "OUT", "--target-reduction", "0.2"], "prompt must be non-blank text"),
    (["generate", "x", "y", "--seed", str(SEED_LIMIT - 1)],
     f"--seed {SEED_LIMIT - 1} with 2 image(s) needs seeds up to {SEED_LIMIT}, beyond 2**63 - 1"),
    (["erase", "--out", "OUT"], "concept must name at least one prompt"),
    (["erase", "--concept", "red"], "the following arguments are required: --out"),
    (["generate", "x", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_issue_examples(sandbox, capsys, argv, message, monkeypatch):
    _, fill = sandbox
    import diffkit.erasure.engine as engine

    monkeypatch.setattr(engine, "make_accelerator", lambda *a, **k: pytest.fail("erase got past its checks"))
    err = _assert_refused(capsys, [fill(a) for a in argv], "")
    assert message in err


def test_validators_directly():
    with pytest.raises(argparse.ArgumentTypeError, match="must be a finite number in"):
        Number(float, 0, 1)("1e400")  # overflows to inf
    assert Number(int, 0)("  12 ") == 12
    assert Choice(["a"])("a") == "a"
    assert Text(blank_ok=True)("") == ""
    assert OutputDir()("new/folder") == "new/folder"
    with pytest.raises(argparse.ArgumentTypeError):
        OutputFile()(".")
    for v in (Number(int, 1), Choice(["a", "b"]), Text()):
        assert repr(v).startswith(type(v).__name__)
