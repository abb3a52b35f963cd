"""Median compiled training-step time of dense, random-static and BCS training (not a test).

For each objective, the three trainers are timed in interleaved rounds on the same batch, so machine load
affects them alike; the ratio BCS/dense is measured within one run. Target: BCS/dense ≤ 1.05.

    python -m bench.step_time [--model small_cnn] [--objectives at,trades] [--rounds 5] [--steps 10]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from bcs_tf.attacks import AttackConfig  # noqa: E402
from bcs_tf.models import MODELS, build_model  # noqa: E402
from bcs_tf.objectives import make_objective  # noqa: E402
from bcs_tf.trainer import RobustTrainer  # noqa: E402

METHODS = ("dense", "random", "bcs")


def make_trainer(model, method, objective, connectivity, input_shape, attack_steps):
    """A compiled trainer as ``training.run`` builds it (authors' SGD settings, σ = 1e-6 noise)."""
    net, alloc = build_model(model, method, connectivity, "global", 0, input_shape, 10)
    trainer = RobustTrainer(net, make_objective(objective), AttackConfig(0.1, 0.025, attack_steps),
                            allocation=alloc, rewire=method == "bcs", temperature=0.1 * 1e-12 / 2)
    trainer.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9, weight_decay=5e-3), jit_compile=False)
    trainer.prepare()
    return trainer


def sampler_ms(trainer, repeats):
    """Median time of the compiled rewiring alone (masks + noise + deaths + regrowth) on the trained state."""
    sampler = trainer.sampler

    @tf.function
    def rewire():
        sampler.after_update(sampler.active_masks(), trainer.optimizer.learning_rate)

    rewire()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        rewire()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main(argv=None):
    """Print per-method median step times (ms) and the BCS/dense ratio for each objective."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="small_cnn")
    p.add_argument("--objectives", default="at,trades")
    p.add_argument("--connectivity", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--attack-steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    p.add_argument("--steps", type=int, default=10, help="timed steps per method per round")
    args = p.parse_args(argv)
    shape = MODELS[args.model].input_shape
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(args.batch_size,) + shape).astype("float32")
    y = rng.integers(0, 10, args.batch_size).astype("int32")
    print(f"model={args.model} batch={args.batch_size} PGD-{args.attack_steps} c={args.connectivity} "
          f"rounds={args.rounds}x{args.steps} steps")
    print(f"{'objective':10s} {'dense ms':>9s} {'random ms':>10s} {'bcs ms':>8s} {'bcs/dense':>10s} "
          f"{'random/dense':>13s} {'sampler ms':>11s} {'sampler/bcs':>12s}")
    for objective in args.objectives.split(","):
        trainers = {m: make_trainer(args.model, m, objective, args.connectivity, shape, args.attack_steps)
                    for m in METHODS}
        for trainer in trainers.values():  # trace and warm up
            for _ in range(3):
                trainer.train_on_batch(x, y)
        times = {m: [] for m in METHODS}
        for _ in range(args.rounds):
            for m, trainer in trainers.items():
                for _ in range(args.steps):
                    t = time.perf_counter()
                    trainer.train_on_batch(x, y)
                    times[m].append(time.perf_counter() - t)
        med = {m: 1000 * statistics.median(v) for m, v in times.items()}
        sampler = sampler_ms(trainers["bcs"], args.rounds * args.steps)
        print(f"{objective:10s} {med['dense']:9.1f} {med['random']:10.1f} {med['bcs']:8.1f} "
              f"{med['bcs'] / med['dense']:10.3f} {med['random'] / med['dense']:13.3f} {sampler:11.2f} "
              f"{sampler / med['bcs']:12.3f}", flush=True)


if __name__ == "__main__":
    main()
