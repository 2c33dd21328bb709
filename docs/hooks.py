"""MkDocs hooks: the pages that must not drift from the code are written from it at build time.

A page holds a marker line ``<!-- generated: NAME -->``; :func:`on_page_markdown` replaces it with
- ``cli``: every ``swavkit`` command, its usage and every option, from the argparse parser the CLI runs;
- ``config``: every config key with its type, default and help, from ``swavkit/config.py`` (the text
  ``swavkit pretrain --help-config`` prints), and the shipped recipes;
- ``api``: one mkdocstrings block per name of ``swavkit.__init__``'s public table, grouped;
- ``benchmarks``: ``benchmarks/README.md`` (the one source of the benchmark tables).
:func:`on_pre_build` fails a strict build (a warning) on a public name without a complete docstring.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import logging
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("mkdocs.hooks.swavkit")

# The Python API page, in the order a user meets the names; every public name must be in one group.
API_GROUPS = {
    "Pretraining": ["pretrain", "train", "TrainResult", "Config", "load_config", "ConfigError"],
    "Loading and exporting weights": ["load_backbone", "load_swav_model", "load_initial_backbone_state",
                                      "export_checkpoint", "LoadError"],
    "Evaluation and embeddings": ["extract_features", "evaluate_knn", "evaluate_linear", "embed", "EvalOptions",
                                  "KnnOptions", "LinearOptions"],
    "The model and the maths": ["SwAVModel", "build_model", "create_backbone", "sinkhorn", "swapped_prediction_loss"],
}
# classes whose fields are documented elsewhere (Config: the configuration reference page)
_NO_MEMBERS = {"Config", "ConfigError", "LoadError"}


def _cell(text) -> str:
    """Text safe inside a Markdown table cell."""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


# ------------------------------------------------------------------------------------------------ cli
def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _option_row(action: argparse.Action) -> str:
    names = ", ".join(f"`{name}`" for name in action.option_strings) or f"`{action.metavar or action.dest}`"
    if action.choices:
        value = " \\| ".join(str(choice) for choice in action.choices)
    elif action.nargs == 0:
        value = "(flag)"
    else:
        value = action.metavar if isinstance(action.metavar, str) else action.dest.upper()
    default = "" if action.default in (None, False, argparse.SUPPRESS) or action.nargs == 0 else f"`{action.default!r}`"
    helptext = (action.help or "").replace("%(default)s", str(action.default)).replace("%%", "%")
    return f"| {names} | {_cell(value)} | {_cell(default)} | {_cell(helptext)} |"


def cli_reference() -> str:
    from swavkit.cli.main import build_parser

    parser = build_parser()
    commands = _subparsers(parser)
    lines = ["| command | what it does |", "|---|---|"]
    helps = {choice.dest: choice.help for choice in next(a for a in parser._actions
                                                         if isinstance(a, argparse._SubParsersAction))._choices_actions}
    lines += [f"| [`swavkit {name}`](#swavkit-{name}) | {_cell((helps.get(name) or '').replace('%%', '%'))} |"
              for name in commands]
    for name, sub in commands.items():
        lines += ["", f"## swavkit {name}", ""]
        if sub.description:
            lines += [sub.description, ""]
        usage = sub.format_usage().replace("usage: ", "").strip()
        lines += ["```text", usage, "```", "", "| option | value | default | meaning |", "|---|---|---|---|"]
        lines += [_option_row(action) for action in sub._actions
                  if action.help != argparse.SUPPRESS and not isinstance(action, argparse._HelpAction)]
        if sub.epilog:
            lines += ["", "Examples (`swavkit " + name + " --help` prints them too):", "", "```text",
                      re.sub(r"^examples?:\n", "", sub.epilog).rstrip(), "```"]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- config
def config_reference() -> str:
    from swavkit.config import Config, describe_recipes

    lines = []
    for section in dataclasses.fields(Config):
        default = getattr(Config(), section.name)
        if not dataclasses.is_dataclass(default):
            continue
        doc = inspect.getdoc(type(default)) or ""
        intro = "" if doc.startswith(f"{type(default).__name__}(") else doc.split("\n\n")[0]  # dataclass's own
        lines += ["", f"## `{section.name}`", "", intro, "", "| key | type | default | what it does |", "|---|---|---|---|"]
        for key, type_name, value, helptext in config_entries(type(default), f"{section.name}."):
            lines.append(f"| `{key}` | {_cell(type_name)} | `{_cell(repr(value))}` | {_cell(helptext)} |")
    top = [(key, type_name, value, helptext) for key, type_name, value, helptext in config_entries(Config, "")
           if "." not in key]
    if top:
        lines += ["", "## Top-level keys", "", "| key | type | default | what it does |", "|---|---|---|---|"]
        lines += [f"| `{key}` | {_cell(t)} | `{_cell(repr(v))}` | {_cell(h)} |" for key, t, v, h in top]
    lines += ["", "## Recipes", "", "Shipped inside the package (the repository's `configs/` folder); give one by name "
              "(`--config imagenet_resnet50`) or give the path of your own YAML file.", "",
              "| name | for |", "|---|---|"]
    for line in describe_recipes():
        name, _, summary = line.partition(": ")
        lines.append(f"| `{name}` | {_cell(summary)} |")
    return "\n".join(lines)


def config_entries(cls, prefix: str):
    """(key, type, default, help) of every key under ``cls``, parsed from ``describe()``'s own lines, so
    this page says exactly what ``--help-config`` prints."""
    from swavkit.config import describe

    pattern = re.compile(r"^(?P<key>[\w.]+) \((?P<type>.*?), default (?P<default>.*?)\): (?P<help>.*)$")
    for line in describe(cls, prefix):
        match = pattern.match(line)
        if match is None:
            log.warning(f"hooks.py: cannot read the --help-config line {line!r}")
            continue
        yield match["key"], match["type"], _Literal(match["default"]), match["help"]


class _Literal(str):
    def __repr__(self) -> str:  # the default as --help-config prints it (already a repr)
        return str(self)


# ------------------------------------------------------------------------------------------------ api
def api_reference() -> str:
    import swavkit

    grouped = [name for names in API_GROUPS.values() for name in names]
    for name in swavkit._PUBLIC:
        if name not in grouped:
            log.warning(f"hooks.py: the public name swavkit.{name} is in no group of API_GROUPS; add it")
    lines = []
    for group, names in API_GROUPS.items():
        lines += ["", f"## {group}", ""]
        for name in names:
            lines.append(f"::: {swavkit._PUBLIC[name]}.{name}")
            lines.append("    options:")
            lines.append("      heading_level: 3")
            lines.append(f"      show_root_full_path: false")
            if name in _NO_MEMBERS:
                lines.append("      members: false")
            lines.append("")
    return "\n".join(lines)


def missing_docs() -> list[str]:
    """What the public API's docstrings lack: each function its Args (when it takes any), Returns (when it
    returns something) and an Example; each class a docstring with an Example, each public method a docstring."""
    import importlib

    import swavkit

    problems = []
    for name, module in swavkit._PUBLIC.items():
        obj = getattr(importlib.import_module(module), name)
        doc = inspect.getdoc(obj) or ""
        if not doc:
            problems.append(f"swavkit.{name}: no docstring")
            continue
        if "Example" not in doc:
            problems.append(f"swavkit.{name}: no 'Example:' section")
        if inspect.isfunction(obj):
            params = [p for p in inspect.signature(obj).parameters.values()]
            if params and "Args:" not in doc:
                problems.append(f"swavkit.{name}: no 'Args:' section")
            returns = inspect.signature(obj).return_annotation
            if returns not in (None, "None", inspect.Signature.empty) and "Returns:" not in doc:
                problems.append(f"swavkit.{name}: no 'Returns:' section")
        elif inspect.isclass(obj) and not issubclass(obj, BaseException) and name not in _NO_MEMBERS:
            for member, value in vars(obj).items():
                if not member.startswith("_") and inspect.isfunction(value) and not inspect.getdoc(value):
                    problems.append(f"swavkit.{name}.{member}: no docstring")
    return problems


# ---------------------------------------------------------------------------------------------- hooks
GENERATORS = {
    "cli": cli_reference,
    "config": config_reference,
    "api": api_reference,
    "benchmarks": lambda: (REPO / "benchmarks" / "README.md").read_text(encoding="utf-8").split("\n", 1)[1],
}


def on_pre_build(config, **kwargs) -> None:
    for problem in missing_docs():
        log.warning(f"undocumented public API: {problem}")


def on_page_markdown(markdown: str, page, config, files, **kwargs) -> str:
    def replace(match: re.Match) -> str:
        name = match["name"]
        if name not in GENERATORS:
            log.warning(f"{page.file.src_path}: unknown generated block {name!r}")
            return match[0]
        return GENERATORS[name]()

    return re.sub(r"^<!-- generated: (?P<name>[\w-]+) -->$", replace, markdown, flags=re.M)


def on_page_content(html: str, page, config, files, **kwargs) -> str:
    """The docstrings cite names the Sphinx way (``:func:`swavkit.train```); Markdown renders the role as
    text before the code, so drop it and keep the code."""
    return re.sub(r":(?:func|class|meth|mod|attr|data|exc|obj):(<code>)", r"\1", html)
