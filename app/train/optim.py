"""Optimizer and learning-rate scheduler by torch name with their keyword arguments, as DeepLabCut's
`optimizer: {type, params}` does; a linear warm-up goes in front of the scheduler when asked.

`check_optim_config` runs before the first stage, so a misspelt argument fails in a second, not
after the selection has run.
"""
from __future__ import annotations

import inspect
from typing import Any, Dict, Iterable, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from app.config import UserError, did_you_mean

# Arguments thresher passes itself: the user cannot set them in params.
_OWN_OPTIMIZER_ARGS = ("params",)
_OWN_SCHEDULER_ARGS = ("optimizer", "last_epoch", "verbose")


def _params(node: Any) -> Dict[str, Any]:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})


def _check_arguments(kind: str, key: str, cls, params: Dict[str, Any], own: Iterable[str]) -> None:
    accepted = [name for name in inspect.signature(cls).parameters if name not in own]
    for name in params:
        if name not in accepted:
            raise UserError(f"{key}.params.{name}: {cls.__name__} takes no such argument"
                            f"{did_you_mean(name, accepted)}; it takes {', '.join(accepted)}")
    required = [p.name for p in inspect.signature(cls).parameters.values()
                if p.default is inspect.Parameter.empty and p.kind is p.POSITIONAL_OR_KEYWORD
                and p.name not in own]
    missing = [name for name in required if name not in params]
    if missing:
        raise UserError(f"{key}.type={cls.__name__} needs {', '.join(missing)}: add "
                        + " ".join(f"+{key}.params.{name}=..." for name in missing))


def _scheduler_class(name: str):
    cls = getattr(torch.optim.lr_scheduler, name, None)
    if not (inspect.isclass(cls)):
        raise UserError(f"trainer.scheduler.type={name!r} is not in torch.optim.lr_scheduler")
    return cls


def _optimizer_class(name: str):
    cls = getattr(torch.optim, name, None)
    if not (inspect.isclass(cls) and issubclass(cls, torch.optim.Optimizer)):
        raise UserError(f"trainer.optimizer.type={name!r} is not a torch.optim optimizer in torch {torch.__version__}")
    return cls


def check_optim_config(trainer: DictConfig) -> None:
    """Refuse unknown or missing keyword arguments, checked against the real signatures."""
    _check_arguments("optimizer", "trainer.optimizer", _optimizer_class(trainer.optimizer.type),
                     _params(trainer.optimizer.params), _OWN_OPTIMIZER_ARGS)
    if trainer.scheduler.type:
        _check_arguments("scheduler", "trainer.scheduler", _scheduler_class(trainer.scheduler.type),
                         _params(trainer.scheduler.params), _OWN_SCHEDULER_ARGS)


def build_optimizer(optimizer_cfg: DictConfig, parameters) -> torch.optim.Optimizer:
    trainable = [p for p in parameters if p.requires_grad]
    try:
        return _optimizer_class(optimizer_cfg.type)(trainable, **_params(optimizer_cfg.params))
    except (TypeError, ValueError) as error:
        raise UserError(f"trainer.optimizer: {optimizer_cfg.type}({_params(optimizer_cfg.params)}) "
                        f"refused its arguments: {error}") from None


def build_scheduler(scheduler_cfg: DictConfig, optimizer: torch.optim.Optimizer) -> Optional[Any]:
    """The named scheduler (stepped once an epoch), after `warmup_epochs` of linear warm-up."""
    main = None
    if scheduler_cfg.type:
        try:
            main = _scheduler_class(scheduler_cfg.type)(optimizer, **_params(scheduler_cfg.params))
        except (TypeError, ValueError) as error:
            raise UserError(f"trainer.scheduler: {scheduler_cfg.type}({_params(scheduler_cfg.params)}) "
                            f"refused its arguments: {error}") from None
        if isinstance(main, torch.optim.lr_scheduler.ReduceLROnPlateau) and scheduler_cfg.warmup_epochs:
            raise UserError("trainer.scheduler.warmup_epochs cannot precede ReduceLROnPlateau: set it to 0")
    if not scheduler_cfg.warmup_epochs:
        return main
    warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=scheduler_cfg.warmup_start_factor,
                                               end_factor=1.0, total_iters=scheduler_cfg.warmup_epochs)
    if main is None:
        return warmup
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, main],
                                                 milestones=[scheduler_cfg.warmup_epochs])


def step_scheduler(scheduler, metrics: Dict[str, float], key_metric: str) -> None:
    if scheduler is None:
        return
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        value = metrics.get(key_metric, metrics.get("train_loss"))
        scheduler.step(value)
    else:
        scheduler.step()
