"""scripts/model_zoo_row.py end to end on the tiny generated dataset, the RLE writer, bad input."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import hub_cache_repo, run_entry
from huggingface_hub import ModelCard, metadata_load, scan_cache_dir
from PIL import Image

from semseg.apps.evaluate import run_evaluate
from semseg.apps.zoo import build_model_zoo_row
from semseg.cli import compose
from semseg.data.bdd100k import decode_scalabel_rle
from semseg.errors import UserError
from semseg.evaluation.submission import ScalabelWriter, encode_scalabel_frame, read_scalabel_frames
from semseg.models import model_from_checkpoint

SCRIPT = "../scripts/model_zoo_row.py"  # run_entry runs src/<script>
SERVER = "https://example.org/sem_seg"
NAMES = [f"class{i}" for i in range(19)]


def stems(folder: Path, pattern: str) -> list[str]:
    return sorted(p.stem for p in folder.glob(pattern))


@pytest.fixture(scope="module")
def run_dir(smoke_run) -> Path:
    """The session's smoke training run on the BDD100K layout (checkpoints/best.pt, last.pt)."""
    return smoke_run("bdd100k")


@pytest.fixture(scope="module")
def zoo(run_dir: Path, toy_root: Path, module_tmp: Path) -> Path:
    """The model-zoo folder of ``run_dir``, written by the command line (toy data with a server)."""
    out = module_tmp / "zoo" / "row"
    run_entry(
        SCRIPT, f"run_dir={run_dir}", f"dataset.root={toy_root}", f"output_dir={out}",
        f"dataset.test_server={SERVER}", "visuals.count=3", "device=cpu",
        f"hydra.run.dir={out.parent / 'log'}",
    )  # fmt: skip
    return out


def zoo_config(run_dir: Path, toy_root: Path, *overrides: str):
    return compose("model_zoo", [f"run_dir={run_dir}", f"dataset.root={toy_root}", "device=cpu",
                                 "progress=false", "visuals.count=1", *overrides])  # fmt: skip


def test_rle_round_trip_and_toolkit_format(toy_root: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    masks = {f"img{i}": rng.integers(0, 19, (48, 80)).astype(np.uint8) for i in range(3)}
    masks["img1"][:10] = 255  # ignore pixels get no label and decode back to the ignore index
    masks["img2"][:] = 7  # a single class
    with ScalabelWriter(tmp_path / "preds.json", NAMES) as writer:
        for name, mask in masks.items():
            writer.add(f"{name}.jpg", mask)
    assert writer.count == 3
    frames = read_scalabel_frames(tmp_path / "preds.json")
    assert list(frames) == list(masks)
    class_ids = {n: i for i, n in enumerate(NAMES)}
    for name, mask in masks.items():
        assert frames[name]["name"] == f"{name}.jpg"
        decoded = decode_scalabel_rle(frames[name], class_ids, 255, "test")
        assert decoded.dtype == np.uint8 and np.array_equal(decoded, mask)
    assert [label["category"] for label in frames["img2"]["labels"]] == ["class7"]
    # The same bytes as the dataset's own Scalabel RLE labels (the format dataset.labels=rles reads).
    official = json.loads((toy_root / "labels/sem_seg/rles/sem_seg_val.json").read_text())["frames"]
    class_names = list(compose("predict", ["dataset=toy_bdd100k"]).dataset.class_names)
    for frame in official:
        mask = np.array(
            Image.open(
                toy_root / "labels/sem_seg/masks/val" / frame["name"].replace(".jpg", ".png")
            )
        )
        assert encode_scalabel_frame(frame["name"], mask, class_names) == frame


@pytest.mark.slow
def test_zoo_folder(zoo: Path, run_dir: Path, toy_root: Path, tmp_path: Path) -> None:
    val_stems = stems(toy_root / "images/10k/val", "*.jpg")
    test_stems = stems(toy_root / "images/10k/test", "*.jpg")
    assert stems(zoo / "preds/val", "*.png") == val_stems
    assert stems(zoo / "preds/test", "*.png") == test_stems

    # weights: the SHA-256 beside them, no training state, loadable, the best checkpoint's weights
    sha = hashlib.sha256((zoo / "weights.pt").read_bytes()).hexdigest()
    assert (zoo / "weights.pt.sha256").read_text() == f"{sha}  weights.pt\n"
    weights = torch.load(zoo / "weights.pt", weights_only=True)
    assert not {"optimizer", "scheduler", "scaler", "rng"} & set(weights)
    model, meta, _ = model_from_checkpoint(zoo / "weights.pt")
    best = torch.load(run_dir / "checkpoints/best.pt", weights_only=True)["model"]
    assert all(torch.equal(v, best[k]) for k, v in model.state_dict().items())
    assert meta["class_names"][6] == "traffic light"

    # scores-val.json == src/evaluate.py on the checkpoint == evaluate.py on the PNGs and on the RLE
    scores = json.loads((zoo / "scores-val.json").read_text())
    gt_dir = toy_root / "labels/sem_seg/masks/val"
    for args in (
        [f"checkpoint={run_dir / 'checkpoints/best.pt'}", "dataset=toy_bdd100k",
         f"dataset.root={toy_root}", "dataset.eval_batch_size=2", "device=cpu"],
        [f"gt_dir={gt_dir}", f"pred_dir={zoo / 'preds/val'}"],
        [f"gt_dir={gt_dir}", f"pred_rle={zoo / 'preds/sem_seg_val.json'}"],
    ):  # fmt: skip
        report = run_evaluate(compose("evaluate", [*args, f"output_dir={tmp_path}"]))
        assert report["metrics"] == scores["metrics"]
        assert report["confusion_matrix"] == scores["confusion_matrix"]
    assert set(scores["metrics"]) >= {"mIoU", "pixel_acc", "fIoU", "IoU/road", "IoU/bicycle"}
    assert np.sum(scores["confusion_matrix"]) == 4 * 64 * 128 - np.sum(
        [np.sum(np.array(Image.open(p)) == 255) for p in gt_dir.glob("*.png")]
    )

    # masks: BDD100K format, and the same values as the RLE frames
    frames = read_scalabel_frames(zoo / "preds/sem_seg_val.json")
    class_ids = {name: i for i, name in enumerate(meta["class_names"])}
    for stem in val_stems:
        with Image.open(zoo / "preds/val" / f"{stem}.png") as img:
            assert (img.mode, img.size) == ("L", (128, 64))
            mask = np.array(img)
        assert mask.max() < 19
        assert np.array_equal(decode_scalabel_rle(frames[stem], class_ids, 255, "zoo"), mask)

    # submission: the test split as RLE JSON and as a zip of the PNG masks
    test_frames = read_scalabel_frames(zoo / "submission/sem_seg_test.json")
    assert sorted(test_frames) == test_stems
    with zipfile.ZipFile(zoo / "submission/sem_seg_test_masks.zip") as archive:
        assert sorted(archive.namelist()) == [f"{s}.png" for s in test_stems]
        for stem in test_stems:
            assert archive.read(f"{stem}.png") == (zoo / "preds/test" / f"{stem}.png").read_bytes()

    # visuals: a fixed sample of 3 val images; the README row; the config
    assert len(stems(zoo / "visuals/colormaps", "*.png")) == 3
    assert stems(zoo / "visuals/overlays", "*.jpg") == stems(zoo / "visuals/colormaps", "*.png")
    readme = (zoo / "README.md").read_text()
    row = next(
        line for line in readme.splitlines() if line.startswith("| Semantic FPN | resnet18 |")
    )
    cells = [c.strip() for c in row.strip("|").split(" | ")]
    assert cells[3] == f"{100 * scores['metrics']['mIoU']:.2f}" and cells[5] == ""
    assert "[scores](scores-val.json)" in row and f"`{sha[:8]}`" in row
    assert SERVER in readme and "sem_seg_test_masks.zip" in readme
    assert f"root: {toy_root}" in (zoo / "config.yaml").read_text()

    # the README is a model card: huggingface_hub parses its front matter, whose model-index
    # holds scores-val.json's mIoU (measured here: no other source named)
    card = ModelCard.load(zoo / "README.md")
    assert (card.data.library_name, card.data.pipeline_tag) == ("semseg", "image-segmentation")
    # named as the zoo names the method: its section heading, as a slug in the tags and the name
    assert card.text.startswith("# Semantic FPN, resnet18 on toy_bdd100k\n")
    assert card.data.tags == ["resnet18", "semantic-fpn", "semantic-segmentation", "toy_bdd100k"]
    assert card.data.model_name == "semantic-fpn-resnet18-toy-bdd100k"
    assert card.data.license == "mit" and card.data.datasets == ["toy_bdd100k"]
    (result,) = card.data.eval_results
    assert (result.metric_type, result.dataset_split) == ("mean_iou", "val")
    assert result.metric_value == scores["metrics"]["mIoU"] and result.source_name is None
    index = metadata_load(zoo / "README.md")["model-index"][0]
    assert index["results"][0]["metrics"][0]["value"] == scores["metrics"]["mIoU"]
    sha_st = hashlib.sha256((zoo / "model.safetensors").read_bytes()).hexdigest()
    assert f"`{sha_st[:8]}`" in row and f"| model.safetensors | `{sha_st}` |" in readme


@pytest.mark.slow
def test_missing_best_checkpoint_and_last(
    run_dir: Path, toy_root: Path, tmp_path: Path, caplog
) -> None:
    only_last = tmp_path / "run"
    (only_last / "checkpoints").mkdir(parents=True)
    shutil.copy(run_dir / "checkpoints/last.pt", only_last / "checkpoints/last.pt")
    with pytest.raises(UserError) as missing:
        build_model_zoo_row(zoo_config(only_last, toy_root))
    assert "checkpoints/best.pt" in str(missing.value) and "last.pt" in str(missing.value)
    assert "\n" not in str(missing.value)
    # checkpoint=last.pt publishes it; toy data has no test server: no submission/, one log line
    with caplog.at_level(logging.INFO):
        out = build_model_zoo_row(zoo_config(only_last, toy_root, "checkpoint=last.pt"))
    assert out == only_last / "model_zoo" and (out / "preds/test").is_dir()
    assert not (out / "submission").exists()
    assert any("submission/ skipped" in r.getMessage() for r in caplog.records)
    # an existing folder is refused, then replaced with overwrite=true
    (out / "marker").touch()
    with pytest.raises(UserError, match="exists: pass overwrite=true"):
        build_model_zoo_row(zoo_config(only_last, toy_root, "checkpoint=last.pt"))
    build_model_zoo_row(
        zoo_config(only_last, toy_root, "checkpoint=last.pt", "overwrite=true", "test_miou=0.4321",
                   f"dataset.test_server={SERVER}")
    )  # fmt: skip
    assert not (out / "marker").exists() and (out / "scores-val.json").is_file()
    assert (out / "submission").is_dir()  # with a server: the submission files too
    # the server's mIoU-test, once known: in the row and in the card's model-index
    test = next(r for r in ModelCard.load(out / "README.md").data.eval_results
                if r.dataset_split == "test")  # fmt: skip
    assert (test.metric_value, test.source_name, test.source_url) == (
        0.4321, "the evaluation server", SERVER
    )  # fmt: skip
    row = next(line for line in (out / "README.md").read_text().splitlines()
               if line.startswith("| Semantic FPN | resnet18 |"))  # fmt: skip
    assert row.strip("|").split(" | ")[5].strip() == "43.21"
    assert sorted(p.name for p in only_last.iterdir()) == ["checkpoints", "model_zoo"]


@pytest.mark.slow
def test_bad_splits_leave_no_folder(run_dir: Path, toy_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(toy_root, root)
    out = tmp_path / "row"
    for path in (root / "images/10k/test").glob("*.jpg"):
        path.unlink()
    with pytest.raises(UserError, match=r"no .*images.* in .*test"):
        build_model_zoo_row(zoo_config(run_dir, root, f"output_dir={out}"))
    # a file that breaks half way through: no output folder, no temporary folder
    shutil.copytree(toy_root / "images/10k/test", root / "images/10k/test", dirs_exist_ok=True)
    broken = sorted((root / "images/10k/test").glob("*.jpg"))[-1]
    broken.write_bytes(broken.read_bytes()[:100])
    with pytest.raises(UserError, match=broken.name):
        build_model_zoo_row(zoo_config(run_dir, root, f"output_dir={out}"))
    assert list(tmp_path.iterdir()) == [root]


@pytest.mark.slow
def test_zoo_folder_through_a_hub_cache(zoo: Path, toy_root: Path, tmp_path: Path) -> None:
    """The folder as uploaded and downloaded again: a Hugging Face cache laid out as
    huggingface_hub lays it out (built here from the folder, no network), read through
    hf://org/name@tag by evaluate.py: the mIoU of the folder itself and of the checkpoint."""
    cache = tmp_path / "hub"
    files = ["README.md", "config.yaml", "model.safetensors"]
    hub_cache_repo(cache, "semseg-test/fpn-toy", zoo, files, tags=("v1",))
    (repo,) = scan_cache_dir(cache).repos  # huggingface_hub's own check of the layout
    assert repo.repo_id == "semseg-test/fpn-toy" and set(repo.refs) == {"main", "v1"}
    assert {f.file_name for f in repo.refs["v1"].files} == set(files)
    common = ["dataset=toy_bdd100k", f"dataset.root={toy_root}", "dataset.eval_batch_size=2",
              "dataset.num_workers=0", "device=cpu"]  # fmt: skip
    run_entry(
        "evaluate.py", "checkpoint=hf://semseg-test/fpn-toy@v1", *common,
        f"hydra.run.dir={tmp_path / 'hub_eval'}",
        env={"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    hub = json.loads((tmp_path / "hub_eval" / "eval_val.json").read_text())
    folder = run_evaluate(
        compose("evaluate", [f"checkpoint={zoo}", *common, f"output_dir={tmp_path}"])
    )
    # scores-val.json: the checkpoint's own evaluation (test_zoo_folder checks that)
    scores = json.loads((zoo / "scores-val.json").read_text())
    for report in (folder, scores):
        assert hub["metrics"] == report["metrics"]
        assert hub["confusion_matrix"] == report["confusion_matrix"]
    assert not list(cache.rglob("eval_*.json")) and not (zoo / "eval_val.json").exists()
