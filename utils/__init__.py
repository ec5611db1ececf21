"""Shared library of the toolkit: record I/O, datasets, models, training loop, metrics, configuration, reporting."""
