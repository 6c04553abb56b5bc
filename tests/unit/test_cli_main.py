"""The `pykata` command line loads only the verb it runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pykata.cli import main


@pytest.mark.parametrize(("argv", "verb"), [
    (["run", "--", "true"], "run"),
    (["--debug", "--config", "/x.toml", "check"], "check"),
    (["--config=/x.toml", "exec", "pod"], "exec"),
    (["--config", "run"], None),  # "run" is --config's value, not a verb
    (["--help"], None),
    (["bogus"], None),
    ([], None),
])
def test_verb_of_finds_the_verb_after_pykata_options(argv: list[str], verb: str | None) -> None:
    assert main.verb_of(argv) == verb


def test_every_verb_is_listed_with_the_module_that_registers_it() -> None:
    """The full parser offers exactly the verbs of VERBS, in that order, and
    each module registers the verb it is listed under."""
    parser = main.build_parser()
    sub = next(a for a in parser._actions if a.dest == "verb")
    assert list(sub.choices) == list(main.VERBS)  # type: ignore[arg-type]
    for verb in main.VERBS:
        one = next(a for a in main.build_parser(verb)._actions if a.dest == "verb")
        assert list(one.choices) == [verb]  # type: ignore[arg-type]


def test_running_a_verb_imports_no_other_verb_module() -> None:
    """`pykata run` pays for run's imports only (a fresh interpreter, as a user's)."""
    code = ("import json, sys; from pykata.cli import main; "
            "main.build_parser(main.verb_of(['run'])).parse_args(['run', '--', 'true']); "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('pykata.cli.'))))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout
    assert json.loads(out) == ["pykata.cli.main", "pykata.cli.run_cmd"]
