"""What every command line of bcs-tf shares, free of TensorFlow: flags are parsed and checked before its ~3 s
import, and its start-up lines are kept off the terminal.

Nothing here may import TensorFlow, Keras or ``bcs_tf`` (whose ``__init__`` registers the Keras layers):
``tests/test_cli.py`` checks that a bad flag fails with ``tensorflow`` absent from ``sys.modules``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import os
import pathlib
import re
import sys
import tempfile

from bcs_run.rundir import RunDir

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# Lines TensorFlow, absl, the LiteRT converter and ART print on import or conversion that tell a user nothing
# (all of them appear on every CPU-only run). Anything else captured is passed on: real warnings and errors.
DEBRIS = tuple(re.compile(p) for p in (
    r"All log messages before absl::InitializeLog\(\) is called",
    r"^[IWE]\d{4} [\d:. ]+\d+ (port|cudart_stub|cuda_\w+|tf_tfl_flatbuffer_helpers|flatbuffer_export|"
    r"tf_saved_model_freeze_variables|context_distributed_manager|gpu_device|cpu_feature_guard)\.cc:\d+\]",
    r"oneDNN custom operations are on",
    r"Could not find cuda drivers",
    r"Unable to register cu(DNN|FFT|BLAS) factory",
    r"This TensorFlow binary is optimized to use available CPU instructions",
    r"rebuild TensorFlow with the appropriate compiler flags",
    r"TF-TRT Warning",
    r"^\s*\d+: TensorSpec\(",
    r"^\s*warnings\.warn\(",
    r"PyTorch not found\. Not importing",
    r"^Saved artifact at '",
    r"^\* Endpoint '",
    r"^\s+(args_\d+|\w+) \(POSITIONAL_ONLY\): TensorSpec\(",
    r"^\s*(Output Type|Captures):\s*$",
    r"^\s+TensorSpec\(shape=",
    r"^INFO: Created TensorFlow Lite XNNPACK delegate for CPU",
    r"UserWarning: Statistics for quantized inputs were expected, but not specified",
    r"^fully_quantize: \d, inference_type: \d",
))


class FlagError(ValueError):
    """A bad command-line flag or setting, reported as one ``error: …`` line before TensorFlow is imported."""


def is_debris(line):
    """Whether ``line`` is one of TensorFlow's (or a converter's) uninformative start-up lines."""
    return any(p.search(line) for p in DEBRIS)


@contextlib.contextmanager
def native_output(verbose=1):
    """Capture what C++ and Python write to file descriptors 1 and 2 inside the block.

    TensorFlow's start-up lines come from C++ (absl), below ``sys.stderr``, so only a file-descriptor redirect
    catches them. On exit the captured text is shown on stderr: all of it with ``verbose`` ≥ 2 (what
    ``training.reproduce`` passes, so its per-run log files keep everything), else every line that is not
    :data:`DEBRIS`.
    """
    saved, sinks = [], []
    for fd, stream in ((1, sys.stdout), (2, sys.stderr)):
        stream.flush()
        sink = tempfile.TemporaryFile(mode="w+b")
        saved.append(os.dup(fd))
        sinks.append(sink)
        os.dup2(sink.fileno(), fd)
    try:
        yield
    finally:
        for fd, stream, old in zip((1, 2), (sys.stdout, sys.stderr), saved):
            stream.flush()
            os.dup2(old, fd)
            os.close(old)
        text = ""
        for sink in sinks:
            sink.seek(0)
            text += sink.read().decode("utf-8", "replace")
            sink.close()
        shown = [line for line in text.splitlines() if line.strip() and (verbose >= 2 or not is_debris(line))]
        if shown:
            print("\n".join(shown), file=sys.stderr)


def import_tensorflow(verbose=1):
    """Import TensorFlow, Keras and ``bcs_tf`` (which registers the sparse layers) and probe the devices, with
    their start-up lines filtered by :func:`native_output`; later imports of them are then silent."""
    with native_output(verbose):
        import keras  # noqa: F401
        import tensorflow as tf

        import bcs_tf  # noqa: F401

        tf.config.list_physical_devices()  # the device probe logs its CUDA misses now, not at the first op


def one_line_errors(main):
    """Decorate a CLI ``main(argv)``: a :class:`FlagError`, a ``bcs_tf`` input error or a file-system error
    (unwritable directory, full disk, missing file) prints as one ``error: …`` line and returns exit code 2
    (the library's errors are matched without importing it)."""

    @functools.wraps(main)
    def wrapper(argv=None):
        try:
            return main(argv)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):  # what was being written is left as it was
                print(f"error: no space left on device while writing {exc.filename or 'a file'}", file=sys.stderr)
                return 2
            where = f" {exc.filename}" if exc.filename else ""
            print(f"error: cannot access{where}: {exc.strerror or exc}", file=sys.stderr)
            return 2
        except Exception as exc:
            errors = sys.modules.get("bcs_tf.errors")
            if isinstance(exc, FlagError) or (errors is not None and isinstance(exc, errors.BcsError)):
                print(f"error: {exc}", file=sys.stderr)
                return 2
            raise

    return wrapper


def check_writable(path, flag):
    """Raise FlagError unless ``path`` (a file or directory, existing or not) can be created or replaced."""
    path = pathlib.Path(path).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if existing != path and not existing.is_dir():
        raise FlagError(f"{flag}: cannot create {path}: {existing} is not a directory")
    directory = existing if existing.is_dir() else existing.parent
    if not os.access(directory, os.W_OK | os.X_OK):
        raise FlagError(f"{flag}: cannot write {path}: {directory} is not writable")


def refuse_existing(paths, overwrite, flag="--out"):
    """Raise FlagError naming the first of ``paths`` that exists unless ``overwrite``: nothing the user already has
    is replaced without being asked."""
    for path in [paths] if isinstance(paths, (str, pathlib.Path)) else paths:
        if pathlib.Path(path).exists() and not overwrite:
            raise FlagError(f"{flag}: {path} exists; pass --overwrite to replace it")


def add_weights(p):
    """``--weights {selected,last}``: the network validation selected, or the newest training checkpoint's."""
    p.add_argument("--weights", choices=("selected", "last"), default="selected",
                   help="the network of the epoch validation selected (model.keras / network.npz), or of the "
                   "newest training checkpoint (the last epoch: is the selected one flattered by gradient masking?)")


def check_weights(args, run_dir):
    """FlagError for ``--weights last`` on a directory without training checkpoints (an archived run)."""
    if args.weights == "last" and not RunDir(run_dir).checkpoint.is_dir():
        raise FlagError(f"--weights last: {run_dir} keeps no training checkpoint (an archived run keeps only its "
                        "selected network)")


def load_weights(args, run_dir, net):
    """With ``--weights last``, load the newest training checkpoint's weights into ``net``; returns what an
    archive's metadata adds to say which network it holds ({} for the selected one, the default)."""
    if args.weights != "last":
        return {}
    from bcs_tf.checkpoint import load_network_from_checkpoint

    state = load_network_from_checkpoint(net, RunDir(run_dir).checkpoint)
    print(f"the network of the newest training checkpoint (epoch {state.get('epoch')}, step "
          f"{state.get('step_in_epoch', 0)} within it), not the selected epoch {state.get('best_epoch')}'s")
    return {"weights": "last", "epoch": state.get("epoch"), "step_in_epoch": state.get("step_in_epoch", 0)}


@contextlib.contextmanager
def exclusive(directory, flag):
    """Hold an exclusive lock on the existing ``directory`` inside the block, so that two bcs-tf commands never
    write one run or results directory at once; :class:`FlagError` if another process holds it. The kernel
    releases the lock when its holder ends, even by SIGKILL, so a killed job leaves no stale lock. Without
    ``fcntl`` (not POSIX) nothing is locked."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FlagError(f"{flag}: {directory} is in use by another bcs-tf process; wait for it to end or stop "
                            "it") from None
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


class HelpFormatter(argparse.HelpFormatter):
    """One line of meaning per flag, then its default (unless it has none or is a switch)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("%(default)" in text or action.default is None or action.default is False
                or action.default == argparse.SUPPRESS or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one :class:`FlagError` line instead of the whole usage text."""

    def error(self, message):
        raise FlagError(f"{message} (see {self.prog} --help)")


def add_verbose(group):
    """The ``--verbose {0,1,2}`` flag every command shares."""
    group.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2),
                       help="0 quiet, 1 progress bars, 2 one line per epoch or attack plus TensorFlow's start-up "
                       "log and the converters' output (for log files)")


def parser(prog, doc):
    """A :class:`Parser` with the house help format; its description is the first paragraph of ``doc`` without
    the leading ````python -m …````: part."""
    first = re.sub(r"^``[^`]*``:\s*", "", " ".join(doc.strip().split("\n\n")[0].split()))
    return Parser(prog=prog, description=first[:1].upper() + first[1:], formatter_class=HelpFormatter)


def positive(kind, lower=1):
    """An argparse ``type`` that converts with ``kind`` and refuses values below ``lower``."""

    def convert(text):
        value = kind(text)
        if value < lower:
            raise argparse.ArgumentTypeError(f"must be ≥ {lower}, received {text}")
        return value

    convert.__name__ = kind.__name__
    return convert


def share():
    """An argparse ``type`` for a share in [0, 1]."""

    def convert(text):
        value = float(text)
        if not 0.0 <= value <= 1.0:
            raise argparse.ArgumentTypeError(f"must be in [0, 1], received {text}")
        return value

    convert.__name__ = "float"
    return convert
