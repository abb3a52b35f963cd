import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = """
import os, sys
import bcs_tf, training.run, training.config
import tensorflow as tf, keras
assert 'tensorflow_model_optimization' not in sys.modules, 'TFMOT imported'
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
