"""``python -m training.flagdoc [--check]``: README's flag tables, generated from the command lines' parsers.

The parsers are the single source (``training.run``'s is built from the ``RunConfig`` field metadata), so
``--help`` and README cannot drift: ``--check`` (and ``tests/test_cli.py``) fails when README differs.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from bcs_run import cli

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def parsers():
    """``{command: parser}`` of the command lines whose flags README documents."""
    from export.__main__ import build_parser as export_parser
    from training.evaluate import build_parser as evaluate_parser
    from training.run import build_parser as run_parser

    return {"training.run": run_parser(), "training.evaluate": evaluate_parser(), "export": export_parser()}


def _cell(text):
    return text.replace("|", "\\|").replace("%%", "%")


def flag_table(parser):
    """Markdown table of ``parser``'s flags: one row per flag (names, choices, default, help), by group."""
    rows = ["| flag | default | meaning |", "|---|---|---|"]
    for group in parser._action_groups:  # argparse keeps groups only here; their order is the --help order
        actions = [a for a in group._group_actions if a.option_strings and a.help != argparse.SUPPRESS
                   and not isinstance(a, argparse._HelpAction)]
        if not actions:
            continue
        if group.title not in ("options", "optional arguments"):
            rows.append(f"| **{group.title}** | | |")
        for a in actions:
            names = ", ".join(f"`{o}`" for o in a.option_strings)
            if a.choices:
                value = "{" + ",".join(map(str, a.choices)) + "}"
            else:
                value = (a.metavar or a.dest.upper()) if a.nargs != 0 else ""
            flag = names + (f" `{value}`" if value else "")
            default = "" if a.default is None or a.default is False else f"`{a.default}`"
            help_text = a.help or ""
            if " (default: " in help_text:  # a default described in words
                help_text, default = help_text.rsplit(" (default: ", 1)
                default = default[:-1]
            rows.append(f"| {flag} | {_cell(default)} | {_cell(help_text)} |")
    return "\n".join(rows) + "\n"


def render(text):
    """README ``text`` with every ``<!-- flags: COMMAND -->`` … ``<!-- /flags -->`` block regenerated."""
    tables = {name: flag_table(p) for name, p in parsers().items()}
    out, pos = [], 0
    while True:
        start = text.find("<!-- flags: ", pos)
        if start < 0:
            return "".join(out) + text[pos:]
        head_end = text.index("-->", start) + 3
        name = text[start + len("<!-- flags: "):head_end - 3].strip()
        if name not in tables:
            raise cli.FlagError(f"README names unknown command {name!r} in a flags block")
        end = text.index("<!-- /flags -->", head_end)
        out += [text[pos:head_end], "\n", tables[name]]
        pos = end


def build_parser():
    """The ``training.flagdoc`` parser."""
    p = cli.parser("python -m training.flagdoc", __doc__)
    p.add_argument("--check", action="store_true", help="only report whether README is up to date (exit 1 if not)")
    return p


@cli.one_line_errors
def main(argv=None):
    """Rewrite README's flag tables (``--check``: exit 1 if they are out of date, change nothing)."""
    args = build_parser().parse_args(argv)
    text = README.read_text()
    new = render(text)
    if args.check:
        if new != text:
            print("README.md flag tables differ from --help: run `python -m training.flagdoc`", file=sys.stderr)
            return 1
        return 0
    README.write_text(new)
    print(f"updated {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
