"""``python scripts/flagdoc.py [--check]``: rewrite README's flag tables from the command lines' parsers (``--check``:
exit 1 when they are out of date, change nothing). A tool above the apps: it reads the parsers of all of them."""

from __future__ import annotations

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bcs_run import cli  # noqa: E402
from bcs_run.flagdoc import render  # noqa: E402

README = ROOT / "README.md"


def parsers():
    """``{command: parser}`` of the command lines whose flags README documents."""
    from export.__main__ import build_parser as export_parser
    from training.evaluate import build_parser as evaluate_parser
    from training.run import build_parser as run_parser

    return {"training.run": run_parser(), "training.evaluate": evaluate_parser(), "export": export_parser()}


@cli.one_line_errors
def main(argv=None):
    """Rewrite README's flag tables, or with ``--check`` only report whether they are up to date."""
    p = cli.parser("python scripts/flagdoc.py", __doc__)
    p.add_argument("--check", action="store_true", help="only report whether README is up to date (exit 1 if not)")
    args = p.parse_args(argv)
    text = README.read_text()
    new = render(text, parsers())
    if args.check:
        if new != text:
            print("README.md flag tables differ from --help: run `python scripts/flagdoc.py`", file=sys.stderr)
            return 1
        return 0
    README.write_text(new)
    print(f"updated {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
