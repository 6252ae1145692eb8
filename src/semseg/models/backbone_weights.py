"""Pretrained (ImageNet or zoo) weights for any backbone, in one place.

Every backbone family loads its weights through :func:`load_pretrained`: the state dict is read
once, without running code from the file (``backbone.weights``: ``.safetensors`` or
``.pth``), or downloaded as the file that timm's ``pretrained_cfg`` of the model names (Hub or
URL; only the local cache under ``HF_HUB_OFFLINE=1``); no model is built for it. What differs
between families is declared as data, as timm's ``pretrained_cfg`` + ``filter_fn`` do
(:class:`PretrainedWeights`): the layouts their files come in (timm's, mmseg's, mmcls's), each a
key map that renames or drops keys, and a ``filter_fn`` for tensors that follow the module (a
ViT's position embeddings). One report (:func:`semseg.models.build.load_weights`) names every
missing, unexpected, misshapen or unmapped key of every path in one WeightsError line.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants
import huggingface_hub.errors
import safetensors
import safetensors.torch
import torch
from torch import Tensor, nn

from semseg.checkpoints.file import torch_load_weights_only
from semseg.errors import CheckpointError, UserError
from semseg.models.build import load_weights
from semseg.models.mmseg_conversion import Rule, rename_keys

log = logging.getLogger(__name__)
# What the hub and torch.hub raise when weights cannot be fetched or read from the cache.
_HUB_ERRORS = (huggingface_hub.errors.HfHubHTTPError, huggingface_hub.errors.OfflineModeIsEnabled,
               huggingface_hub.errors.LocalEntryNotFoundError, OSError, RuntimeError)  # fmt: skip
KEEP = r"\g<0>"  # a key map's replacement that keeps the key as it is


class WeightsError(UserError):
    """Pretrained backbone weights are missing, unreachable or do not fit."""


def rules(*pairs: tuple[str, str | None]) -> tuple[Rule, ...]:
    """A key map from ``(regex, replacement)`` pairs; each regex matches the whole key."""
    return tuple((re.compile(rf"^(?:{pattern})$"), repl) for pattern, repl in pairs)


@dataclass(frozen=True)
class Layout:
    """One layout that a backbone's weights come in: how a state dict in it is recognised and
    renamed to the backbone's keys.

    Attributes:
        what: the layout in messages ("timm's ViT", "an mmcls/mmpretrain ConvNeXt").
        key_map: rules, or a function of the backbone that makes them (keys that follow
            the module, e.g. a timm ``features_only`` model's flattened names).
        marker: a regex that some key of a state dict in this layout matches (None: any).
        prepare: applied before the key map (e.g. tensors that another layout orders differently).
    """

    what: str
    key_map: Sequence[Rule] | Callable[[nn.Module], Sequence[Rule]]
    marker: str | None = None
    prepare: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None

    def matches(self, state: Mapping[str, Tensor]) -> bool:
        return self.marker is None or any(re.match(self.marker, key) for key in state)

    def rename(
        self, state: Mapping[str, Tensor], module: nn.Module
    ) -> tuple[dict[str, Tensor], list[str]]:
        """``state`` under ``module``'s keys, and the keys no rule matches."""
        state = self.prepare(dict(state)) if self.prepare else dict(state)
        key_map = self.key_map(module) if callable(self.key_map) else self.key_map
        return rename_keys(state, key_map)


@dataclass(frozen=True)
class PretrainedWeights:
    """What a backbone family's weights need, as data (timm's ``pretrained_cfg`` + ``filter_fn``).

    Attributes:
        layouts: the layouts its files come in; the first whose marker a state dict matches
            reads it.
        filter_fn: ``(renamed state, backbone) -> state`` for tensors that follow the backbone's
            configuration (timm's ``filter_fn``).
        optional: prefixes of the backbone's keys that a file may lack (they keep their init).
        hint: what a file that does not fit should be, appended to the error (``{name}``: the
            timm model's name).
    """

    layouts: tuple[Layout, ...]
    filter_fn: Callable[[dict[str, Tensor], nn.Module], dict[str, Tensor]] | None = None
    optional: tuple[str, ...] = ()
    hint: str = ""


def timm_features_key_map(features: nn.Module, prefix: str = "") -> list[Rule]:
    """timm's classification keys -> its ``features_only`` model's under ``prefix`` (the
    feature wrapper flattens a Sequential's children: ``stages.0.`` -> ``stages_0.``; the getter
    wrapper keeps the classification model, pruned after the last tap, under ``model.``). Keys of
    the modules the features model leaves out (the classifier, stages after the last tap) are
    dropped, as timm's own ``features_only`` loading drops them."""
    # timm is imported where it is used: importing it imports wandb when installed (start-up time)
    from timm.models._features import FeatureGetterNet

    if isinstance(features, FeatureGetterNet):  # its own keys, the pruned ones dropped
        own = features.model.state_dict()
        key_map = [(re.compile(rf"^{re.escape(k)}$"), f"{prefix}model.{k}") for k in own]
        return [*key_map, (re.compile(""), None)]
    key_map = []
    for top in dict.fromkeys(key.split(".")[0] for key in features.state_dict()):
        flat = re.fullmatch(r"(.+)_(\d+)", top)
        names = [f"{flat[1]}.{flat[2]}", top] if flat else [top]
        key_map += [(re.compile(rf"^{re.escape(n)}(?=\.|$)"), prefix + top) for n in names]
    return [*key_map, (re.compile(""), None)]


def backbone_part(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The backbone of a whole model's state dict (keys under ``backbone.``, prefix removed, as in
    mmseg/mmcls checkpoints); any other state dict as it is."""
    if not any(key.startswith("backbone.") for key in state):
        return dict(state)
    return {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}


def _read_state_dict(path: Path, label: str) -> Mapping[str, Tensor]:
    """The tensors of a ``.safetensors`` file, or of a ``.pth``/``.pt`` file loaded without
    running code from it (a training checkpoint's ``state_dict``/``model`` entry)."""
    try:
        if path.suffix == ".safetensors":
            return safetensors.torch.load_file(path, device="cpu")
        state = torch_load_weights_only(path, label=label)
    except CheckpointError as e:
        raise WeightsError(str(e)) from e
    except safetensors.SafetensorError as e:
        raise WeightsError(f"{label}: cannot read the safetensors file ({e})") from e
    for entry in ("state_dict", "model"):  # a training checkpoint around the state dict
        if isinstance(state, Mapping) and isinstance(state.get(entry), Mapping):
            state = state[entry]
    if not isinstance(state, Mapping):
        raise WeightsError(f"{label} holds a {type(state).__name__}, not a state dict")
    return state


def read_weights_file(path: str | os.PathLike, name: str) -> tuple[Mapping[str, Tensor], str]:
    """The state dict in ``backbone.weights=path`` (weights of backbone ``name``) and the label
    that names it in messages; a missing or unreadable file is a WeightsError."""
    path = Path(path)
    label = f"backbone.weights={path}"
    if not path.is_file():
        raise WeightsError(
            f"{label}: file not found. Point backbone.weights at the ImageNet "
            f"weights of '{name}' (.safetensors or .pth) or set backbone.pretrained=false."
        )
    return _read_state_dict(path, label), label


def read_hub_weights(name: str) -> tuple[Mapping[str, Tensor], str]:
    """The ImageNet weights of timm model ``name`` (the file its ``pretrained_cfg`` names: the Hub,
    else a URL), downloaded or from the cache without building the model, and the label that
    names them. With the hub's offline setting (``HF_HUB_OFFLINE=1``) only a cached copy is used,
    so a machine without network fails at once instead of retrying."""
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise WeightsError(
            f"backbone.pretrained=true but timm has no ImageNet weights for '{name}'. Set "
            "backbone.weights=/path/to/imagenet.safetensors or backbone.pretrained=false."
        )
    offline = huggingface_hub.constants.is_offline_mode()
    if not offline:
        log.info("backbone %s: fetching ImageNet weights (HF_HUB_OFFLINE=1: cache only)", name)
    try:
        if cfg.hf_hub_id:
            hub_file = {"filename": cfg.hf_hub_filename} if cfg.hf_hub_filename else {}
            state = timm.models.load_state_dict_from_hf(cfg.hf_hub_id, **hub_file)
        else:
            state = torch.hub.load_state_dict_from_url(
                cfg.url, map_location="cpu", weights_only=True
            )
    except _HUB_ERRORS as e:
        where = "no cached copy and HF_HUB_OFFLINE=1" if offline else "download failed"
        raise WeightsError(
            f"backbone.pretrained=true for '{name}' but its ImageNet weights are unavailable "
            f"({where}: {type(e).__name__}). Set backbone.weights=/path/to/imagenet.safetensors "
            "or backbone.pretrained=false."
        ) from None
    return state, f"the hub weights of {name}"


def load_pretrained(
    module: nn.Module,
    spec: PretrainedWeights,
    name: str,
    pretrained: bool,
    weights: str | os.PathLike | None = None,
) -> None:
    """Load the pretrained weights of backbone ``module`` (timm model ``name``): from the file
    ``weights``, else from the hub; read, then renamed by the first of ``spec``'s layouts that
    fits, filtered, and loaded with one report of every key that does not fit (WeightsError).
    With ``pretrained`` false a given file is ignored with a warning."""
    if not pretrained:
        if weights is not None:
            log.warning("backbone.weights=%s ignored: backbone.pretrained=false", weights)
        return
    state, label = read_hub_weights(name) if weights is None else read_weights_file(weights, name)
    if not state:
        raise WeightsError(
            f"{label} holds no tensors: point it at the ImageNet weights of '{name}'"
        )
    state = backbone_part(state)
    layout = next((lay for lay in spec.layouts if lay.matches(state)), spec.layouts[-1])
    renamed, unmapped = layout.rename(state, module)
    if spec.filter_fn is not None:
        renamed = spec.filter_fn(renamed, module)

    def describe(problems: str, _: list[str]) -> str:
        fit = f"is not {layout.what} that fits" if unmapped else "does not fit"
        return f"{label} {fit} backbone '{name}' ({problems}){spec.hint.format(name=name)}"

    load_weights(module, renamed, describe, WeightsError, spec.optional, unmapped)
    log.info("backbone %s: pretrained weights from %s (%s)", name, label, layout.what)
