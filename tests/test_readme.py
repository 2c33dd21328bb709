"""Every command the README and the documentation site (docs/**/*.md) show in a ```bash block is real: it
parses with swavkit's own parser, names configs and recipes that exist, and the cheap ones run."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from swavkit.cli.main import build_parser, main, parse_arguments
from swavkit.config import recipes

REPO = Path(__file__).resolve().parents[1]
# every page of the site too: a ```bash block is a promise that it runs as written from the repository root
READMES = (REPO / "README.md", *sorted((REPO / "docs").rglob("*.md")))


def readme_commands() -> list[tuple[str, list[str]]]:
    """(the README line, argv after 'swavkit') for every swavkit command line in a bash block, with
    backslash continuations joined and comments dropped."""
    commands = []
    for readme in READMES:
        for block in re.findall(r"```bash\n(.*?)```", readme.read_text(), flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                tokens = shlex.split(line, comments=True)
                for marker in ("swavkit", "-m"):  # `swavkit ...`, `torchrun ... -m swavkit ...`
                    if marker == "-m" and "-m" in tokens and tokens[tokens.index("-m") + 1:][:1] == ["swavkit"]:
                        tokens = ["swavkit", *tokens[tokens.index("-m") + 2:]]
                if "swavkit" in tokens and tokens.index("swavkit") + 1 < len(tokens):
                    argv = tokens[tokens.index("swavkit") + 1:]
                    if argv[0] not in ("&&",) and not argv[0].startswith("["):
                        commands.append((line.strip(), argv))
    return commands


def test_the_readme_shows_every_command():
    shown = {argv[0] for _, argv in readme_commands()}
    assert {"pretrain", "export", "knn", "linear", "cluster", "plot"} <= shown


@pytest.mark.parametrize("line,argv", readme_commands(), ids=lambda v: v if isinstance(v, str) else None)
def test_readme_command_parses_and_names_real_files(line, argv):
    args = parse_arguments(build_parser(), [a if a != "..." else "x" for a in argv])
    assert getattr(args, "func", None), line
    for value in argv:
        for part in value.split("="):
            if part.startswith("configs/"):
                assert (REPO / part).is_file(), f"{line}: {part} does not exist"
    for name in getattr(args, "config", None) or []:
        if "/" not in name:  # a recipe by name
            assert name.removesuffix(".yaml") in recipes(), f"{line}: --config {name} is not a shipped recipe"


def test_the_site_is_searched_too():
    assert any(path.parent.name == "guides" for path in READMES), READMES
    assert any(line.startswith("swavkit embed") for line, _ in readme_commands())


def test_cheap_readme_commands_run(capsys):
    assert main(["pretrain", "--help-config"]) == 0
    assert "optim.base_lr" in capsys.readouterr().out
