"""Methods named as the BDD100K model zoo names them (one table by decode head and backbone
family), and the one model-card writer the model-zoo row and the Hub folder share."""

from __future__ import annotations

from pathlib import Path

import pytest
from huggingface_hub import ModelCard, metadata_load
from omegaconf import OmegaConf

from semseg.apps.card import CardText, Score, write_card
from semseg.apps.methods import ZOO_METHODS, backbone_family, method_name, slug
from semseg.cli import CONF_DIR, compose_groups

# The section headings of https://github.com/SysCV/bdd100k-models/blob/main/sem_seg/README.md
ZOO_HEADINGS = {
    "FCN", "PSPNet", "Deeplabv3", "Deeplabv3+", "UPerNet", "PSANet", "NLNet", "Semantic FPN",
    "EMANet", "DMNet", "APCNet", "HRNet", "CCNet", "GCNet", "DNLNet", "PointRend",
    "Vision Transformer", "DeiT", "Swin Transformer", "DPT", "ConvNeXt",
    "DANet",  # drivable/README.md
}  # fmt: skip

# Every conf/model option with each backbone family the zoo (or the option's comment) pairs it with.
MODEL_METHODS = [
    ("semantic_fpn", "resnet50c", "Semantic FPN"),
    ("semantic_fpn", "efficientnet_b3", "Semantic FPN"),
    ("semantic_fpn_gn", "resnet50c", "Semantic FPN"),
    ("semantic_fpn_gn_dcn", "resnet50c", "Semantic FPN"),
    ("fcn", "resnet50c_d8", "FCN"),
    ("fcn_hr", "hrnet_w48", "HRNet"),
    ("pspnet", "resnet101c_d8", "PSPNet"),
    ("deeplabv3", "resnet50c_d8", "Deeplabv3"),
    ("deeplabv3plus", "resnet50c_d8", "Deeplabv3+"),
    ("upernet", "resnet50c", "UPerNet"),
    ("upernet", "swin_tiny", "Swin Transformer"),
    ("upernet", "convnext_tiny", "ConvNeXt"),
    ("upernet_vit", "vit_base", "Vision Transformer"),
    ("upernet_vit", "deit_small", "DeiT"),
    ("psanet", "resnet50c_d8", "PSANet"),
    ("nonlocal", "resnet50c_d8", "NLNet"),
    ("gcnet", "resnet50c_d8", "GCNet"),
    ("dnlnet", "resnet101c_d8", "DNLNet"),
    ("emanet", "resnet50c_d8", "EMANet"),
    ("dmnet", "resnet50c_d8", "DMNet"),
    ("apcnet", "resnet50c_d8", "APCNet"),
    ("ccnet", "resnet50c_d8", "CCNet"),
    ("danet", "resnet50c_d8", "DANet"),
    ("pointrend", "resnet50c", "PointRend"),
    ("dpt", "vit_base", "DPT"),
]

FAMILIES = {
    "resnet18": "resnet", "resnet18_d8": "resnet", "resnet50": "resnet", "resnet50c": "resnet",
    "resnet50c_d8": "resnet", "resnet101": "resnet", "resnet101c": "resnet",
    "resnet101c_d8": "resnet", "efficientnet_b3": "efficientnet", "convnext_tiny": "convnext",
    "convnext_small": "convnext", "convnext_base": "convnext", "swin_tiny": "swin",
    "swin_small": "swin", "swin_base": "swin", "vit_base": "vit", "deit_small": "deit",
    "hrnet_w18": "hrnet", "hrnet_w48": "hrnet",
}  # fmt: skip


def _config(model: str, backbone: str) -> dict:
    return compose_groups({"model": model, "backbone": backbone, "dataset": "toy_bdd100k"})


def test_every_model_option_and_backbone_is_covered() -> None:
    assert {m for m, _, _ in MODEL_METHODS} == {p.stem for p in (CONF_DIR / "model").glob("*.yaml")}
    backbones = {p.stem: OmegaConf.load(p) for p in (CONF_DIR / "backbone").glob("*.yaml")}
    assert {name: backbone_family(config) for name, config in backbones.items()} == FAMILIES
    assert {FAMILIES[b] for _, b, _ in MODEL_METHODS} == set(FAMILIES.values())
    assert set(ZOO_METHODS.values()) == ZOO_HEADINGS  # the table names the zoo's methods only


@pytest.mark.parametrize(("model", "backbone", "heading"), MODEL_METHODS)
def test_methods_are_named_by_the_zoos_headings(model: str, backbone: str, heading: str) -> None:
    config = _config(model, backbone)
    assert backbone_family(config["backbone"]) == FAMILIES[backbone]
    assert method_name(config) == heading
    # The table is the apps' reading of the config: nothing of it reaches the model's constructor.
    assert "method" not in config["model"]


def test_names_outside_the_table() -> None:
    unknown_head = {"model": {"_target_": "semseg.models.decoders.encoder_decoder",
                              "decode_head": {"_target_": "my.heads.FancyHead"}}}  # fmt: skip
    assert method_name(unknown_head) == "FancyHead"
    assert method_name({"model": {"_target_": "my.models.whole_model"}}) == "whole_model"
    assert backbone_family({}) == "?" and backbone_family({"name": "ResNet50"}) == "resnet"


@pytest.mark.parametrize(
    ("heading", "tag"),
    [("Semantic FPN", "semantic-fpn"), ("Deeplabv3+", "deeplabv3plus"), ("FCN", "fcn"),
     ("Swin Transformer", "swin-transformer"), ("Vision Transformer", "vision-transformer")],
)  # fmt: skip
def test_slugs(heading: str, tag: str) -> None:
    assert slug(heading) == tag


def test_the_card_as_written(tmp_path: Path) -> None:
    """The card writer's README.md, read back by huggingface_hub: name, tags, the model-index
    (a measured val score takes the reported one's place; both stay in the text), the title
    with the zoo's heading, the sections in their order."""
    config = _config("upernet", "swin_tiny")
    backbone = config["backbone"]["name"]
    scores = [
        Score("val", 0.6512),
        Score("val", 0.62, "the BDD100K model zoo", "https://example.org/zoo"),
        Score("test", 0.5433, "the BDD100K model zoo", "https://example.org/zoo"),
    ]
    text = CardText(
        config, "bdd100k", scores, "apache-2.0", {"model.safetensors": "ab" * 32},
        repo_id="org/upernet-swin-t", intro=["An intro line."], score_notes=["A note."],
        file_notes=["A file note."], sections=[("Extra", ["extra line"])],
    )  # fmt: skip
    written = write_card(tmp_path, text)
    card = ModelCard.load(tmp_path / "README.md")
    assert str(written) == (tmp_path / "README.md").read_text()
    data = card.data
    assert data.model_name == f"swin-transformer-{backbone}-bdd100k".replace("_", "-")
    assert data.tags == sorted(["semantic-segmentation", "swin-transformer", backbone, "bdd100k"])
    assert (data.license, data.library_name, data.datasets) == ("apache-2.0", "semseg", ["bdd100k"])
    results = {r.dataset_split: r for r in data.eval_results}
    assert (results["val"].metric_value, results["val"].source_name) == (0.6512, None)
    assert (results["test"].metric_value, results["test"].source_url) == (
        0.5433, "https://example.org/zoo"
    )  # fmt: skip
    index = metadata_load(tmp_path / "README.md")["model-index"][0]
    assert index["name"] == data.model_name and len(index["results"]) == 2
    lines = card.text.splitlines()
    assert lines[0] == f"# Swin Transformer, {backbone} on bdd100k"
    headings = [line for line in lines if line.startswith("## ")]
    assert headings == ["## Scores", "## Use", "## Files", "## Extra"]
    assert "| val | 65.12 | measured with this project |" in lines
    assert "| val | 62.00 | the BDD100K model zoo (https://example.org/zoo) |" in lines
    assert f"| model.safetensors | `{'ab' * 32}` |" in lines
    assert any("checkpoint=hf://org/upernet-swin-t" in line for line in lines)
    order = [lines.index(s) for s in ("An intro line.", "A note.", "A file note.", "extra line")]
    assert order == sorted(order)


def test_a_card_without_scores(tmp_path: Path) -> None:
    config = _config("deeplabv3plus", "resnet50c_d8")
    card = write_card(tmp_path, CardText(config, "bdd100k", [], "mit", {}, name="my-model"))
    assert card.data.eval_results is None and card.data.model_name is None
    assert "deeplabv3plus" in card.data.tags and "No scores yet." in card.text
    assert card.text.startswith("# Deeplabv3+, resnet50c on bdd100k")
