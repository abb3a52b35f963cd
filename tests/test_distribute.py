"""Data-parallel training: MirroredStrategy on two logical CPU devices (in a subprocess: logical devices must be
configured before TensorFlow initialises, which the test process already did), and MultiWorkerMirroredStrategy
with two local worker processes of one TF_CONFIG cluster."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# the network, trainer and data both distributed tests train (a BatchNorm-free net: replicas agree to 1e-5)
COMMON = r'''
import json, sys
import numpy as np, tensorflow as tf, keras
from bcs_tf.connectivity import allocate_budget
from bcs_tf.layers import SparseConv2D, SparseDense, sparse_layers
from bcs_tf.objectives import make_objective
from bcs_tf.trainer import RobustTrainer


def build(strategy, trainer_class=RobustTrainer):
    with strategy.scope():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((8, 8, 1))
        h = keras.layers.ReLU()(SparseConv2D(4, 3, strides=2, connectivity=0.3, seed=0, name="c1")(inputs))
        net = keras.Model(inputs, SparseDense(4, connectivity=0.3, seed=1, name="d1")(keras.layers.Flatten()(h)))
        layers = sparse_layers(net)
        alloc = allocate_budget([l.kernel_size_total for l in layers], 0.3, "global")
        for layer, count in zip(layers, alloc.counts):
            layer.reset_connectivity(count, seed=0)
        trainer = trainer_class(net, make_objective("natural"), allocation=alloc, temperature=1e-3, alpha=1e-3)
        trainer.compile(optimizer=keras.optimizers.SGD(0.5, momentum=0.9))
        trainer.prepare()
    rng = np.random.default_rng(0)
    x, y = rng.uniform(size=(64, 8, 8, 1)).astype("float32"), rng.integers(0, 4, 64).astype("int32")
    return trainer, net, layers, alloc, tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
'''

SCRIPT = r'''
import tensorflow as tf
cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
''' + COMMON + r'''


class BudgetOnEveryReplica(keras.callbacks.Callback):
    def __init__(self, strategy, budget):
        super().__init__()
        self.strategy, self.budget, self.counts = strategy, budget, []

    def on_train_batch_end(self, batch, logs=None):
        local = self.strategy.experimental_local_results
        for layers in zip(*(local(l.theta.value) for l in self.model.sampler.layers)):  # tf.Variable, per replica
            self.counts.append(sum(int(np.count_nonzero(t.numpy() > 0)) for t in layers))


def run(strategy):
    trainer, net, layers, alloc, data = build(strategy)
    check = BudgetOnEveryReplica(strategy, alloc.budgets[0])
    trainer.fit(data, epochs=3, verbose=0, callbacks=[check])
    return ([l.active_count() for l in layers], [w.numpy() for w in net.weights], check.counts,
            strategy.num_replicas_in_sync, alloc.budgets[0])

one, two = run(tf.distribute.OneDeviceStrategy("/cpu:0")), run(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
print(json.dumps({"replicas": [one[3], two[3]], "active": [one[0], two[0]], "budget": one[4],
                  "max_diff": max(float(np.abs(a - b).max()) for a, b in zip(one[1], two[1])),
                  "counts_two": two[2]}))
'''


def _python(code, *args):
    res = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_two_replicas_match_one_and_hold_the_budget_on_every_replica_after_every_step():
    r = json.loads(_python(SCRIPT).strip().splitlines()[-1])
    assert r["replicas"] == [1, 2]
    assert r["active"][0] == r["active"][1]  # same connections per layer: identical rewiring draws
    assert r["max_diff"] < 1e-5, r["max_diff"]  # same weights within float tolerance
    assert len(r["counts_two"]) == 2 * 12 and set(r["counts_two"]) == {r["budget"]}  # 2 replicas × 12 steps


def test_the_cli_trains_mirrored_on_two_cpu_devices(tmp_path):
    code = ("import sys, tensorflow as tf\n"
            "cpus = tf.config.list_physical_devices('CPU')\n"
            "tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)\n"
            "from training.run import main\nsys.exit(main(sys.argv[1:]))")
    _python(code, "--dataset", "synthetic", "--val-split", "128", "--max-steps", "4", "--epochs", "1",
            "--attack-steps", "2", "--eval-steps", "2", "--strategy", "mirrored", "--verbose", "0", "--no-report",
            "--out", str(tmp_path / "run"))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["connectivity"]["active"] == metrics["allocation"]["budgets"][0]


def _free_ports(n):
    import socket

    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _workers(argv_of, n=2, timeout=600):
    """Start ``n`` local workers of one TF_CONFIG cluster; ``argv_of(i)`` is worker i's command line."""
    hosts = [f"localhost:{p}" for p in _free_ports(n)]
    procs = []
    for i in range(n):
        tf_config = json.dumps({"cluster": {"worker": hosts}, "task": {"type": "worker", "index": i}})
        procs.append(subprocess.Popen([sys.executable, *argv_of(i)], cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True,
                                      env={**os.environ, "PYTHONPATH": ROOT, "TF_CONFIG": tf_config}))
    outputs = [p.communicate(timeout=timeout) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    return [out for out, _ in outputs]


MULTI = COMMON + r'''


class WorkerShare(RobustTrainer):
    def train_step(self, data):  # each worker's share of the global batch
        tf.print("BATCH", tf.shape(data[0])[0], output_stream=sys.stdout)
        return super().train_step(data)


strategy = tf.distribute.MultiWorkerMirroredStrategy() if sys.argv[1] == "multi" else \
    tf.distribute.OneDeviceStrategy("/cpu:0")
trainer, net, layers, alloc, data = build(strategy, WorkerShare)
trainer.fit(data, epochs=3, verbose=0)
np.save(sys.argv[2], np.concatenate([w.numpy().ravel() for w in net.weights]))
print("RESULT", json.dumps({"active": [l.active_count() for l in layers], "budget": alloc.budgets[0]}))
'''


def test_two_workers_split_each_batch_agree_and_match_one_device(tmp_path):
    import numpy as np

    outs = _workers(lambda i: ["-c", MULTI, "multi", str(tmp_path / f"w{i}.npy")])
    single = _python(MULTI, "one", str(tmp_path / "one.npy"))
    results = [json.loads(o.split("RESULT", 1)[1]) for o in outs + [single]]
    assert all(r["active"] == results[0]["active"] and sum(r["active"]) == r["budget"] for r in results)
    assert all(line.split()[1] == "8" for o in outs for line in o.splitlines() if line.startswith("BATCH"))
    w0, w1, one = (np.load(tmp_path / f) for f in ("w0.npy", "w1.npy", "one.npy"))
    assert np.array_equal(w0, w1)  # the workers hold the same network, rewiring included
    assert np.abs(w0 - one).max() < 1e-5  # two workers of 8 examples = one device of 16


def test_the_cli_trains_on_two_local_workers(tmp_path):
    flags = ["--dataset", "synthetic", "--val-split", "64", "--max-steps", "4", "--epochs", "2", "--attack-steps",
             "2", "--eval-steps", "2", "--connectivity", "0.05", "--strategy", "multiworker", "--verbose", "0",
             "--no-report"]
    _workers(lambda i: ["-m", "training.run", *flags, "--out", str(tmp_path / f"worker{i}")])
    weights = []
    for i in range(2):
        metrics = json.loads((tmp_path / f"worker{i}" / "metrics.json").read_text())
        assert metrics["steps"] == 4 and metrics["connectivity"]["active"] == metrics["allocation"]["budgets"][0]
        weights.append(_python("import sys, numpy as np, keras, bcs_tf.layers\n"
                               "m = keras.models.load_model(sys.argv[1])\n"
                               "print(float(sum(np.abs(w).sum() for w in m.get_weights())))",
                               str(tmp_path / f"worker{i}" / "model.keras")).strip().splitlines()[-1])
    assert weights[0] == weights[1]
