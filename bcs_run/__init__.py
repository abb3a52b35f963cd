"""The run layer between the library (bcs_tf) and the apps (training, export, bench): command-line kit, the run
configuration and the run directory. It imports no TensorFlow at module level, so flags are checked at once."""
