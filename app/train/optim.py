"""Optimizer and learning-rate scheduler by torch name with their keyword arguments, as DeepLabCut's
`optimizer: {type, params}` does; a linear warm-up goes in front of the scheduler when asked.

`check_optim_config` runs before the first stage, so a misspelt argument or a value torch refuses
fails in a second, naming the key, not after the selection and a whole epoch have run.
"""
from __future__ import annotations

import copy
import inspect
import math
import re
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from app.config_checks import did_you_mean
from app.errors import UserError

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
                            f"{did_you_mean(name, accepted)}; it takes {', '.join(accepted)} "
                            f"(~{key}.params.{name} removes it)")
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


def check_optim_config(trainer: DictConfig, device: Any = "cpu") -> None:
    """Refuse unknown or missing keyword arguments, checked against the real signatures, then any
    value torch refuses: torch checks many only when they are first used, so the optimizer and
    scheduler the loop builds are rehearsed on a stand-in parameter on `device`."""
    _check_arguments("optimizer", "trainer.optimizer", _optimizer_class(trainer.optimizer.type),
                     _params(trainer.optimizer.params), _OWN_OPTIMIZER_ARGS)
    if trainer.scheduler.type:
        _check_arguments("scheduler", "trainer.scheduler", _scheduler_class(trainer.scheduler.type),
                         _params(trainer.scheduler.params), _OWN_SCHEDULER_ARGS)
    plain = OmegaConf.create(OmegaConf.to_container(trainer, resolve=True))
    failure = rehearse(plain, device)
    if failure is None:
        return
    alone = copy.deepcopy(plain)  # the optimizer without any scheduler: is it the one that fails?
    alone.scheduler.type, alone.scheduler.warmup_epochs = None, 0
    optimizer_failure = rehearse(alone, device)
    if optimizer_failure is not None:
        raise _refusal(alone, "optimizer", optimizer_failure, lambda trial: rehearse(trial, device))
    raise _refusal(plain, "scheduler", failure, lambda trial: rehearse(trial, device))


def rehearse(trainer: DictConfig, device: Any = "cpu") -> Optional[str]:
    """Build the optimizer and scheduler with the loop's own functions on one stand-in parameter,
    take an optimizer step, then step the scheduler once an epoch as the loop does; None when all
    went through, else where it failed and torch's error."""
    weight = torch.nn.Parameter(torch.zeros(1, device=device))
    where = "when built"
    try:
        optimizer = build_optimizer(trainer.optimizer, [weight])
        scheduler = build_scheduler(trainer.scheduler, optimizer)
        where = "at its first step"
        weight.grad = torch.ones_like(weight)
        optimizer.step()
        for epoch in range(1, trainer.epochs + 1):
            where = f"when stepped after epoch {epoch} of trainer.epochs={trainer.epochs}"
            step_scheduler(scheduler, {"train_loss": 1.0}, "train_loss")
            lr = float(optimizer.param_groups[0]["lr"])
            if not (math.isfinite(lr) and lr >= 0):
                raise ValueError(f"the learning rate becomes {lr}; it must stay a number >= 0")
    except UserError:
        raise
    except Exception as error:  # whatever torch raises for a value it cannot use
        return f"{where} ({type(error).__name__}: {error})"
    return None


# Values tried in place of a required param, to see whether its value is what fails.
_STAND_IN_VALUES = (1, [1])


def _refusal(trainer: DictConfig, section: str, failure: str,
             attempt: Callable[[DictConfig], Optional[str]]) -> UserError:
    """The error for `trainer.<section>` failing, naming the param to blame: the one whose default
    (or, when it is required, a stand-in value) makes it work, else the one torch's message names
    among those whose change changes the failure; failing both, the whole section."""
    node = trainer[section]
    params = _params(node.params)
    cls = _optimizer_class(node.type) if section == "optimizer" else _scheduler_class(node.type)
    signature = inspect.signature(cls).parameters

    def outcomes(name: str) -> List[Optional[str]]:
        if signature[name].default is inspect.Parameter.empty:
            variants = [{**params, name: value} for value in _STAND_IN_VALUES]
        else:
            variants = [{key: value for key, value in params.items() if key != name}]
        results = []
        for variant in variants:
            trial = copy.deepcopy(trainer)
            trial[section].params = variant
            results.append(attempt(trial))
        return results

    tried = {name: outcomes(name) for name in params}
    fixed = [name for name, results in tried.items() if None in results]
    named = [name for name, results in tried.items() if any(r != failure for r in results)
             and re.search(rf"\b{name.replace('_', '[_ ]')}\b", failure)]
    for blamed in (fixed, named):
        if len(blamed) == 1:
            return UserError(f"trainer.{section}.params.{blamed[0]}={params[blamed[0]]!r} is not allowed: "
                             f"{node.type} fails {failure}")
    return UserError(f"trainer.{section}.type={node.type!r} with trainer.{section}.params={params} is not "
                     f"allowed: it fails {failure}")


def build_optimizer(optimizer_cfg: DictConfig, parameters) -> torch.optim.Optimizer:
    trainable = [p for p in parameters if p.requires_grad]
    return _optimizer_class(optimizer_cfg.type)(trainable, **_params(optimizer_cfg.params))


def build_scheduler(scheduler_cfg: DictConfig, optimizer: torch.optim.Optimizer) -> Optional[Any]:
    """The named scheduler (stepped once an epoch), after `warmup_epochs` of linear warm-up."""
    main = None
    if scheduler_cfg.type:
        main = _scheduler_class(scheduler_cfg.type)(optimizer, **_params(scheduler_cfg.params))
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
