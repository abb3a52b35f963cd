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


HOUSE = """
import ast, importlib, inspect, pathlib, pkgutil, sys
problems = []
for package in sys.argv[1].split(','):
    pkg = importlib.import_module(package)
    for info in [None, *pkgutil.walk_packages(pkg.__path__, package + '.')]:
        module = importlib.import_module(info.name if info else package)
        path = pathlib.Path(module.__file__)
        problems += [f'{path}:{i}: {len(line)} characters' for i, line in enumerate(path.read_text().splitlines(), 1)
                     if len(line) > 120]
        if not module.__doc__:
            problems.append(f'{path}: no module docstring')
        for name, obj in vars(module).items():
            if name.startswith('_') or getattr(obj, '__module__', None) != module.__name__:
                continue
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and not obj.__doc__:
                problems.append(f'{module.__name__}.{name}: no docstring')
            if inspect.isclass(obj):
                for attr, member in vars(obj).items():
                    inherited = any(attr in vars(base) for base in obj.__mro__[1:])  # the base documents it
                    if inspect.isfunction(member) and not attr.startswith('_') and not inherited and not member.__doc__:
                        problems.append(f'{module.__name__}.{name}.{attr}: no docstring')
print('\\n'.join(problems) or 'kept')
"""


def test_the_house_floors_docstrings_and_line_length():
    # Every public module, function, class and method that is not a documented base's override has a docstring;
    # no line is longer than 120 characters.
    result = subprocess.run([sys.executable, "-c", HOUSE, "bcs_tf,bcs_run,training,export,bench"], capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "3"}, cwd=ROOT)
    assert result.returncode == 0 and result.stdout.strip() == "kept", (result.stdout + result.stderr)[-3000:]
