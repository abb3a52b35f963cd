"""The committed results agree with themselves: every table and claims.md is what the committed run reports give,
and every paired interval that results/README.md or README.md quotes for the 3-seed comparison is in claims.md."""

import json
import pathlib
import re

import pytest

from training.plan import plan
from training.tables import write_tables

ROOT = pathlib.Path(__file__).resolve().parent.parent
QUICK = ROOT / "results" / "fashion_mnist-quick"
# "+3.2 [+0.9, +5.5]": a mean paired difference with its 95% interval, as claims.md writes it (README: "−" signs)
INTERVAL = re.compile(r"[+−-]\d+\.\d \[[+−-]\d+\.\d, [+−-]\d+\.\d\]")


def _section(path, start, end):
    text = path.read_text()
    first = text.index(start)
    return text[first:text.index(end, first + len(start))]


@pytest.mark.parametrize("name,tables", [("fashion_mnist-quick", ("bcs", "hydra", "sparsity")),
                                         ("fashion_mnist-full", ("bcs",))])
def test_committed_tables_and_claims_are_what_the_committed_run_reports_give(tmp_path, name, tables):
    committed = ROOT / "results" / name
    settings = json.loads((committed / "manifest.json").read_text())["settings"]
    out = tmp_path / name
    out.mkdir()
    (out / "runs").symlink_to(committed / "runs")
    written = write_tables(tables, plan(tables, settings["dataset"], settings["preset"]), out)
    for path in (p for p in written if p.suffix == ".md"):
        assert path.read_text() == (committed / path.name).read_text(), f"{name}/{path.name} is not what its runs give"


@pytest.mark.parametrize("path,start,end", [
    ("results/README.md", "## The papers' comparison you can trust", "\n## "),
    ("README.md", "- **the papers' comparison, 3 seeds, paired**", "- **the full preset"),
])
def test_every_interval_the_text_quotes_for_the_paired_comparison_is_in_claims_md(path, start, end):
    claims = (QUICK / "claims.md").read_text()
    quoted = INTERVAL.findall(_section(ROOT / path, start, end))
    assert quoted, f"no interval found in {path}: the section markers moved"
    missing = [q for q in quoted if q.replace("−", "-") not in claims]
    assert not missing, f"{path} quotes intervals that claims.md does not have: {missing}"
