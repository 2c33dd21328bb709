"""Command line: ``swavkit pretrain | export | knn | linear | cluster | assign | embed | neighbours | finetune | plot | shard``. Thin: parse,
call the library. Every sub-command lives in one module of this package and is registered the same way
(its module's ``register(subparsers)``, listed in COMMAND_MODULES).

User mistakes (bad config key, missing folder, corrupt checkpoint ...) print one line and exit with 2.
Nothing heavy is imported here: torch and timm load inside the commands, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import os
import sys

from swavkit.cli import embed, evaluate, finetune, pretrain, tools
from swavkit.api import config_key
from swavkit.data.names import printable_path
from swavkit.errors import EXIT_STOPPED, UNWRITABLE_ERRNOS, ConfigError, is_stop_request, is_unwritable, is_user_error

# the sub-command modules, in the order `swavkit --help` lists their commands
COMMAND_MODULES = (pretrain, evaluate, embed, finetune, tools)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swavkit", description="SwAV self-supervised learning for timm backbones")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(subparsers)
    return parser


def parse_arguments(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args`` where options and ``key=value`` overrides may come in any order
    (``pretrain data.path=x --config y.yaml train.epochs=3``): argparse gives its one ``overrides``
    positional only the first run of them, so the later ones are collected here, in order."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args, extras = parser.parse_known_args(argv)
    if extras:
        overrides = getattr(args, "overrides", None)
        stray = [text for text in extras if text.startswith("-") or "=" not in text]
        if overrides is None or stray:
            command = _subcommand_parser(parser, getattr(args, "command", None)) or parser
            command.error(f"unrecognized arguments: {' '.join(stray or extras)}{_did_you_mean(command, stray, argv)}")
        args.overrides = [*overrides, *extras]
    return args

def _subcommand_parser(parser: argparse.ArgumentParser, name: str | None) -> argparse.ArgumentParser | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices.get(name)
    return None

def _did_you_mean(parser: argparse.ArgumentParser, stray: list[str], argv: list[str]) -> str:
    """" (did you mean --k 5?)" for the first unknown option in ``stray``: for ``pretrain`` the config key
    it names (--epochs 3 -> train.epochs=3), else the option of ``parser`` closest in spelling, else one whose
    help names the word (--neighbours -> --k, "neighbours"); "" when nothing is close."""
    import difflib
    import re

    flag = next((text for text in stray if text.startswith("--") and len(text) > 2), None)
    if flag is None:
        return ""
    given, _, value = flag.partition("=")
    following = argv[argv.index(flag) + 1:argv.index(flag) + 2] if flag in argv else []
    if not value and following and not following[0].startswith("-") and "=" not in following[0]:
        value = following[0]
    name = given.lstrip("-")
    if any(action.dest == "overrides" for action in parser._actions):  # pretrain: key=value overrides

        try:
            return f" (did you mean {config_key(name.replace('-', '_'))}={value or '...'}?)"
        except ConfigError:
            pass
    options = {text.lstrip("-"): text for text, action in parser._option_string_actions.items()
               if text.startswith("--") and action.help != argparse.SUPPRESS}
    close = [options[match] for match in difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)]
    word = re.compile(rf"\b{re.escape(name.replace('-', ' '))}\b", re.IGNORECASE)
    close = close or [text for text, action in parser._option_string_actions.items() if text in options.values()
                      and word.search((action.help or "").split(" (default")[0])]
    return f" (did you mean {close[0]}{' ' + value if value else ''}?)" if close else ""

def describe_unwritable(err: OSError) -> str:
    """One line for an ``is_unwritable`` OSError: the file it concerns, what happened, what to do. The
    writers of swavkit.runtime.fileio name the file they were writing (not their temporary sibling) and
    remove what they had written, so nothing half-written is left behind."""

    name = err.filename if err.filename is not None else err.filename2
    where = f"{printable_path(name)}: " if name is not None else ""
    return f"{where}{UNWRITABLE_ERRNOS[err.errno]}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_arguments(parser, argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"swavkit {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and closed: not an error worth a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as err:
        if is_stop_request(err):
            print(f"swavkit {args.command}: {err}", file=sys.stderr)
            return EXIT_STOPPED
        if not is_user_error(err):
            raise
        if is_unwritable(err):  # any output (or input) on a read-only or full disk: one line, whoever wrote it
            print(f"swavkit {args.command}: error: {describe_unwritable(err)}", file=sys.stderr)
            return 2
        lines = [line for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
        # An error raised inside a DataLoader worker arrives as "Caught X in DataLoader worker ...",
        # the traceback, then the original message on the last line: show that line.
        message = lines[-1].split(": ", 1)[-1] if lines[0].startswith("Caught ") else lines[0]
        print(f"swavkit {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
