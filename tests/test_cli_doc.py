"""The CLI's module docstring names every command the parser has (what ``python -m bench --help`` lists)."""

import argparse
import re

import bench.cli


def test_cli_docstring_lists_every_command():
    parser = bench.cli.build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    commands = set(sub.choices)
    assert {"run", "sweep", "table", "list", "data", "perf", "hub", "figures"} <= commands
    documented = set(re.findall(r"^\* ``([a-z-]+)", bench.cli.__doc__, flags=re.M))
    assert documented == commands, (sorted(commands - documented), sorted(documented - commands))
