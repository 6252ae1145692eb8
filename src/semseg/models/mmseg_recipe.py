"""The test recipe of an mmseg checkpoint: what its zoo row is tested with, as config overrides of
the converted checkpoint (``model.align_corners``, ``inference.*``, ``dataset.test_pipeline.scale``,
``inference.precision``), so that the converted file predicts like the row with no flags.

Read, in this order, from:

- the config the file carries: mmseg 0.x writes its text to ``meta['config']`` (class names and
  palette to ``meta['CLASSES']`` / ``meta['PALETTE']``), mmseg 1.x (mmengine) to ``meta['cfg']``
  (and ``meta['dataset_meta']``). The text is parsed (``ast``), never run: only literal values
  are read (the decode head's ``align_corners``, the model's ``test_cfg``, the test pipeline's
  scale: ``img_scale`` in 0.x, ``scale`` in 1.x; fp16: 0.x's ``fp16``, 1.x's ``TestLoop(fp16=True)``);
- the zoo's file name, for files without ``meta`` (the zoo's published ones, bdd100k-models #15):
  ``..._769x769_...`` rows test with 769x769 sliding windows at stride 513 at 1281x721 with
  ``align_corners=True``, ``..._fp16_...`` rows in fp16;
- else the zoo's 512x1024 recipe: the whole image at 1280x720, fp32.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ZOO_SCALE = (1280, 720)  # (w, h): the 512x1024 rows' test scale
ROW_769_SCALE = (1281, 721)  # sem_seg/configs/_base_/datasets/bdd100k.py of the 769x769 rows
ROW_769_WINDOWS = {"crop_size": (769, 769), "stride": (513, 513)}  # (h, w): their test_cfg


@dataclass(frozen=True)
class MmsegRecipe:
    """How an mmseg row is tested; ``source`` says where that was read."""

    source: str
    align_corners: bool = False
    mode: str = "whole"
    crop_size: tuple[int, int] | None = None  # (h, w) windows of mode "slide"
    stride: tuple[int, int] | None = None
    scale: tuple[int, int] = ZOO_SCALE  # (w, h) each image is fitted into
    precision: str = "fp32"
    class_names: tuple[str, ...] | None = None  # the file's own, where it has them
    palette: tuple[tuple[int, int, int], ...] | None = None

    def overrides(self) -> list[str]:
        """The config overrides of the converted checkpoint that record this recipe."""
        out = ["model.align_corners=true"] if self.align_corners else []
        out += [f"inference.mode={self.mode}", f"inference.precision={self.precision}"]
        if self.mode == "slide":
            out += [f"inference.{key}=[{h},{w}]" for key, (h, w) in self.windows.items()]
        return [*out, "dataset.test_pipeline.scale=[{},{}]".format(*self.scale)]

    @property
    def windows(self) -> dict[str, tuple[int, int]]:
        """The slide windows it names (none given: conf/inference's)."""
        windows = {"crop_size": self.crop_size, "stride": self.stride}
        return {k: v for k, v in windows.items() if v is not None and self.mode == "slide"}


DEFAULT_SOURCE = "the zoo's 512x1024 recipe (the default)"
ROW_769 = MmsegRecipe("", True, "slide", scale=ROW_769_SCALE, **ROW_769_WINDOWS)


def mmseg_recipe(checkpoint: Mapping[str, Any], filename: str) -> MmsegRecipe:
    """The recipe of an mmseg checkpoint (a whole mmcv/mmengine file) named ``filename``: from
    the config in its ``meta``, else from the zoo's file name, else the 512x1024 recipe."""
    meta = checkpoint.get("meta")
    meta = meta if isinstance(meta, Mapping) else {}
    names, palette = _class_names_and_palette(meta)
    for key, version in (("config", "mmseg 0.x"), ("cfg", "mmseg 1.x")):
        text = meta.get(key)
        if isinstance(text, str) and text.strip():
            recipe = recipe_from_config_text(text, f"the file's meta['{key}'] ({version})")
            return _with_classes(recipe, names, palette)
    return _with_classes(recipe_from_filename(filename), names, palette)


def recipe_from_filename(filename: str) -> MmsegRecipe:
    """The zoo's row from its file name: ``_769x769_`` and ``_fp16_`` are the clues."""
    name = Path(filename).name
    fp16 = re.search(r"(?:^|[_\-.])fp16(?:[_\-.]|$)", name) is not None
    precision = "fp16" if fp16 else "fp32"
    if re.search(r"(?<!\d)769x769(?!\d)", name):
        return replace(
            ROW_769, source=f"the file name {name!r} (a 769x769 row)", precision=precision
        )
    if fp16:
        return MmsegRecipe(f"the file name {name!r} (an fp16 row)", precision=precision)
    return MmsegRecipe(DEFAULT_SOURCE)


def recipe_from_config_text(text: str, source: str) -> MmsegRecipe:
    """The recipe in an mmseg config's text (mmcv's / mmengine's ``pretty_text``): its literal
    values only; what it does not say is the 512x1024 recipe's."""
    try:
        tree = ast.parse(text)
    except SyntaxError as e:
        return MmsegRecipe(f"{DEFAULT_SOURCE}; {source} is not readable: {e.msg}")
    top = {
        target.id: _literal(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    model = _dict(top.get("model"))
    head = model.get("decode_head")
    head = _dict(head[-1] if isinstance(head, list) and head else head)  # cascade: the last
    test_cfg = _dict(model.get("test_cfg"))
    mode = str(test_cfg.get("mode") or "whole")
    windows = {k: _pair(test_cfg.get(k)) for k in ("crop_size", "stride")}
    fp16 = top.get("fp16") is not None or bool(_dict(top.get("test_cfg")).get("fp16"))
    return MmsegRecipe(
        source=source,
        align_corners=bool(head.get("align_corners", False)),
        mode=mode,
        scale=_test_scale(top) or ZOO_SCALE,
        precision="fp16" if fp16 else "fp32",
        **windows,
    )


def _test_scale(top: Mapping[str, Any]) -> tuple[int, int] | None:
    """The (w, h) of the test pipeline's resize: 0.x ``MultiScaleFlipAug(img_scale=...)``, 1.x
    ``Resize(scale=...)``; in ``test_pipeline`` or the test dataset's ``pipeline``."""
    pipelines = [
        top.get("test_pipeline"),
        _dict(_dict(top.get("data")).get("test")).get("pipeline"),  # 0.x
        _dict(_dict(top.get("test_dataloader")).get("dataset")).get("pipeline"),  # 1.x
    ]
    for pipeline in pipelines:
        for step in _steps(pipeline):
            for key in ("img_scale", "scale"):
                scale = _pair(step.get(key))
                if scale is not None:
                    return scale
    return None


def _steps(pipeline: Any) -> list[dict[str, Any]]:
    """The transforms of a pipeline, the nested ones (``transforms=[...]``) after their parent."""
    steps: list[dict[str, Any]] = []
    for step in pipeline if isinstance(pipeline, list) else []:
        if isinstance(step, dict):
            steps += [step, *_steps(step.get("transforms"))]
    return steps


def _literal(node: ast.AST) -> Any:
    """A config value from its syntax: constants, lists, tuples, dicts and ``dict(...)`` calls;
    anything else (names, expressions) is None: nothing in the text runs."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        value = _literal(node.operand)
        return -value if isinstance(value, int | float) else None
    if isinstance(node, ast.List | ast.Tuple):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values) if k is not None}
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict":
        return {kw.arg: _literal(kw.value) for kw in node.keywords if kw.arg is not None}
    return None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _pair(value: Any) -> tuple[int, int] | None:
    """Two integers (a crop size, stride or scale), else None (e.g. a list of scales)."""
    if isinstance(value, list) and len(value) == 2 and all(type(v) is int for v in value):
        return (value[0], value[1])
    return None


def _class_names_and_palette(meta: Mapping[str, Any]) -> tuple[Sequence | None, Sequence | None]:
    """The file's class names and palette: 0.x ``CLASSES`` / ``PALETTE``, 1.x ``dataset_meta``."""
    dataset_meta = meta.get("dataset_meta")
    dataset_meta = dataset_meta if isinstance(dataset_meta, Mapping) else {}
    names = meta.get("CLASSES") or dataset_meta.get("classes")
    palette = meta.get("PALETTE") or dataset_meta.get("palette")
    return names, palette


def _with_classes(
    recipe: MmsegRecipe, names: Sequence | None, palette: Sequence | None
) -> MmsegRecipe:
    return replace(
        recipe,
        class_names=tuple(str(n) for n in names) if names else None,
        palette=tuple(tuple(int(c) for c in colour) for colour in palette) if palette else None,
    )


def recipe_summary(config: Mapping[str, Any], precision: str) -> str:
    """One line: the recipe a converted checkpoint's ``config`` records."""
    inference = config.get("inference") or {}
    parts = [f"inference.mode={inference.get('mode', 'whole')}"]
    if inference.get("mode") == "slide":
        parts += [f"inference.{k}={list(inference[k])}" for k in ("crop_size", "stride")]
    scale = ((config.get("dataset") or {}).get("test_pipeline") or {}).get("scale")
    parts.append(f"test scale {'x'.join(map(str, scale)) if scale else 'the training scale'}")
    parts.append(f"model.align_corners={bool(config['model'].get('align_corners', False))}")
    return ", ".join([*parts, f"precision {precision}"])


# The zoo's two pages and the dataset config of each: sem_seg (19 classes), drivable area (3).
ZOO_DATASETS = ("bdd100k", "bdd100k_drivable")


def zoo_dataset(
    recipe: MmsegRecipe, num_classes: int | None, class_names: Mapping[str, Sequence[str]]
) -> tuple[str, str] | None:
    """The dataset config a zoo file was trained on, and why: the one whose class names are the
    file's own (its ``meta``), else the one with its class count; ``class_names``: each candidate
    dataset config's. None when none fits (the caller asks for ``--dataset``)."""
    if recipe.class_names:
        for name, names in class_names.items():
            if list(names) == list(recipe.class_names):
                return name, "the file's class names"
    for name, names in class_names.items():
        if num_classes is not None and len(names) == num_classes:
            return name, f"the file's {num_classes} classes"
    return None


DEFAULT_HINT = (
    "no config in the file and no zoo row in its name: for a 769x769 row add "
    + " ".join(o for o in ROW_769.overrides() if not o.startswith("inference.precision"))
    + "; for an fp16 row inference.precision=fp16"
)
