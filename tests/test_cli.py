import json
import os
import subprocess
import sys

import numpy as np
import pytest

from training.run import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from conftest import TINY_RUN  # noqa: E402

FAST = TINY_RUN + ["--batch-size", "128"]


@pytest.mark.parametrize("flags,name", [
    (["--connectivity", "0"], "--connectivity"),
    (["--connectivity", "1.5"], "--connectivity"),
    (["--objective", "madry"], "--objective"),
    (["--dataset", "imagenet"], "--dataset"),
    (["--eps", "-0.1"], "--eps"),
    (["--budget", "both"], "--budget"),
    (["--method", "magnitude"], "--method"),
    (["--method", "hydra"], "--from"),
    (["--method", "bcs", "--from", "runs/x"], "--from"),
    (["--method", "iwi", "--from", "runs/x", "--connectivity", "0.1"], "--connectivity"),
    (["--reinit"], "--reinit"),
    (["--method", "dense", "--granularity", "channel"], "--granularity"),
    (["--method", "fixed", "--from", "runs/x", "--block-size", "16"], "--block-size"),
    (["--method", "bcs", "--rewind-epoch", "0"], "--rewind-epoch"),
    (["--method", "random", "--prune-rounds", "2"], "--prune-rounds"),
    (["--method", "hydra", "--from", "runs/x", "--round-epochs", "2"], "--round-epochs"),
    (["--method", "lottery", "--from", "runs/x", "--score-epochs", "2"], "--score-epochs"),
    (["--method", "dense", "--finetune-lr-factor", "0.5"], "--finetune-lr-factor"),
    (["--snapshot-epochs", "0,1"], "--snapshot-epochs"),
    (["--precision", "float8"], "--precision"),
])
def test_bad_flags_give_a_one_line_error_naming_the_flag(tmp_path, capsys, flags, name):
    assert main(flags + ["--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and name in err and "\n" not in err
    if "--method" in flags and name not in ("--method", "--from", "--connectivity"):  # a flag of other methods
        method = flags[flags.index("--method") + 1]
        assert f"does not apply to --method {method}" in err
    assert not (tmp_path / "run").exists()


def test_existing_run_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text("precious")
    assert main(FAST + ["--out", str(out)]) == 2
    assert "--out" in capsys.readouterr().err
    assert (out / "metrics.json").read_text() == "precious"


def test_a_directory_another_process_holds_is_refused_and_left_alone(tmp_path, capsys):
    from training import reproduce

    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text("precious")
    holder = subprocess.Popen(  # stands in for a training job writing into the same directory
        [sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); "
         "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(300)", str(out)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for flags in (["--overwrite"], ["--resume"], []):
            assert main(FAST + flags + ["--out", str(out)]) == 2
            err = capsys.readouterr().err.strip()
            assert err.startswith("error: --out") and "in use by another bcs-tf process" in err and "\n" not in err
        assert reproduce.main(["--dataset", "synthetic", "--preset", "smoke", "--out", str(out)]) == 2
        assert "in use by another bcs-tf process" in capsys.readouterr().err
        assert sorted(p.name for p in out.iterdir()) == ["metrics.json"]
        assert (out / "metrics.json").read_text() == "precious"
    finally:
        holder.kill()
        holder.wait()
    assert main(FAST + ["--epochs", "1", "--overwrite", "--out", str(out)]) == 0  # free again once its holder ends


def test_smoke_run_writes_a_loadable_model_and_metrics_then_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(FAST + ["--epochs", "1", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["test_pgd2_acc"] <= metrics["test_clean_acc"] <= 1.0
    conn = metrics["connectivity"]
    assert conn["active"] == metrics["allocation"]["budgets"][0]
    assert abs(conn["connectivity"] - 0.01) < 1e-3
    assert metrics["config"]["objective"] == "trades" and metrics["wall_seconds"] > 0
    assert (out / "logs").is_dir() and (out / "checkpoint" / "state.json").is_file()

    probe = (
        "import sys, numpy as np, keras, bcs_tf\n"
        f"m = keras.models.load_model({str(out / 'model.keras')!r})\n"
        "x = np.random.default_rng(0).uniform(size=(2, 28, 28, 1)).astype('float32')\n"
        "np.save(sys.argv[1], np.asarray(m(x)))\n"
    )
    env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "3"}
    res = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "y.npy")], env=env, capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert np.load(tmp_path / "y.npy").shape == (2, 10)

    # Resume to a second epoch: history continues, nothing restarts from scratch.
    assert main(FAST + ["--epochs", "2", "--out", str(out), "--resume"]) == 0
    metrics2 = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics2["history"]] == [1, 2]
    assert metrics2["steps"] == 2 * metrics["steps"]

    # Resuming with different training flags is refused, naming them.
    assert main(FAST + ["--epochs", "3", "--lr", "0.5", "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "--lr" in err and "--alpha" not in err
    # A run saved before --alpha had a default per granularity (α written out as 0.0) resumes without the flag.
    config = json.loads((out / "config.json").read_text())
    assert config["alpha"] is None and config["effective_alpha"] == 0.0
    (out / "config.json").write_text(json.dumps({**config, "alpha": 0.0}))
    assert main(FAST + ["--epochs", "3", "--out", str(out), "--resume"]) == 0


def test_corrupt_checkpoint_is_reported(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(FAST + ["--max-steps", "2", "--out", str(out)]) == 0
    weights = json.loads((out / "checkpoint" / "state.json").read_text())["weights"]
    (out / "checkpoint" / weights).write_bytes(b"garbage")
    assert main(FAST + ["--max-steps", "4", "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "corrupt" in err and weights in err


def test_select_by_last_keeps_the_last_epochs_network(tmp_path):
    import keras

    import bcs_tf  # noqa: F401  (registers the layers model.keras holds)
    from bcs_tf.checkpoint import load_network_from_checkpoint

    out = tmp_path / "run"
    assert main(FAST + ["--epochs", "3", "--select-by", "last", "--no-report", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["best_epoch"] == 3 and metrics["selected_by"] == "last"
    saved, last = keras.models.load_model(out / "model.keras"), keras.models.load_model(out / "model.keras")
    for w in last.weights:
        w.assign(np.zeros(w.shape, w.dtype))
    assert load_network_from_checkpoint(last, out / "checkpoint")["epoch"] == 3
    for a, b in zip(saved.weights, last.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_max_steps_stops_early(tmp_path):
    out = tmp_path / "run"
    assert main(FAST + ["--max-steps", "3", "--method", "random", "--out", str(out)]) == 0
    assert json.loads((out / "metrics.json").read_text())["steps"] == 3


@pytest.mark.parametrize("objective", ["natural", "at", "mat", "mart"])
def test_every_objective_trains_in_the_compiled_step(tmp_path, objective):
    out = tmp_path / objective
    assert main(FAST + ["--max-steps", "2", "--objective", objective, "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["connectivity"]["active"] == metrics["allocation"]["budgets"][0]


def test_piecewise_schedule_and_decoupled_weight_decay_follow_the_authors():
    from bcs_run.config import RunConfig

    opt = RunConfig(lr=0.1, weight_decay=5e-4).make_optimizer(total_steps=100)
    schedule = opt._learning_rate
    assert [float(schedule(s)) for s in (0, 50, 51, 75, 76, 99)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    assert opt.weight_decay == pytest.approx(5e-3)  # wd/lr0: θ ← (1 − lr_t·wd/lr0)·θ = (1 − wd_t)·θ


@pytest.mark.parametrize("optimizer", ["adam", "rmsprop"])
def test_other_optimizers_by_name(tmp_path, optimizer):
    out = tmp_path / optimizer
    assert main(FAST + ["--max-steps", "2", "--optimizer", optimizer, "--lr", "0.01", "--lr-schedule", "cosine",
                        "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["connectivity"]["active"] == metrics["allocation"]["budgets"][0]


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100", "svhn_cropped"])
def test_one_step_on_each_tfds_dataset(tmp_path, dataset):
    import tensorflow_datasets as tfds

    out = tmp_path / dataset
    with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
        assert main(["--dataset", dataset, "--val-split", "4", "--batch-size", "8", "--max-steps", "1",
                     "--attack-steps", "1", "--eval-steps", "1", "--verbose", "0", "--connectivity", "0.1",
                     "--out", str(out)] + (["--no-flip"] if dataset == "svhn_cropped" else [])) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 1 and metrics["config"]["dataset"] == dataset


def test_rst_pseudolabel_round_trip(tmp_path, capsys):
    from training.pseudolabel import main as pseudolabel_main

    teacher = tmp_path / "teacher"
    assert main(FAST + ["--max-steps", "2", "--labelled-fraction", "0.25", "--out", str(teacher)]) == 0
    pool = tmp_path / "pool.npz"
    assert pseudolabel_main([str(teacher), "--out", str(pool)]) == 0
    with np.load(pool) as f:
        assert len(f["x"]) == len(f["y"]) == len(f["y_true"]) == 896 - 224
    assert "pseudo-label accuracy" in capsys.readouterr().out
    with np.load(pool) as f:
        np.save(tmp_path / "images.npy", f["x"])
    assert pseudolabel_main([str(teacher), "--pool", str(tmp_path / "images.npy"), "--out",
                             str(tmp_path / "p2.npz")]) == 2  # an external pool must be an .npz with x
    assert "--pool file" in capsys.readouterr().err and not (tmp_path / "p2.npz").exists()
    student = tmp_path / "student"
    assert main(FAST + ["--epochs", "1", "--objective", "rst", "--labelled-fraction", "0.25", "--extra-data",
                        str(pool), "--extra-fraction", "0.5", "--batch-size", "32", "--out", str(student)]) == 0
    metrics = json.loads((student / "metrics.json").read_text())
    assert metrics["steps"] == 224 // 16  # one pass over the labelled quarter, 16 labelled + 16 extra per batch
    assert main(FAST + ["--objective", "rst", "--out", str(tmp_path / "x")]) == 2  # rst needs --extra-data
    assert "--extra-data" in capsys.readouterr().err


@pytest.mark.parametrize("precision,extra", [("mixed_bfloat16", []), ("mixed_float16", ["--alpha", "1e-4"]),
                                             ("float32", ["--jit"])])
def test_mixed_precision_and_xla_train_and_ship_a_float32_model(tmp_path, precision, extra):
    import keras

    import bcs_tf  # noqa: F401

    out = tmp_path / precision
    assert main(FAST + ["--max-steps", "3", "--precision", precision, "--out", str(out)] + extra) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["connectivity"]["active"] == metrics["allocation"]["budgets"][0]
    assert 0.0 <= metrics["test_pgd2_acc"] <= metrics["test_clean_acc"] <= 1.0
    model = keras.models.load_model(out / "model.keras")
    assert {layer.dtype_policy.name for layer in model.layers} == {"float32"}
    assert keras.config.dtype_policy().name == "float32"  # the global policy is restored


@pytest.mark.parametrize("setting", ["plain", "augmented", "rst"])
def test_a_run_killed_after_an_epoch_and_resumed_matches_an_uninterrupted_one(tmp_path, whole_and_killed,
                                                                             setting):
    flags = FAST + ["--epochs", "2", "--augment", "on" if setting == "augmented" else "off"]
    if setting == "rst":  # a pool smaller than an epoch needs, so it is drawn from more than once per epoch
        pool = tmp_path / "pool.npz"
        rng = np.random.default_rng(0)
        np.savez(pool, x=rng.uniform(size=(200, 28, 28, 1)).astype("float32"), y=rng.integers(0, 10, 200))
        flags += ["--objective", "rst", "--extra-data", str(pool), "--labelled-fraction", "0.5", "--augment", "on"]
    whole, split = whole_and_killed(main, flags)
    assert main(flags + ["--out", str(split), "--resume"]) == 0
    a, b = (json.loads((run / "metrics.json").read_text()) for run in (whole, split))
    assert [{k: v for k, v in h.items() if "seconds" not in k} for h in a["history"]] == \
        [{k: v for k, v in h.items() if "seconds" not in k} for h in b["history"]]
    assert (a["test_clean_acc"], a["test_pgd2_acc"]) == (b["test_clean_acc"], b["test_pgd2_acc"])
