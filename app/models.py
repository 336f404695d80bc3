"""torchvision classifiers by name, their weights (never downloaded) and their embedding heads."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Tuple

import torch
import torchvision
from torch import nn

from app.artifacts import SSL_CHECKPOINT
from app.errors import UserError
from app.sampling.schema import SSL_WEIGHTS
from app.train.tasks.base import WEIGHTS_NAME_PATTERN

log = logging.getLogger("thresher")
# Models already reported as randomly initialised in this run: the embed and train stages build the
# same model, and one warning says it.
_warned_random: set = set()


def warn_randomly_initialised(name: str, what: str) -> None:
    """The loud warning that model.weights=null starts `name` from scratch, once per run."""
    if name not in _warned_random:
        _warned_random.add(name)
        log.warning("model %s is RANDOMLY INITIALISED (model.weights=null): %s", name, what)


def forget_warnings() -> None:
    """A new run in this process (a sweep's next job) warns again."""
    _warned_random.clear()


def load_weights(weights: Optional[str], key: str = "model.weights") -> Optional[dict]:
    """A state dict from a file or a torchvision weights name found under TORCH_HOME; None for none.

    Nothing is downloaded: a weights name whose file is missing fails, naming where to put it.
    `key` is the setting the weights came from (model.weights or checkpoint), for the errors.
    """
    if not weights:
        return None
    if weights == SSL_WEIGHTS:
        raise UserError(f"{key}=ssl names a run's SSL backbone ({SSL_CHECKPOINT}), which only the embed "
                        f"and train stages read: use a path to a state dict here")
    if WEIGHTS_NAME_PATTERN.match(weights) and not Path(weights).is_file():
        try:
            enum_value = torchvision.models.get_weight(weights)
        except (ValueError, KeyError, AttributeError):
            raise UserError(f"{key}={weights!r} is not a torchvision weights name "
                            f"(e.g. ResNet18_Weights.IMAGENET1K_V1)") from None
        file_name = Path(enum_value.url).name
        path = Path(torch.hub.get_dir()) / "checkpoints" / file_name
        if not path.is_file():
            raise UserError(f"{key}={weights!r}: {path} does not exist and thresher never "
                            f"downloads; fetch {enum_value.url} and put it there (TORCH_HOME sets the folder)")
    else:
        path = Path(weights)
    state = load_torch_file(key, path)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # a thresher checkpoint
    if not isinstance(state, dict):
        raise UserError(f"{key}={str(path)!r} holds a {type(state).__name__}, not a state dict")
    return state


def load_torch_file(key: str, path: Path) -> Any:
    """A .pt file's contents, tensors only (weights_only), on the CPU; a UserError naming `key` and
    the first line of torch's reason when it is not a PyTorch file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        reason = str(error).splitlines()[0][:160] if str(error) else ""
        raise UserError(f"{key}={str(path)!r} could not be read as a PyTorch file "
                        f"({type(error).__name__}: {reason})") from None


def weights_in_run(weights: Optional[str], run_dir: Path) -> Optional[str]:
    """model.weights as a loadable value: `ssl` becomes the path of the run's SSL backbone, which
    must exist (enable_training=true wrote it in the embed stage, or an earlier run did)."""
    if weights != SSL_WEIGHTS:
        return weights
    path = Path(run_dir) / SSL_CHECKPOINT
    if not path.is_file():
        raise UserError(f"model.weights=ssl: {path} does not exist; set enable_training=true so the embed "
                        f"stage trains it, or run_directory= a run that did")
    return str(path)


def with_weights_in_run(cfg, run_dir: Path, announce: bool = True):
    """The config the train stage builds its model from: with model.weights=ssl, a copy whose
    weights name the run's SSL backbone file (said in the log); otherwise `cfg` itself."""
    if cfg.model.weights != SSL_WEIGHTS:
        return cfg
    from omegaconf import OmegaConf

    path = weights_in_run(cfg.model.weights, run_dir)
    if announce:
        log.info("train: starting from the SSL backbone %s", SSL_CHECKPOINT)
    resolved = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    resolved.model.weights = path
    return resolved


def _head_name(model: nn.Module) -> str:
    for name in ("fc", "classifier", "head"):
        if hasattr(model, name):
            return name
    raise UserError(f"cannot find the classification head of {type(model).__name__}")


def build_classifier(name: str, num_classes: int, weights: Optional[str], key: str = "model.weights",
                     from_scratch: Optional[str] = "training starts from scratch") -> nn.Module:
    """A torchvision classifier with `num_classes` outputs; given weights load into every layer
    whose shape fits (the head is left new when the class count differs). Without weights, the
    run's one RANDOMLY INITIALISED warning says `from_scratch`; None: random weights are intended
    (self-supervised training follows), logged as information."""
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    state = load_weights(weights, key)
    if state is None:
        if from_scratch is None:
            log.info("model %s starts from random weights: enable_training=true trains it self-supervised "
                     "before it embeds", name)
        else:
            warn_randomly_initialised(name, from_scratch)
        return model
    own = model.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(fitting, strict=False)
    skipped = len(own) - len(fitting)
    log.info("model %s: loaded %d tensors from %s (%d left as initialised)", name, len(fitting),
             weights, skipped)
    if not fitting:
        raise UserError(f"{key}={weights!r} has no tensor that fits {name}: is it for another model?")
    return model


def build_backbone(name: str, weights: Optional[str], key: str = "model.weights",
                   from_scratch: Optional[str] = "the embeddings are random features") -> Tuple[nn.Module, int]:
    """The classifier without its last linear layer: image -> embedding vector."""
    model = build_classifier(name, num_classes=1000, weights=weights, key=key, from_scratch=from_scratch)
    head_name = _head_name(model)
    head = getattr(model, head_name)
    if isinstance(head, nn.Sequential):
        last = max(i for i, layer in enumerate(head) if isinstance(layer, nn.Linear))
        dim = head[last].in_features
        head[last] = nn.Identity()
    else:
        dim = head.in_features
        setattr(model, head_name, nn.Identity())
    return model, dim
