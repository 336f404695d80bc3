"""The Launcher Hydra instantiates for `hydra/launcher=docker`; the work is in app.launcher.docker,
imported only when a sweep launches (the docker SDK is not needed to compose a config)."""
from typing import Any, Optional, Sequence

from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf


class DockerLauncher(Launcher):
    def __init__(self, **options: Any) -> None:
        self.options = {key: OmegaConf.to_container(value, resolve=True)
                        if OmegaConf.is_config(value) else value for key, value in options.items()}
        self.config: Optional[DictConfig] = None
        self.hydra_context: Optional[HydraContext] = None
        self.task_function: Optional[TaskFunction] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from app.launcher.docker import launch

        assert self.config is not None and self.hydra_context is not None
        return launch(self.options, self.config, self.hydra_context, job_overrides, initial_job_idx)
