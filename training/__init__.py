"""The apps on top of the run layer: training, evaluation, archives, reports and the papers' reproduction."""
