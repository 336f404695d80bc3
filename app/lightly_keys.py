"""The Lightly Worker's keys on thresher's command line: `lightly.*` (the settings it passes to the
lightly CLI, e.g. `lightly.loader.batch_size=512`) and `scorer_config.*`, rewritten to thresher's
keys before Hydra composes.

Worker users paste their old command lines; each key either maps to the thresher key with the same
meaning (a log line says so), is ignored with a warning where it only changes bookkeeping or speed
in a way thresher handles itself, or is refused with what to use instead where ignoring it would
change the result behind the user's back. Hydra then sees only thresher keys: .hydra/overrides.yaml
and the closing summary's "next command" stay valid `thresher` commands, and sweeps
(`lightly.loader.batch_size=64,128 -m`) sweep the mapped key. Imports no torch: it runs before
every command.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from app.config_checks import did_you_mean, is_int
from app.errors import UserError

# The Worker's namespaces, each with an example of a key in it.
NAMESPACES = {"lightly": "lightly.loader.batch_size=512", "scorer_config": "scorer_config.min_score=0.9"}
# `[+|++]namespace[.key][=value]`; `~` (delete) is matched to be refused.
_WORKER_OVERRIDE = re.compile(r"^(?P<prefix>[+~]{0,2})(?P<key>(?:lightly|scorer_config)(?:\.[^=]*)?)"
                              r"(?:=(?P<value>.*))?$", re.DOTALL)
_PLAIN_OVERRIDE = re.compile(r"^\+{0,2}(?P<key>[A-Za-z_][\w.]*)=", re.DOTALL)
_BARE_VALUE = re.compile(r"^[\w./:-]+$")


@dataclass(frozen=True)
class Rule:
    """What one Worker key becomes.

    `targets`: the thresher keys that take its value (converted value by value by `convert`, which
    raises ValueError saying what is allowed). Without targets, the key is `ignored` (a warning
    says why) or `refused` (the error says what to use instead); with both targets and `refused`,
    it maps while thresher's schema has the targets and is refused otherwise. `same_as_thresher`:
    values of an ignored or refused key that are what thresher does anyway, accepted quietly.
    `also`: (thresher key, value) pairs set with the targets where the schema has the key, because
    the value means what it meant in lightly only with them (a learning rate, with its optimizer)."""
    targets: Tuple[str, ...] = ()
    convert: Optional[Callable[[Any], Any]] = None
    ignored: Optional[str] = None
    refused: Optional[str] = None
    same_as_thresher: Tuple[Any, ...] = ()
    also: Tuple[Tuple[str, Any], ...] = ()


def _model_name(value: Any) -> str:
    """lightly's `resnet-18` is torchvision's `resnet18` in thresher."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError("use a lightly model name such as resnet-18 or resnet-50")
    return value.strip().replace("-", "").lower()


def _device_for_gpus(value: Any) -> str:
    if is_int(value) and value in (0, 1):
        return "cpu" if value == 0 else "cuda"
    raise ValueError("use 0 (hardware.device=cpu) or 1 (hardware.device=cuda): thresher embeds and trains the "
                     "backbone on one device (the train stage uses N GPUs with hardware.nproc_per_node=N)")


_SSL_AUGMENTATION = ("thresher's self-supervised training has no ssl.{leaf} key; leave it out (its augmentations "
                     "are set for small images, app/sampling/ssl.py)")
_CALLBACKS = "thresher keeps checkpoints/ssl_backbone.pt for the self-supervised backbone"

# Every key of the lightly CLI's configuration (lightly 1.6: lightly/cli/config/config.yaml, its
# hydra.* keys aside), and what it becomes here.
LIGHTLY_RULES: Dict[str, Rule] = {
    "lightly.input_dir": Rule(refused="thresher reads the images named by data: use data=folder data.input_dir=PATH"),
    "lightly.output_dir": Rule(refused="thresher writes into the run directory: use work_dir=PATH or "
                                       "run_directory=NAME (dump_dataset=true copies the selected images to "
                                       "<run>/sampled/)"),
    "lightly.embeddings": Rule(("embeddings",)),
    "lightly.checkpoint": Rule(("checkpoint",)),
    "lightly.label_dir": Rule(refused="labels come from the data option: class folders (data=folder) or annotations "
                                     "(data=coco data.annotations=FILE)"),
    "lightly.label_names_file": Rule(refused="class names come from the data option: the class folders' names "
                                             "(data=folder) or the annotations' categories (data=coco)"),
    "lightly.pre_trained": Rule(refused="thresher downloads no weights: give checkpoint=PATH (backbone weights) or "
                                        "model.weights=<torchvision weights name in $TORCH_HOME>; without them the "
                                        "embedding starts from random weights, as lightly.pre_trained=false",
                                same_as_thresher=(False,)),
    "lightly.crop_padding": Rule(ignored="thresher embeds whole images, it crops no objects"),
    "lightly.model.name": Rule(("sampler.embedding_model",), convert=_model_name),
    "lightly.model.out_dim": Rule(("ssl.projection_dim",)),
    "lightly.model.num_ftrs": Rule(refused="thresher embeds with the backbone's own features (512 for resnet18, 2048 "
                                           "for resnet50), with no projection to another size: leave it out"),
    "lightly.model.width": Rule(refused="thresher's backbones are torchvision's, of width 1: leave it out",
                                same_as_thresher=(1,)),
    "lightly.criterion.temperature": Rule(("ssl.temperature",)),
    "lightly.criterion.memory_bank_size": Rule(refused="thresher's SimCLR uses no memory bank: leave it out",
                                               same_as_thresher=(0,)),
    # the lightly CLI trains with torch.optim.SGD: its learning rate and weight decay mean that optimizer's
    "lightly.optimizer.lr": Rule(("ssl.lr",), also=(("ssl.optimizer", "sgd"),)),
    "lightly.optimizer.weight_decay": Rule(("ssl.weight_decay",), also=(("ssl.optimizer", "sgd"),),
                                           refused="thresher's self-supervised training has no ssl.weight_decay "
                                                   "key: leave it out"),
    "lightly.collate.input_size": Rule(("data.image_size",)),
    **{f"lightly.collate.{leaf}": Rule((f"ssl.{leaf}",), refused=_SSL_AUGMENTATION.format(leaf=leaf))
       for leaf in ("cj_prob", "cj_bright", "cj_contrast", "cj_sat", "cj_hue", "min_scale", "random_gray_scale",
                    "gaussian_blur", "sigmas", "vf_prob", "hf_prob", "rr_prob", "rr_degrees")},
    "lightly.loader.batch_size": Rule(("sampler.batch_size", "ssl.batch_size")),
    "lightly.loader.shuffle": Rule(ignored="thresher shuffles the self-supervised training and embeds in file order"),
    "lightly.loader.num_workers": Rule(("hardware.num_workers",)),
    "lightly.loader.drop_last": Rule(ignored="thresher's self-supervised training drops the last incomplete batch, "
                                             "and the embedding keeps every image"),
    "lightly.trainer.gpus": Rule(("hardware.device",), convert=_device_for_gpus),
    "lightly.trainer.max_epochs": Rule(("ssl.epochs",)),
    "lightly.trainer.precision": Rule(ignored="thresher's self-supervised training and embedding run in full "
                                              "precision; trainer.amp=bf16 or fp16 sets the train stage's",
                                      same_as_thresher=(32, "32", "32-true")),
    "lightly.trainer.enable_model_summary": Rule(ignored="thresher prints no model summary"),
    "lightly.checkpoint_callback.save_last": Rule(ignored=_CALLBACKS),
    "lightly.checkpoint_callback.save_top_k": Rule(ignored=_CALLBACKS),
    "lightly.checkpoint_callback.dirpath": Rule(ignored=_CALLBACKS),
    "lightly.summary_callback.max_depth": Rule(ignored="thresher prints no model summary"),
    "lightly.environment_variable_names.lightly_last_checkpoint_path": Rule(
        ignored="thresher sets no environment variables: the run's summary.json names its files"),
    "lightly.environment_variable_names.lightly_last_embedding_path": Rule(
        ignored="thresher sets no environment variables: the run's summary.json names its files"),
    "lightly.seed": Rule(("seed",)),
}
LIGHTLY_CLI_KEYS = tuple(LIGHTLY_RULES)

# The Worker's `scorer_config` of its active-learning scorer (scorer=object-frequency).
SCORER_CONFIG_RULES: Dict[str, Rule] = {
    "scorer_config.frequency_penalty": Rule(("scorer.frequency_penalty",)),
    "scorer_config.min_score": Rule(("scorer.min_score",)),
}
WORKER_RULES: Dict[str, Rule] = {**LIGHTLY_RULES, **SCORER_CONFIG_RULES}


@dataclass
class Rewritten:
    """The command line Hydra gets, and what the rewrite did."""
    args: List[str]
    # (logging level, line): one line per Worker key, logged when the run's logging is set up.
    messages: List[Tuple[int, str]] = field(default_factory=list)
    # thresher key -> the Worker override that set it, to name it in a later error about the key.
    sources: Dict[str, str] = field(default_factory=dict)

    def explain(self, error: UserError) -> UserError:
        """`error`, naming the Worker override behind a thresher key that it complains about."""
        message = str(error)
        behind = [source for key, source in self.sources.items()
                  if re.search(rf"(?<![\w.]){re.escape(key)}=", message)]
        if not behind:
            return error
        explained = UserError(f"{message} (from {', '.join(dict.fromkeys(behind))})")
        explained.__cause__ = error
        return explained


def rewrite_worker_keys(args: Sequence[str]) -> Rewritten:
    """`args` with every `lightly.*` and `scorer_config.*` override replaced by the thresher
    overrides it means, in place; raises UserError for an unknown key, one thresher cannot honour,
    or a value that disagrees with the same thresher key given directly."""
    if not any(_WORKER_OVERRIDE.match(arg) for arg in args):
        return Rewritten(list(args))
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    given = _thresher_overrides(args, parser)
    result = Rewritten([])
    mapped: Dict[str, Tuple[Tuple, str]] = {}  # thresher key -> (its values, the Worker override)
    for arg in args:
        match = _WORKER_OVERRIDE.match(arg)
        if not match:
            result.args.append(arg)
            continue
        key, text = match["key"], match["value"]
        if "~" in match["prefix"]:
            raise UserError(f"{arg}: there is nothing to delete: leave {key} out")
        if key in NAMESPACES:
            raise UserError(f"{arg}: give {key}'s keys one by one, e.g. {NAMESPACES[key]}")
        rule = WORKER_RULES.get(key)
        if rule is None:
            raise UserError(_unknown(key))
        if text is None:
            raise UserError(f"{key}: give it a value, as {key}=VALUE")
        source = f"{key}={text}"
        override = _parse(parser, key, text)
        values = _values(override)
        targets = rule.targets if rule.targets and (not rule.refused or all(map(schema_has, rule.targets))) else ()
        if not targets:
            if values is not None and all(_same(v, rule.same_as_thresher) for v in values):
                result.messages.append((logging.INFO, f"{source}: what thresher does anyway, nothing to set"))
            elif rule.ignored:
                result.messages.append((logging.WARNING, f"{source}: ignored: {rule.ignored}"))
            else:
                raise UserError(f"{source}: thresher has no equivalent: {rule.refused}")
            continue
        overrides = []
        for position, target in enumerate(targets):
            if rule.convert is not None:
                target_values, target_text = _converted(source, override, values, rule.convert, target)
            elif position and override.is_sweep_override():  # swept together with the first target
                target_values, target_text = values, f"${{{targets[0]}}}"
            else:
                target_values, target_text = values, text
            overrides.append(f"{target}={target_text}")
            result.sources[target] = source
            if target in given:
                given_values, given_arg = given[target]
                if given_values != target_values or values is None:
                    raise UserError(f"{source} sets {target}={target_text}, and {given_arg} is given too: "
                                    f"give one of them")
                overrides.pop()
                continue
            if target in mapped and mapped[target][0] != target_values:
                raise UserError(f"{source} sets {target}={target_text}, and {mapped[target][1]} sets it "
                                f"otherwise: give one of them")
            if target in mapped:  # the same value twice: once is enough
                overrides.pop()
                continue
            mapped[target] = (target_values, source)
        for key_also, value_also in rule.also:
            if not schema_has(key_also):
                continue
            if key_also in given and given[key_also][0] != (value_also,):
                raise UserError(f"{source} means {key_also}={_text(value_also)} too (as in lightly), and "
                                f"{given[key_also][1]} is given: set {rule.targets[0]} instead")
            if key_also not in given and key_also not in mapped:
                overrides.append(f"{key_also}={_text(value_also)}")
                mapped[key_also] = ((value_also,), source)
        result.args.extend(overrides)
        shown = ", ".join(overrides) if overrides else "nothing more (the same value is set already)"
        result.messages.append((logging.INFO, f"{source} -> {shown}"))
    return result


def schema_has(key: str) -> bool:
    """Whether thresher's typed config has `key` (a dotted path through its dataclasses)."""
    from app.config import ThresherConfig

    node: Any = ThresherConfig
    for part in key.split("."):
        if not is_dataclass(node):
            return False
        found = {f.name: f for f in fields(node)}.get(part)
        if found is None:
            return False
        node = found.default_factory() if callable(found.default_factory) else found.default  # type: ignore[misc]
        node = type(node) if is_dataclass(node) else node
    return True


def _unknown(key: str) -> str:
    namespace = key.split(".", 1)[0]
    if namespace == "scorer_config":
        return (f"{key}: not a key of the Worker's scorer_config, which has "
                f"{' and '.join(SCORER_CONFIG_RULES)}{did_you_mean(key, SCORER_CONFIG_RULES)}")
    inside = [known for known in WORKER_RULES if known.startswith(f"{key}.")]
    if inside:
        return f"{key} is a group of keys: give them one by one, e.g. {inside[0]}=VALUE"
    if key.startswith("lightly.hydra."):
        return (f"{key}: the lightly CLI's Hydra settings have no use here: thresher's run directory is "
                f"work_dir=PATH and run_directory=NAME")
    return f"{key}: not a key of the lightly CLI{did_you_mean(key, LIGHTLY_CLI_KEYS)}"


def _parse(parser, key: str, text: str):
    from hydra.errors import OverrideParseException

    try:
        return parser.parse_override(f"{key}={text}")
    except OverrideParseException as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"could not parse the override {key}={text}: {first}") from None


def _values(override) -> Optional[Tuple]:
    """The values an override gives: one, or each of a `a,b` / choice(a,b) sweep; None for a
    sweep that lists no values (range, interval, glob)."""
    from hydra.core.override_parser.types import ChoiceSweep, Sweep

    value = override.value()
    if isinstance(value, ChoiceSweep):
        return tuple(_plain(v) for v in value.list)
    if isinstance(value, Sweep):
        return None
    return (_plain(value),)


def _plain(value: Any) -> Any:
    """A value that compares by what it is: lists and mappings as tuples."""
    if isinstance(value, dict):
        return tuple(sorted((k, _plain(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(_plain(v) for v in value)
    return value


def _same(value: Any, accepted: Tuple[Any, ...]) -> bool:
    return any(type(value) is type(a) and value == a for a in accepted)


def _converted(source: str, override, values: Optional[Tuple], convert: Callable[[Any], Any],
               target: str) -> Tuple[Tuple, str]:
    """The converted values and their override text: one value, or a sweep of them."""
    from hydra.core.override_parser.types import ChoiceSweep

    value = override.value()
    if values is None or (isinstance(value, ChoiceSweep) and (value.shuffle or value.tags)):
        raise UserError(f"{source}: a sweep of this kind cannot be converted: sweep {target} itself")
    try:
        converted = tuple(convert(v) for v in values)
    except ValueError as error:
        raise UserError(f"{source} is not allowed: {error}") from None
    text = ",".join(_text(v) for v in converted)
    if isinstance(value, ChoiceSweep) and not value.simple_form:
        text = f"choice({text})"
    return converted, text


def _text(value: Any) -> str:
    """`value` as Hydra's override grammar reads it back."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and not _BARE_VALUE.match(value):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(value)


def _thresher_overrides(args: Sequence[str], parser) -> Dict[str, Tuple[Optional[Tuple], str]]:
    """The thresher keys the command line sets directly: key -> (its values, the override)."""
    given: Dict[str, Tuple[Optional[Tuple], str]] = {}
    for arg in args:
        if _WORKER_OVERRIDE.match(arg) or not _PLAIN_OVERRIDE.match(arg):
            continue
        try:
            override = parser.parse_override(arg)
        except Exception:  # Hydra reports it, with thresher's explanation, when it composes
            continue
        given[override.key_or_group] = (_values(override), arg)
    return given
