"""thresher's Hydra launcher: `thresher -m hydra/launcher=docker ...` runs each job of a sweep in its
own container of the thresher image. Hydra finds it in the `hydra_plugins` namespace package."""
