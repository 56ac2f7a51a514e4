import argparse

from logitguard.cli import build_parser


def parsers(parser):
    """The parser and every subcommand parser below it (experiment run, tokens mine, ...)."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from parsers(child)


def test_every_command_renders_its_help():
    """argparse expands %-formats in help strings only when `--help` is asked for, so a bare "%" in one ("95%")
    passed every other test and made `logitguard experiment --help` a traceback."""
    every = list(parsers(build_parser()))
    assert len(every) > 10
    for parser in every:
        assert parser.format_help().startswith("usage:"), parser.prog
