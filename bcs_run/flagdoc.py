"""README's flag tables, generated from the command lines' argparse parsers (``scripts/flagdoc.py`` rewrites or
checks README.md with them).

The parsers are the single source (``training.run``'s is built from the ``RunConfig`` field metadata), so
``--help`` and README cannot drift: ``tests/test_commands.py`` fails when README differs.
"""

from __future__ import annotations

import argparse

from bcs_run.cli import FlagError


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


def render(text, parsers):
    """README ``text`` with every ``<!-- flags: COMMAND -->`` … ``<!-- /flags -->`` block regenerated from
    ``parsers`` (``{command: parser}``)."""
    tables = {name: flag_table(p) for name, p in parsers.items()}
    out, pos = [], 0
    while True:
        start = text.find("<!-- flags: ", pos)
        if start < 0:
            return "".join(out) + text[pos:]
        head_end = text.index("-->", start) + 3
        name = text[start + len("<!-- flags: "):head_end - 3].strip()
        if name not in tables:
            raise FlagError(f"README names unknown command {name!r} in a flags block")
        end = text.index("<!-- /flags -->", head_end)
        out += [text[pos:head_end], "\n", tables[name]]
        pos = end
