"""The BDD100K drivable-area zoo (SysCV/bdd100k-models ``drivable/README.md``): one experiment per
row, with the row's recipe, its sem_seg twin's config on the drivable data, and the zoo's numbers in
its header, the README and docs/model_zoo.md."""

from __future__ import annotations

import re

import pytest
from helpers import REPO, compose_train, resolved

# (the zoo's config name, this project's experiment, mIoU val, mIoU test): the zoo's table.
DRIVABLE_ROWS = [
    ("fcn_r50-d8_769x769_40k_drivable_bdd100k", "fcn_r50-d8_769x769_40k_drivable_bdd100k", 74.84, 74.42),
    ("pspnet_r50-d8_769x769_40k_drivable_bdd100k", "pspnet_r50-d8_769x769_40k_drivable_bdd100k", 83.51, 82.68),
    ("pspnet_r50-d8_512x1024_40k_drivable_bdd100k", "pspnet_r50-d8_512x1024_40k_drivable_bdd100k", 83.37, 82.91),
    ("pspnet_r50-d8_512x1024_80k_drivable_bdd100k", "pspnet_r50-d8_512x1024_80k_drivable_bdd100k", 83.67, 83.43),
    ("pspnet_r101-d8_512x1024_80k_drivable_bdd100k", "pspnet_r101-d8_512x1024_80k_drivable_bdd100k", 84.13, 83.80),
    ("deeplabv3_r50-d8_769x769_40k_drivable_bdd100k", "deeplabv3_r50-d8_769x769_40k_drivable_bdd100k", 83.49, 82.74),
    ("deeplabv3_r50-d8_512x1024_40k_drivable_bdd100k", "deeplabv3_r50-d8_512x1024_40k_drivable_bdd100k", 84.10, 83.52),
    ("deeplabv3_r50-d8_512x1024_80k_drivable_bdd100k", "deeplabv3_r50-d8_512x1024_80k_drivable_bdd100k", 84.63, 84.14),
    ("deeplabv3_r101-d8_512x1024_80k_drivable_bdd100k", "deeplabv3_r101-d8_512x1024_80k_drivable_bdd100k", 85.15, 84.75),
    ("deeplabv3+_r50-d8_769x769_40k_drivable_bdd100k", "deeplabv3plus_r50-d8_769x769_40k_drivable_bdd100k", 83.65, 83.00),
    ("deeplabv3+_r50-d8_512x1024_40k_drivable_bdd100k", "deeplabv3plus_r50-d8_512x1024_40k_drivable_bdd100k", 84.12, 83.65),
    ("deeplabv3+_r50-d8_512x1024_80k_drivable_bdd100k", "deeplabv3plus_r50-d8_512x1024_80k_drivable_bdd100k", 84.35, 83.93),
    ("deeplabv3+_r101-d8_512x1024_80k_drivable_bdd100k", "deeplabv3plus_r101-d8_512x1024_80k_drivable_bdd100k", 84.73, 84.41),
    ("upernet_r50-d8_512x1024_40k_drivable_bdd100k", "upernet_r50_512x1024_40k_drivable_bdd100k", 82.13, 81.74),
    ("upernet_r50-d8_769x769_40k_drivable_bdd100k", "upernet_r50_769x769_40k_drivable_bdd100k", 82.65, 82.03),
    ("psanet_r50-d8_769x769_40k_drivable_bdd100k", "psanet_r50-d8_769x769_40k_drivable_bdd100k", 83.26, 82.53),
    ("psanet_r50-d8_512x1024_40k_drivable_bdd100k", "psanet_r50-d8_512x1024_40k_drivable_bdd100k", 83.65, 83.19),
    ("psanet_r50-d8_512x1024_80k_drivable_bdd100k", "psanet_r50-d8_512x1024_80k_drivable_bdd100k", 83.55, 83.20),
    ("nonlocal_r50-d8_512x1024_40k_drivable_bdd100k", "nonlocal_r50-d8_512x1024_40k_drivable_bdd100k", 81.74, 81.24),
    ("fpn_r50_512x1024_40k_drivable_bdd100k", "semantic_fpn_r50_40k_drivable_bdd100k", 77.29, 76.71),
    ("fpn_r50_512x1024_80k_drivable_bdd100k", "semantic_fpn_r50_80k_drivable_bdd100k", 78.25, 77.74),
    ("fpn_r50_gn_512x1024_40k_drivable_bdd100k", "semantic_fpn_r50_gn_40k_drivable_bdd100k", 81.30, 80.85),
    ("fpn_r50_gn_512x1024_80k_drivable_bdd100k", "semantic_fpn_r50_gn_80k_drivable_bdd100k", 82.59, 82.26),
    ("fpn_r50_gn_dconv_512x1024_40k_drivable_bdd100k", "semantic_fpn_r50_gn_dconv_40k_drivable_bdd100k", 83.65, 83.11),
    ("fpn_r50_gn_dconv_512x1024_80k_drivable_bdd100k", "semantic_fpn_r50_gn_dconv_80k_drivable_bdd100k", 83.04, 82.71),
    ("emanet_r50-d8_512x1024_40k_drivable_bdd100k", "emanet_r50-d8_512x1024_40k_drivable_bdd100k", 81.64, 81.16),
    ("emanet_r50-d8_769x769_40k_drivable_bdd100k", "emanet_r50-d8_769x769_40k_drivable_bdd100k", 82.18, 81.36),
    ("emanet_r50-d8_769x769_80k_drivable_bdd100k", "emanet_r50-d8_769x769_80k_drivable_bdd100k", 83.14, 82.55),
    ("dmnet_r50-d8_512x1024_40k_drivable_bdd100k", "dmnet_r50-d8_512x1024_40k_drivable_bdd100k", 82.45, 82.04),
    ("dmnet_r50-d8_769x769_40k_drivable_bdd100k", "dmnet_r50-d8_769x769_40k_drivable_bdd100k", 83.07, 82.39),
    ("apcnet_r50-d8_769x769_40k_drivable_bdd100k", "apcnet_r50-d8_769x769_40k_drivable_bdd100k", 83.03, 82.26),
    ("apcnet_r50-d8_512x1024_40k_drivable_bdd100k", "apcnet_r50-d8_512x1024_40k_drivable_bdd100k", 83.39, 82.90),
    ("apcnet_r50-d8_512x1024_80k_drivable_bdd100k", "apcnet_r50-d8_512x1024_80k_drivable_bdd100k", 83.29, 82.81),
    ("danet_r50-d8_769x769_40k_drivable_bdd100k", "danet_r50-d8_769x769_40k_drivable_bdd100k", 81.82, 81.04),
    ("danet_r50-d8_512x1024_40k_drivable_bdd100k", "danet_r50-d8_512x1024_40k_drivable_bdd100k", 83.96, 83.49),
    ("fcn_hr48_512x1024_40k_drivable_bdd100k", "fcn_hr48_512x1024_40k_drivable_bdd100k", 83.24, 82.70),
    ("fcn_hr48_512x1024_80k_drivable_bdd100k", "fcn_hr48_512x1024_80k_drivable_bdd100k", 83.27, 82.87),
    ("ccnet_r50-d8_769x769_40k_drivable_bdd100k", "ccnet_r50-d8_769x769_40k_drivable_bdd100k", 83.09, 82.46),
    ("ccnet_r50-d8_512x1024_40k_drivable_bdd100k", "ccnet_r50-d8_512x1024_40k_drivable_bdd100k", 83.69, 83.32),
    ("ccnet_r50-d8_512x1024_80k_drivable_bdd100k", "ccnet_r50-d8_512x1024_80k_drivable_bdd100k", 84.18, 83.86),
    ("ccnet_r101-d8_512x1024_80k_drivable_bdd100k", "ccnet_r101-d8_512x1024_80k_drivable_bdd100k", 84.17, 83.66),
    ("gcnet_r50-d8_512x1024_40k_drivable_bdd100k", "gcnet_r50-d8_512x1024_40k_drivable_bdd100k", 82.07, 81.67),
    ("gcnet_r50-d8_769x769_40k_drivable_bdd100k", "gcnet_r50-d8_769x769_40k_drivable_bdd100k", 82.95, 82.08),
    ("dnl_r50-d8_512x1024_40k_drivable_bdd100k", "dnl_r50-d8_512x1024_40k_drivable_bdd100k", 84.21, 83.70),
    ("dnl_r50-d8_512x1024_80k_drivable_bdd100k", "dnl_r50-d8_512x1024_80k_drivable_bdd100k", 84.76, 84.27),
    ("dnl_r101-d8_512x1024_80k_drivable_bdd100k", "dnl_r101-d8_512x1024_80k_drivable_bdd100k", 84.35, 83.84),
    ("pointrend_r50_512x1024_40k_drivable_bdd100k", "pointrend_r50_512x1024_40k_drivable_bdd100k", 77.33, 76.81),
    ("upernet_swin-t_512x1024_40k_drivable_bdd100k", "upernet_swin-t_512x1024_40k_drivable_bdd100k", 81.87, 81.05),
    ("upernet_swin-t_512x1024_80k_drivable_bdd100k", "upernet_swin-t_512x1024_80k_drivable_bdd100k", 82.26, 81.49),
    ("upernet_swin-s_512x1024_80k_drivable_bdd100k", "upernet_swin-s_512x1024_80k_drivable_bdd100k", 83.89, 83.32),
    ("upernet_swin-s_fp16_512x1024_80k_drivable_bdd100k", "upernet_swin-s_fp16_512x1024_80k_drivable_bdd100k", 83.76, 83.42),
    ("upernet_swin-b_fp16_512x1024_80k_drivable_bdd100k", "upernet_swin-b_fp16_512x1024_80k_drivable_bdd100k", 83.93, 83.41),
    ("upernet_convnext-t_fp16_512x1024_40k_drivable_bdd100k", "upernet_convnext-t_fp16_512x1024_40k_drivable_bdd100k", 77.69, 77.21),
    ("upernet_convnext-t_fp16_512x1024_80k_drivable_bdd100k", "upernet_convnext-t_fp16_512x1024_80k_drivable_bdd100k", 81.22, 80.63),
    ("upernet_convnext-s_fp16_512x1024_80k_drivable_bdd100k", "upernet_convnext-s_fp16_512x1024_80k_drivable_bdd100k", 83.14, 82.57),
    ("upernet_convnext-b_fp16_512x1024_80k_drivable_bdd100k", "upernet_convnext-b_fp16_512x1024_80k_drivable_bdd100k", 83.75, 83.24),
]  # fmt: skip

# The rows without a sem_seg twin: their decode head, on the shared recipe.
UNTWINNED_HEADS = {
    "apcnet": "APCHead", "ccnet": "CCHead", "danet": "DAHead", "dmnet": "DMHead",
    "emanet": "EMAHead", "gcnet": "GCHead", "psanet": "PSAHead", "pspnet": "PSPHead",
}  # fmt: skip
TWIN = re.compile(r"^# The sem_seg row (\S+) on the drivable-area data", re.M)


def test_the_table_is_the_zoos_56_rows() -> None:
    assert len(DRIVABLE_ROWS) == len({row[1] for row in DRIVABLE_ROWS}) == 56
    on_disk = {p.stem for p in (REPO / "conf" / "experiment").glob("*_drivable_bdd100k.yaml")}
    assert on_disk == {row[1] for row in DRIVABLE_ROWS}


@pytest.mark.parametrize(("zoo", "experiment", "val", "test"), DRIVABLE_ROWS, ids=lambda v: str(v))
def test_drivable_row_has_the_zoo_recipe(
    zoo: str, experiment: str, val: float, test: float
) -> None:
    text = (REPO / "conf" / "experiment" / f"{experiment}.yaml").read_text()
    assert f"mIoU val/test {val:.2f} / {test:.2f}" in text and f"(mmseg config {zoo})" in text
    cfg = resolved(compose_train(f"experiment={experiment}"))
    data = cfg["dataset"]
    assert data["name"] == "bdd100k_drivable" and data["num_classes"] == 3
    assert data["class_names"] == ["direct", "alternative", "background"]
    assert cfg["schedule"]["max_iters"] == (80000 if "_80k_" in zoo else 40000)
    slide = "769x769" in zoo
    assert data["train_pipeline"]["crop_size"] == ([769, 769] if slide else [512, 1024])
    assert cfg["model"]["align_corners"] is slide
    assert cfg["inference"]["mode"] == ("slide" if slide else "whole")
    if slide:  # the zoo's 769 test_cfg and test scale
        assert cfg["inference"]["crop_size"] == [769, 769] and cfg["inference"]["stride"] == [
            513,
            513,
        ]
        assert data["test_pipeline"]["scale"] == [1281, 721]
    twin = TWIN.search(text)
    if twin is None:
        head = cfg["model"]["decode_head"]["_target_"].rsplit(".", 1)[-1]
        assert head == UNTWINNED_HEADS[experiment.split("_")[0]]
        assert cfg["backbone"]["name"] == "resnet50c" and cfg["trainer"]["sync_bn"] is True
        return
    # The zoo's drivable config equals its sem_seg twin but for the dataset: so does the experiment.
    sem_seg = resolved(compose_train(f"experiment={twin.group(1)}"))
    assert sem_seg["dataset"]["name"] == "bdd100k"
    for key in set(cfg) | set(sem_seg):
        if key not in ("dataset", "model", "tags"):
            assert cfg[key] == sem_seg[key], key
    assert cfg["model"]["num_classes"] == 3 and sem_seg["model"]["num_classes"] == 19
    assert {**cfg["model"], "num_classes": 19} == sem_seg["model"]
    for part in ("train_pipeline", "test_pipeline", "batch_size"):
        assert data[part] == sem_seg["dataset"][part], part


@pytest.mark.parametrize("page", ["README.md", "docs/model_zoo.md"])
def test_every_drivable_row_is_in_the_tables(page: str) -> None:
    text = (REPO / page).read_text()
    for _, experiment, val, test in DRIVABLE_ROWS:
        assert re.search(rf"\| {val:.2f} / {test:.2f} \| `{experiment}` \|", text), experiment
