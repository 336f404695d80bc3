"""Launching Hydra sweeps elsewhere than this process: app.launcher.docker runs each job in a
container of the thresher image (`thresher -m hydra/launcher=docker ...`)."""
