"""The selection benchmark: which sampler to use on a user's data, measured.

`thresher -m +experiment=selection_benchmark data=folder data.input_dir=...` runs every sampler x
budget x seed as scan -> embed -> select -> train, each evaluated on the same held-out images
(data.holdout_fraction), and the SelectionBenchmark callback (callback.py) gathers the jobs into
benchmark.csv, benchmark.md and learning_curve.png in the sweep directory (aggregate.py, plot.py).
`python -m app.benchmark SWEEP_DIR` gathers a finished or partly failed sweep again.
"""
