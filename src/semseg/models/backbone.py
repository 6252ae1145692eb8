"""Any timm model that returns multi-scale features, as a backbone with strides 4/8/16/32.

The taps are chosen from timm's ``feature_info`` by reduction (their indices differ between
models), and ImageNet weights load from a local file without touching the network.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import socket
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from unittest import mock
from urllib.parse import urlparse

import timm
import torch
from torch import Tensor, nn

from semseg.models.weights import BackboneStrideError, WeightsError

log = logging.getLogger(__name__)

# How long the hub reachability probe may take before the machine counts as offline.
HUB_PROBE_TIMEOUT_S = 3.0
# timm loads pretrained weights non-strictly for features_only models and only logs what did not
# load; these patterns read that report back so that a wrong file is an error, not a random init.
_TIMM_BUILDER_LOGGER = "timm.models._builder"
_REPORT_RES = {
    "missing": re.compile(r"Missing keys \((.*)\) discovered"),
    "unexpected": re.compile(r"Unexpected keys \((.*)\) found"),
}


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """True when the Hugging Face hub answers a TCP connect within ``timeout`` seconds.

    Runs in a daemon thread because DNS resolution ignores socket timeouts and can block long.
    """
    import huggingface_hub.constants as hf_constants

    if hf_constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "0").lower() in (
        "1",
        "true",
        "yes",
        "on",
    ):
        return False
    url = urlparse(hf_constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or 443
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Make huggingface_hub use its cache only (it reads HF_HUB_OFFLINE once, at import)."""
    import huggingface_hub.constants as hf_constants

    with (
        mock.patch.dict(os.environ, {"HF_HUB_OFFLINE": "1"}),
        mock.patch.object(hf_constants, "HF_HUB_OFFLINE", True),
    ):
        yield


def _feature_reductions(name: str, kwargs: dict) -> list[int]:
    """Reductions of all feature taps of ``name``, read from a model built on the meta device."""
    try:
        # meta: no memory, no init cost; only the feature_info metadata is wanted.
        with torch.device("meta"):
            probe = timm.create_model(name, pretrained=False, features_only=True, **kwargs)
    except Exception:  # a model whose __init__ needs real tensors
        probe = timm.create_model(name, pretrained=False, features_only=True, **kwargs)
    return list(probe.feature_info.reduction())


def _pick_out_indices(
    name: str, reductions: Sequence[int], out_strides: Sequence[int]
) -> list[int]:
    """Indices of the feature taps whose reduction equals each requested stride."""
    by_reduction = {r: i for i, r in enumerate(reductions)}  # the deepest tap wins on duplicates
    missing = [s for s in out_strides if s not in by_reduction]
    if missing:
        raise BackboneStrideError(
            f"backbone '{name}' has no feature map at stride(s) {missing}: its features_only taps "
            f"have reductions {list(reductions)}; Semantic FPN needs strides {list(out_strides)}. "
            "Pick another backbone (conf/backbone/) or set backbone.out_strides."
        )
    return [by_reduction[s] for s in out_strides]


class TimmBackbone(nn.Module):
    """timm ``features_only`` model returning the feature maps at ``out_strides`` (default C2..C5).

    Args:
        name: timm model name, e.g. ``resnet50``, ``resnet50c``, ``convnext_tiny``.
        pretrained: load ImageNet weights.
        weights: local ``.safetensors``/``.pth`` file with the timm model's state dict; with
            ``pretrained=True`` and no file, the timm hub is used only if it is reachable.
        out_strides: strides of the returned maps.
        **timm_kwargs: passed to ``timm.create_model`` (e.g. ``drop_path_rate``).
    """

    def __init__(
        self,
        name: str,
        pretrained: bool = False,
        weights: str | os.PathLike | None = None,
        out_strides: Sequence[int] = (4, 8, 16, 32),
        **timm_kwargs,
    ) -> None:
        super().__init__()
        self.name = name
        out_strides = [int(s) for s in out_strides]
        reductions = _feature_reductions(name, timm_kwargs)
        out_indices = _pick_out_indices(name, reductions, out_strides)
        create = functools.partial(
            timm.create_model, name, features_only=True, out_indices=out_indices, **timm_kwargs
        )
        if pretrained and weights is not None:
            self.model = _create_from_file(create, name, Path(weights))
        elif pretrained:
            self.model = _create_from_hub(create, name)
        else:
            if weights is not None:
                log.warning("backbone.weights=%s ignored: backbone.pretrained=false", weights)
            self.model = create(pretrained=False)
        self.out_channels: list[int] = list(self.model.feature_info.channels())
        self.out_strides: list[int] = list(self.model.feature_info.reduction())

    def forward(self, x: Tensor) -> list[Tensor]:
        """Feature maps, highest resolution first."""
        return list(self.model(x))


class _LoadReport(logging.Handler):
    """Collects the keys timm reports as missing/unexpected while loading pretrained weights."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.keys: dict[str, list[str]] = {"missing": [], "unexpected": []}

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        for kind, pattern in _REPORT_RES.items():
            if match := pattern.search(message):
                self.keys[kind] += [k.strip() for k in match.group(1).split(",") if k.strip()]


@contextlib.contextmanager
def _timm_load_report() -> Iterator[_LoadReport]:
    logger = logging.getLogger(_TIMM_BUILDER_LOGGER)
    report, level, propagate = _LoadReport(), logger.level, logger.propagate
    logger.setLevel(logging.INFO)
    logger.propagate = False  # the report becomes our error (or our log line), not timm's
    logger.addHandler(report)
    try:
        yield report
    finally:
        logger.removeHandler(report)
        logger.setLevel(level)
        logger.propagate = propagate


def _classifier_prefixes(name: str) -> tuple[str, ...]:
    """State-dict prefixes of the classifier, which features_only models drop on purpose."""
    cfg = timm.models.get_pretrained_cfg(name)
    classifier = (cfg.classifier if cfg is not None else None) or ()
    names = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    return tuple(f"{c}." for c in names)


def _create_from_file(create: functools.partial, name: str, path: Path) -> nn.Module:
    """Build with weights from a local file (timm loads it before the feature wrapper)."""
    if not path.is_file():
        raise WeightsError(
            f"backbone.weights={path}: file not found. Point backbone.weights at the ImageNet "
            f"weights of '{name}' (.safetensors or .pth) or set backbone.pretrained=false."
        )
    try:
        with _hub_offline(), _timm_load_report() as report:
            model = create(pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    except Exception as e:
        raise WeightsError(
            f"backbone.weights={path} does not fit backbone '{name}': {type(e).__name__}: "
            f"{str(e)[:500]}"
        ) from e
    classifier = _classifier_prefixes(name)
    missing = [k for k in report.keys["missing"] if not k.startswith(classifier)]
    problems = {"missing": missing, "unexpected": report.keys["unexpected"]}
    if any(problems.values()):
        listed = "; ".join(
            f"{len(keys)} {kind} keys: {', '.join(keys[:8])}{', ...' if len(keys) > 8 else ''}"
            for kind, keys in problems.items()
            if keys
        )
        raise WeightsError(
            f"backbone.weights={path} does not fit backbone '{name}' ({listed}). Save the "
            f"state dict of timm.create_model('{name}') (not features_only) to that file."
        )
    log.info("backbone %s: ImageNet weights from %s", name, path)
    return model


def _create_from_hub(create: functools.partial, name: str) -> nn.Module:
    """Build with weights from the timm hub; offline, only a cached copy is used, at once."""
    online = hub_reachable()
    try:
        with contextlib.nullcontext() if online else _hub_offline():
            return create(pretrained=True)
    except Exception as e:
        where = "download failed" if online else "no network and no cached copy"
        raise WeightsError(
            f"backbone.pretrained=true for '{name}' but its ImageNet weights are unavailable "
            f"({where}: {type(e).__name__}). Set backbone.weights=/path/to/imagenet.safetensors "
            "or backbone.pretrained=false."
        ) from e
