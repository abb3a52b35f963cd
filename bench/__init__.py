"""Benchmarks: speed, size and the microcontroller comparison, each printing ratios measured in one run."""
