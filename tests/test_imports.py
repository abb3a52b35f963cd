import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = """
import os, sys
import bcs_tf, training.run, bcs_run.config
import tensorflow as tf, keras
assert 'tensorflow_model_optimization' not in sys.modules, 'TFMOT imported'
assert 'art' not in sys.modules and 'foolbox' not in sys.modules, 'ART or foolbox imported up front'
assert os.environ.get('TF_USE_LEGACY_KERAS') is None, 'legacy Keras switched on'
assert keras.__version__.startswith('3'), keras.__version__
assert tf.keras.layers.Dense is keras.layers.Dense, 'tf.keras is not Keras 3'
print('clean')
"""


def _run(code):
    env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("TF_USE_LEGACY_KERAS", None)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)


def test_project_import_path_keeps_tfmot_and_legacy_keras_out():
    result = _run(PROBE)
    assert result.returncode == 0 and "clean" in result.stdout, result.stderr[-2000:]


def test_the_probe_can_fail_when_tfmot_is_imported():
    # The hazard the first test guards against is real: importing TFMOT flips the probe.
    result = _run("import tensorflow_model_optimization\n" + PROBE)
    assert result.returncode != 0


LAYERING = """
import importlib, pkgutil, sys
package, forbidden = sys.argv[1], sys.argv[2].split(',')
pkg = importlib.import_module(package)
for info in pkgutil.walk_packages(pkg.__path__, package + '.'):
    importlib.import_module(info.name)
loaded = sorted({m.split('.')[0] for m in sys.modules} & set(forbidden))
assert not loaded, f'{package} imports {loaded} at module level'
print('layered')
"""


@pytest.mark.parametrize("package,forbidden", [
    ("bcs_tf", "bcs_run,training,export,bench"),  # the library imports nothing of ours
    ("bcs_run", "tensorflow,keras,bcs_tf,training,export,bench"),  # the run layer: no TensorFlow at import
    ("export", "training,bench"),  # the apps build on the run layer, not on each other
    ("bench", "training"),
])
def test_every_module_keeps_to_its_layer(package, forbidden):
    result = subprocess.run([sys.executable, "-c", LAYERING, package, forbidden], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "3"}, cwd=ROOT)
    assert result.returncode == 0 and "layered" in result.stdout, result.stderr[-1500:]
