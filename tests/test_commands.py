"""The command lines as a user meets them: help for every flag, errors before TensorFlow loads, quiet output,
README's flag tables generated from the parsers, and the run report."""

import argparse
import importlib
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from bcs_run import cli
from bcs_run import flagdoc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIS = ("training.run", "training.evaluate", "training.pseudolabel", "training.reproduce", "training.report",
        "training.archive", "export.__main__", "export.predict")
# one bad invocation per CLI that its TensorFlow-free checks must catch
BAD = {
    "training.run": ["--connectivity", "0"],
    "training.evaluate": ["runs/none", "--attacks", "pgd0"],
    "training.pseudolabel": ["runs/none", "--out", "x.npz", "--labelled-fraction", "2"],
    "training.reproduce": ["--table", "nope"],
    "training.report": ["runs/none"],
    "training.archive": ["runs/none"],
    "export.__main__": ["runs/none", "--format", "onnx", "--quantize", "int8"],
    "export.predict": ["missing.tflite"],
}


@pytest.mark.parametrize("module", CLIS)
def test_every_flag_has_help_and_shows_its_default_and_choices(module):
    parser = importlib.import_module(module).build_parser()
    text = parser.format_help()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and action.help.strip(), f"{module}: {action.option_strings or action.dest} has no help"
        if action.choices:
            assert "{" + ",".join(map(str, action.choices)) + "}" in text
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
            assert "(default: " in parser._get_formatter()._expand_help(action), \
                f"{module}: {action.option_strings} hides its default"


@pytest.mark.parametrize("module", sorted(BAD))
def test_bad_flag_fails_in_one_line_without_importing_tensorflow(module, tmp_path):
    code = (f"import sys\nfrom {module} import main\nrc = main({BAD[module]!r})\n"
            "print('TF', any(m == 'tensorflow' or m.startswith(('tensorflow.', 'keras')) for m in sys.modules))\n"
            "sys.exit(rc)")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "TF False"
    err = res.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert not any(tmp_path.iterdir()), "a refused command wrote files"


def test_run_flags_come_from_runconfig_metadata():
    import dataclasses

    from bcs_run.config import RunConfig
    from training.run import build_parser

    dests = {a.dest for a in build_parser()._actions}
    for field in dataclasses.fields(RunConfig):
        assert field.name in dests and field.metadata["help"], field.name
    # a choice list is validated by RunConfig itself too, not only by argparse
    with pytest.raises(cli.FlagError, match="--optimizer"):
        RunConfig(optimizer="lbfgs")


def test_flag_choices_match_the_library_registries():
    from bcs_tf.connectivity import BUDGET_MODES
    from bcs_tf.data import DATASETS
    from bcs_tf.models import MODELS, PRECISIONS
    from bcs_tf.objectives import OBJECTIVES
    from bcs_tf.optim import OPTIMIZERS, SCHEDULES
    from bcs_run import config

    assert set(config.OBJECTIVE_NAMES) == set(OBJECTIVES)
    assert set(config.MODEL_NAMES) == set(MODELS)
    assert tuple(config.DATASET_NAMES) == tuple(DATASETS)
    assert tuple(config.PRECISION_NAMES) == tuple(PRECISIONS)
    assert tuple(config.BUDGET_MODES) == tuple(BUDGET_MODES)
    assert tuple(config.OPTIMIZER_NAMES) == tuple(OPTIMIZERS)
    assert tuple(config.SCHEDULE_NAMES) == tuple(SCHEDULES)


def test_readme_flag_tables_match_the_parsers():
    spec = importlib.util.spec_from_file_location("flagdoc_script", os.path.join(ROOT, "scripts", "flagdoc.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    text = script.README.read_text()
    assert text.count("<!-- flags: ") == 3
    assert flagdoc.render(text, script.parsers()) == text, "README flag tables are stale: run scripts/flagdoc.py"


def test_flag_table_lists_every_flag_with_its_default():
    table = flagdoc.flag_table(importlib.import_module("training.run").build_parser())
    assert "| `--connectivity` `C` | `0.01` |" in table
    assert "| `--from`, `--from-run` `RUN_DIR` |" in table
    assert "| **sparsity** | | |" in table


def test_native_output_drops_debris_and_keeps_real_messages(capfd):
    debris = b"I0000 00:00:1795514040.127912   24240 port.cc:153] oneDNN custom operations are on.\n"
    with cli.native_output(verbose=1):
        os.write(2, debris)
        os.write(2, b"E real trouble: disk full\n")
    err = capfd.readouterr().err
    assert "oneDNN" not in err and "real trouble" in err
    with cli.native_output(verbose=2):
        os.write(2, debris)
    assert "oneDNN" in capfd.readouterr().err


def test_a_run_prints_no_tensorflow_startup_lines(tmp_path):
    res = subprocess.run([sys.executable, "-m", "training.run", "--dataset", "synthetic", "--val-split", "64",
                          "--max-steps", "2", "--epochs", "1", "--attack-steps", "1", "--eval-steps", "1",
                          "--verbose", "0", "--out", str(tmp_path / "run")],
                         cwd=ROOT, capture_output=True, text=True,
                         env={**{k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"},
                              "PYTHONPATH": ROOT})
    assert res.returncode == 0, res.stderr[-2000:]
    output = res.stdout + res.stderr
    for line in output.splitlines():
        assert not cli.is_debris(line), line
    assert "oneDNN" not in output and "absl::InitializeLog" not in output
    # the report is written at the end of a run
    run = tmp_path / "run"
    assert (run / "report.md").is_file() and (run / "figures" / "curves.png").stat().st_size > 1000
    assert (run / "figures" / "connectivity.png").is_file()


def test_report_figures_and_overlay(tmp_path):
    from training.report import write_reports

    runs = []
    for i, (method, conn) in enumerate((("bcs", 0.01), ("dense", 1.0))):
        run = tmp_path / f"r{i}"
        run.mkdir()
        history = [{"epoch": e, "loss": 1.0 / e, "robust_acc": 0.3 + 0.1 * e, "val_clean_acc": 0.5 + 0.1 * e,
                    "val_robust_acc": 0.2 + 0.1 * e, **({"active/a": 10 + e, "active/b": 30 - e} if conn < 1 else {})}
                   for e in (1, 2, 3)]
        metrics = {"test_clean_acc": 0.8, "test_pgd20_acc": 0.6, "best_epoch": 2, "selected_by": "val_robust_acc",
                   "steps": 30, "train_seconds": 60.0, "history": history,
                   "connectivity": {"active": 40, "size": 4000, "connectivity": 0.01} if conn < 1 else
                   {"connectivity": 1.0}, "allocation": {"counts": [20, 20]} if conn < 1 else None,
                   "config": {"method": method, "connectivity": conn, "objective": "at", "eps": 0.1}}
        (run / "metrics.json").write_text(json.dumps(metrics))
        (run / "eval.json").write_text(json.dumps({"attacks": {"clean": {"accuracy": 0.8, "n": 100},
                                                               "pgd50": {"accuracy": 0.55, "n": 100}}}))
        runs.append(run)
    written = write_reports(runs)
    assert (tmp_path / "r0" / "figures" / "connectivity.png") in written
    assert not (tmp_path / "r1" / "figures" / "connectivity.png").exists()  # dense: nothing to show
    for run in runs:
        for name in ("curves.png", "attacks.png"):
            assert (run / "figures" / name).read_bytes()[:4] == b"\x89PNG"
        report = (run / "report.md").read_text()
        assert "| 2 ← |" in report and "PGD-50 | 55.00%" in report and "test PGD-20 accuracy **60.00%**" in report
    assert (tmp_path / "report_overlay.png").read_bytes()[:4] == b"\x89PNG"
