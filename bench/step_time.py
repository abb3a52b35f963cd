"""Median compiled training-step time of dense, random-static and BCS training (not a test).

For each objective, the trainers are timed in interleaved rounds on the same batch, so machine load
affects them alike; ratios are measured within one run. Target: BCS/dense ≤ 1.05. ``--precision
float32,mixed_bfloat16`` times both compute precisions; ``--eager-steps N`` adds the BCS step executed
eagerly (how research code without ``tf.function`` runs it) as a baseline. Each objective's row ends with
the input pipeline's throughput against the fastest step's (target ≥ 3×: the step must never wait for data).

    python -m bench.step_time [--model small_cnn] [--objectives at,trades] [--rounds 5] [--steps 10]
                              [--precision float32] [--eager-steps 0]
"""

from __future__ import annotations

import os
import sys
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from bcs_tf.data import augment_batch, make_pipeline  # noqa: E402
from bcs_tf.models import MODELS, PRECISIONS, build_model  # noqa: E402
from bcs_run import cli  # noqa: E402
from bcs_run.config import RunConfig  # noqa: E402

METHODS = ("dense", "random", "bcs")


def make_trainer(model, method, objective, connectivity, input_shape, attack_steps, precision="float32",
                 eager=False):
    """A compiled (or eager) trainer exactly as ``training.run`` builds it for these flags (its defaults for the
    rest: the authors' SGD, weight decay and σ = 1e-6 noise), through the same RunConfig methods."""
    cfg = RunConfig(model=model, method=method, objective=objective, connectivity=connectivity,
                    attack_steps=attack_steps, precision=precision)
    net, alloc = build_model(model, method, connectivity, cfg.effective_budget, cfg.seed, input_shape, 10,
                             precision=precision)
    trainer = cfg.make_trainer(net, alloc, rewire=method == "bcs")
    trainer.compile(optimizer=cfg.make_optimizer(total_steps=10 ** 6), jit_compile=False, run_eagerly=eager)
    trainer.prepare()
    return trainer


def pipeline_images_per_second(input_shape, batch_size, batches=100):
    """Images per second the training input pipeline delivers (``make_pipeline`` as ``training.run`` uses it,
    with the authors' augmentation for CIFAR-shaped inputs), iterated as fast as it goes after a warm-up."""
    rng = np.random.default_rng(0)
    n = batch_size * batches
    x = rng.uniform(size=(n,) + tuple(input_shape)).astype("float32")
    y = rng.integers(0, 10, n).astype("int32")
    augment = augment_batch if input_shape[0] == 32 else None
    ds = make_pipeline(x, y, batch_size, shuffle=True, seed=0, augment=augment, epochs=(0, 2))
    it = iter(ds)
    for _ in range(batches // 5):  # warm-up: tracing, AUTOTUNE
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch_size / (time.perf_counter() - start)


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


@cli.one_line_errors
def main(argv=None):
    """Print per-method median step times (ms) and the ratios for each objective and precision."""
    p = cli.parser("python -m bench.step_time", __doc__)
    p.add_argument("--model", default="small_cnn", choices=sorted(MODELS), help="network to time")
    p.add_argument("--objectives", default="at,trades", help="comma-separated training objectives")
    p.add_argument("--connectivity", type=float, default=0.01, help="connectivity of the sparse methods")
    p.add_argument("--batch-size", type=int, default=128, help="examples per step")
    p.add_argument("--attack-steps", type=int, default=10, help="PGD steps of the training attack")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    p.add_argument("--steps", type=int, default=10, help="timed steps per method per round")
    p.add_argument("--precision", default="float32", help=f"comma-separated, from {', '.join(PRECISIONS)}")
    p.add_argument("--eager-steps", type=int, default=0, help="timed steps of the eager BCS baseline (0: off)")
    args = p.parse_args(argv)
    precisions = [q for q in args.precision.split(",") if q]
    if not precisions or any(q not in PRECISIONS for q in precisions):
        p.error(f"--precision: choose from {', '.join(PRECISIONS)}")
    shape = MODELS[args.model].input_shape
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(args.batch_size,) + shape).astype("float32")
    y = rng.integers(0, 10, args.batch_size).astype("int32")
    print(f"model={args.model} batch={args.batch_size} PGD-{args.attack_steps} c={args.connectivity} "
          f"rounds={args.rounds}x{args.steps} steps")
    print(f"{'objective':10s} {'precision':15s} {'dense ms':>9s} {'random ms':>10s} {'bcs ms':>8s} "
          f"{'bcs/dense':>10s} {'random/dense':>13s} {'sampler ms':>11s} {'sampler/bcs':>12s} "
          f"{'bcs/fp32 bcs':>13s}")
    for objective in args.objectives.split(","):
        trainers = {(m, q): make_trainer(args.model, m, objective, args.connectivity, shape, args.attack_steps, q)
                    for q in precisions for m in METHODS}
        for trainer in trainers.values():  # trace and warm up
            for _ in range(3):
                trainer.train_on_batch(x, y)
        times = {key: [] for key in trainers}
        for _ in range(args.rounds):
            for key, trainer in trainers.items():
                for _ in range(args.steps):
                    t = time.perf_counter()
                    trainer.train_on_batch(x, y)
                    times[key].append(time.perf_counter() - t)
        med = {key: 1000 * statistics.median(v) for key, v in times.items()}
        for q in precisions:
            d, r, b = med[("dense", q)], med[("random", q)], med[("bcs", q)]
            sampler = sampler_ms(trainers[("bcs", q)], args.rounds * args.steps)
            vs32 = f"{b / med[('bcs', 'float32')]:13.3f}" if ("bcs", "float32") in med else f"{'-':>13s}"
            print(f"{objective:10s} {q:15s} {d:9.1f} {r:10.1f} {b:8.1f} {b / d:10.3f} {r / d:13.3f} "
                  f"{sampler:11.2f} {sampler / b:12.3f} {vs32}", flush=True)
        fastest = 1000 * args.batch_size / min(med.values())
        feed = pipeline_images_per_second(shape, args.batch_size)
        print(f"{objective:10s} input pipeline {feed:,.0f} images/s = {feed / fastest:.1f}× the fastest step "
              f"({fastest:,.0f} images/s; target ≥ 3×)", flush=True)
        if args.eager_steps > 0:
            eager = make_trainer(args.model, "bcs", objective, args.connectivity, shape, args.attack_steps,
                                 precisions[0], eager=True)
            eager.train_on_batch(x, y)
            eager_times = []
            for _ in range(args.eager_steps):
                t = time.perf_counter()
                eager.train_on_batch(x, y)
                eager_times.append(time.perf_counter() - t)
            e = 1000 * statistics.median(eager_times)
            print(f"{objective:10s} eager BCS step ({precisions[0]}): {e:.1f} ms; compiled BCS / eager: "
                  + ", ".join(f"{q} {med[('bcs', q)] / e:.3f}" for q in precisions), flush=True)


if __name__ == "__main__":
    sys.exit(main())
