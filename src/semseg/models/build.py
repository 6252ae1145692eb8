"""Whole models: build one from a config, load weights into it strictly, rebuild it from a
checkpoint of this project (for inference: without its training-only auxiliary head)."""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from semseg.checkpoints.model_folder import load_model_checkpoint
from semseg.errors import CheckpointError, UserError
from semseg.models.base import AUX_HEAD, unwrap_model

log = logging.getLogger(__name__)

# Prefixes that wrappers add to state-dict keys: DDP and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Semantic FPN checkpoints saved before it was an encoder-decoder (torchvision's FPN, its own head)
# -> today's keys: old prefix -> new prefix.
_LEGACY_SEMANTIC_FPN = (
    ("fpn.inner_blocks.", "neck.lateral_convs."),
    ("fpn.layer_blocks.", "neck.fpn_convs."),
    ("heads.", "decode_head.scale_heads."),
    ("classifier.", "decode_head.classifier."),
)
_MAX_LISTED = 12


def build_model(cfg: DictConfig | Mapping) -> nn.Module:
    """The model of a composed config: ``cfg.model`` with ``backbone=cfg.backbone``.

    Our own clear errors (bad weights, strides) surface as themselves, not wrapped by Hydra.
    """
    cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))
    try:
        return instantiate(cfg.model, backbone=instantiate(cfg.backbone))
    except InstantiationException as e:
        if isinstance(e.__cause__, (UserError, ValueError)):
            raise e.__cause__ from None
        raise


def strip_wrapper_prefixes(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The state dict without the ``module.`` (DDP) / ``_orig_mod.`` (torch.compile) prefixes,
    in either nesting (a compiled DDP model, a DDP-wrapped compiled one)."""
    out = OrderedDict(state_dict)  # torch strips in place
    for prefix in (*_WRAPPER_PREFIXES, *_WRAPPER_PREFIXES):
        consume_prefix_in_state_dict_if_present(out, prefix)
    return dict(out)


def upgrade_legacy_keys(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``state_dict`` with the keys of an older layout (Semantic FPN before it was an
    encoder-decoder) renamed to today's; any other state dict unchanged."""
    if not any(k.startswith("fpn.inner_blocks.") for k in state_dict):
        return dict(state_dict)
    out = {}
    for key, value in state_dict.items():
        old, new = next((p for p in _LEGACY_SEMANTIC_FPN if key.startswith(p[0])), ("", ""))
        out[new + key[len(old) :]] = value
    return out


def listing(title: str, items: list[str]) -> str:
    """``title (n): a, b, ...`` with at most a dozen items named."""
    more = f", ... (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return f"{title} ({len(items)}): {', '.join(items[:_MAX_LISTED])}{more}"


def describe_key_mismatch(
    mismatched: list[str], missing: list[str], unexpected: list[str], unmapped: Sequence[str] = ()
) -> str:
    """``keys without a mapping (n): ...; shape mismatches (n): ...; missing keys (n): ...;
    unexpected keys (n): ...`` ("" if none)."""
    parts = (
        ("keys without a mapping", list(unmapped)),
        ("shape mismatches", mismatched),
        ("missing keys", missing),
        ("unexpected keys", unexpected),
    )
    return "; ".join(listing(title, items) for title, items in parts if items)


def load_weights(
    module: nn.Module,
    state_dict: Mapping[str, Tensor],
    describe: Callable[[str, list[str]], str],
    error: type[UserError] = CheckpointError,
    optional: tuple[str, ...] = (),
    unmapped: Sequence[str] = (),
) -> None:
    """Load ``state_dict`` into ``module`` with ``load_state_dict`` and act on its report: any
    missing key (except those under the ``optional`` prefixes), unexpected key or shape mismatch,
    or any key of the source that a key map could not rename (``unmapped``), raises
    ``error(describe(problems, mismatched_keys))``, every key listed in one line. The tensors
    whose shapes fit are loaded before that (the caller stops anyway)."""
    own = module.state_dict()
    mismatched = [k for k, v in state_dict.items() if k in own and v.shape != own[k].shape]
    fitting = {k: v for k, v in state_dict.items() if k not in mismatched}
    report = module.load_state_dict(fitting, strict=False)
    missing = [k for k in report.missing_keys if k not in mismatched and not k.startswith(optional)]
    shapes = [
        f"{k} {tuple(state_dict[k].shape)} in file vs {tuple(own[k].shape)} in model"
        for k in mismatched
    ]
    if problems := describe_key_mismatch(
        shapes, missing, list(report.unexpected_keys), list(unmapped)
    ):
        raise error(describe(problems, mismatched))


def load_model_weights(model: nn.Module, state_dict: Mapping[str, Tensor], source: str) -> None:
    """Load a whole model's ``state_dict`` into ``model`` strictly (:func:`load_weights`); a
    CheckpointError names ``source`` and, where it is the cause, the class counts."""
    target = unwrap_model(model)
    state_dict = upgrade_legacy_keys(strip_wrapper_prefixes(state_dict))
    cls_key = next((k for k in target.state_dict() if k.endswith("classifier.weight")), "")

    def describe(problems: str, mismatched: list[str]) -> str:
        hint = "the architecture (model/backbone config) or the class count differs"
        if cls_key in mismatched:
            n_file, n_model = state_dict[cls_key].shape[0], target.state_dict()[cls_key].shape[0]
            hint = (
                f"the weights have {n_file} classes, the model {n_model} "
                "(dataset.num_classes / model.num_classes)"
            )
        return f"weights from {source} do not fit the model ({hint}): {problems}"

    load_weights(target, state_dict, describe)


def fit_aux_head(model: nn.Module, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``state_dict`` with its auxiliary-head weights made to follow the model: dropped when the
    model has no auxiliary head; the model's own (fresh) ones added when the state dict has none."""
    target, prefix = unwrap_model(model), f"{AUX_HEAD}."
    state = strip_wrapper_prefixes(state_dict)
    if getattr(target, AUX_HEAD, None) is None:
        return {k: v for k, v in state.items() if not k.startswith(prefix)}
    if not any(k.startswith(prefix) for k in state):
        log.info("the weights have no auxiliary head: %s starts from its initialisation", AUX_HEAD)
        state |= {k: v for k, v in target.state_dict().items() if k.startswith(prefix)}
    return state


def load_start_weights(model: nn.Module, weights: str | os.PathLike) -> None:
    """Start from the weights of a checkpoint of this project (``model.weights=``: a file, a model
    folder or ``hf://``), strictly,
    except for the auxiliary head, which follows the model config (:func:`fit_aux_head`)."""
    state = load_model_checkpoint(weights)["model"]
    load_model_weights(model, fit_aux_head(model, state), source=f"model.weights={weights}")


def model_from_checkpoint(
    path_or_state: str | os.PathLike | Mapping[str, Any],
    map_location: str | torch.device = "cpu",
    source: str | None = None,
) -> tuple[nn.Module, dict, dict]:
    """Rebuild the model stored in a checkpoint of this project (a file, a model folder or
    ``hf://<org>/<name>[@<revision>]``, see :mod:`semseg.checkpoints.model_folder`): ``(model, meta, config)``.

    The architecture comes from the checkpoint's config (backbone without pretrained weights),
    without the auxiliary head, which only training uses; the weights are loaded strictly. The
    model is returned in eval mode.
    """
    if isinstance(path_or_state, Mapping):  # ``source`` names it in messages
        state, source = path_or_state, source or "the given checkpoint"
    else:
        state, source = (
            load_model_checkpoint(path_or_state, map_location=map_location),
            str(path_or_state),
        )
    config = state.get("config") or {}
    if "model" not in config or "backbone" not in config:
        raise CheckpointError(
            f"{source} carries no model/backbone config, so the model cannot be rebuilt; "
            "convert it with scripts/convert_mmseg_checkpoint.py or save it with this project's trainer"
        )
    model_cfg = {**config["model"], "weights": None}
    if model_cfg.get(AUX_HEAD) is not None:
        model_cfg[AUX_HEAD] = None
    cfg = OmegaConf.create(
        {
            "model": model_cfg,
            "backbone": {**config["backbone"], "pretrained": False, "weights": None},
        }
    )
    check_buildable(cfg, source)
    model = build_model(cfg)
    load_model_weights(model, fit_aux_head(model, state["model"]), source=source)
    if not state.get("meta"):
        raise CheckpointError(
            f"{source} carries no meta (class names, palette), so its predictions cannot be named; "
            "save it with this project's trainer or scripts/convert_mmseg_checkpoint.py"
        )
    meta = dict(state["meta"])
    return model.to(map_location).eval(), meta, dict(config)


def check_buildable(cfg: DictConfig, source: str) -> None:
    """Refuse a model config read from a file whose ``_target_`` entries name anything but a layer:
    an ``nn.Module`` class of torch.nn or of this project's models, or a function of this project's
    models declared to return one. Building runs what they name, and a file must not be able to
    make the loader call any other function (write a file, start a process)."""
    for where, target in _targets(OmegaConf.to_container(cfg, resolve=False)):
        if not _builds_a_layer(target):
            raise CheckpointError(
                f"{source}: {where}._target_={target} is not a model class of this project or a "
                "torch.nn layer, so the model is not built from it (the file may not be what it "
                "claims to be)"
            )


def _targets(tree: Any, where: str = "") -> list[tuple[str, str]]:
    if isinstance(tree, Mapping):
        found = [(where or "config", str(tree["_target_"]))] if "_target_" in tree else []
        for key, value in tree.items():
            found += _targets(value, f"{where}.{key}" if where else str(key))
        return found
    if isinstance(tree, list):
        return [t for i, value in enumerate(tree) for t in _targets(value, f"{where}[{i}]")]
    return []


def _builds_a_layer(target: str) -> bool:
    import inspect
    import typing

    from hydra.utils import get_object

    # Checked by name first: importing a module outside these packages could run its code.
    if not target.startswith(("semseg.models.", "torch.nn.")):
        return False
    try:
        obj = get_object(target)
    except Exception:  # not importable: instantiate would fail too, say so here
        return False
    if inspect.isclass(obj):
        return issubclass(obj, nn.Module)
    if not target.startswith("semseg.models.") or not inspect.isfunction(obj):
        return False
    try:
        returned = typing.get_type_hints(obj).get("return")
    except Exception:  # unresolvable annotations: not declared to build a layer
        return False
    return inspect.isclass(returned) and issubclass(returned, nn.Module)
