"""Model folders and hf:// references: safetensors + YAML only, everywhere a checkpoint is read,
bad references in one line, no hang without a network, and Hub folders of converted checkpoints
whose cards keep reported and measured scores apart."""

from __future__ import annotations

import http.server
import json
import sys
import threading
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from helpers import entry_config, hub_cache_repo, load_script, run_entry, tiny_checkpoint
from huggingface_hub import ModelCard
from safetensors import safe_open

from semseg.apps.evaluate import run_evaluate
from semseg.checkpoints.file import load_checkpoint, save_checkpoint
from semseg.checkpoints.model_folder import load_model_checkpoint, save_model_folder
from semseg.cli import compose_groups
from semseg.errors import CheckpointError
from semseg.models import build_model, model_from_checkpoint

REPO_ID = "semseg-test/tiny"
FILES = ["config.yaml", "model.safetensors"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint as the converter leaves one (``converted_from`` in its meta)."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    state = load_checkpoint(tiny_checkpoint(path))
    state["meta"]["converted_from"] = "fpn_r50_512x1024_40k_sem_seg_bdd100k.pth"
    state["precision"] = "fp32"
    return save_checkpoint(state, path)


@pytest.fixture(scope="module")
def folder(converted: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    state = load_checkpoint(converted)
    return save_model_folder(state, state["config"], tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture
def hub_cache(folder: Path, tmp_path: Path, monkeypatch) -> Path:
    """A Hugging Face cache holding the folder as ``REPO_ID`` (main and tag v1), used offline."""
    cache = tmp_path / "hub"
    hub_cache_repo(cache, REPO_ID, folder, FILES, tags=("v1",))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_folder_holds_tensors_and_plain_metadata(converted: Path, folder: Path) -> None:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        entries = json.loads(f.metadata()["semseg"])
    assert entries["meta"]["class_names"][6] == "traffic light"
    assert (entries["iteration"], entries["precision"], entries["format_version"]) == (0, "fp32", 1)
    original, loaded = load_checkpoint(converted), load_model_checkpoint(folder)
    assert _same_weights(loaded["model"], original["model"])
    assert loaded["config"] == original["config"] and loaded["meta"] == original["meta"]


@pytest.mark.slow
def test_every_reader_takes_folders_and_hub_references(converted, folder, hub_cache, tmp_path):
    original = load_checkpoint(converted)["model"]
    for ref in (folder, f"hf://{REPO_ID}", f"hf://{REPO_ID}@v1"):
        model, meta, _ = model_from_checkpoint(ref)
        assert _same_weights(model.state_dict(), original) and meta["num_classes"] == 19
    # model.weights= of train.py (fine-tuning)
    groups = {"model": "semantic_fpn", "backbone": "resnet18", "dataset": "toy_bdd100k"}
    config = compose_groups(groups, ["backbone.pretrained=false", "model.neck.out_channels=32",
                                     "model.decode_head.channels=16", f"model.weights=hf://{REPO_ID}"])  # fmt: skip
    assert _same_weights(build_model(config).state_dict(), original)
    # scripts/export_onnx.py
    out = tmp_path / "tiny.onnx"
    assert load_script("export_onnx").main([str(folder), str(out), "--height", "32",
                                            "--width", "64", "--no-check"]) == 0  # fmt: skip
    assert out.stat().st_size > 0


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        ("hf://tiny", "hf://tiny is not a Hub model reference: write hf://<org>/<name>[@<revision>]"),
        (f"hf://{REPO_ID}@", f"hf://{REPO_ID}@ names no revision after '@'"),
        ("hf://semseg-test/missing", "there is no model repository semseg-test/missing in the "
         "Hugging Face cache"),
        (f"hf://{REPO_ID}@v2", f"{REPO_ID} has no revision 'v2' (cached: main, v1)"),
    ],
)  # fmt: skip
def test_bad_hub_references(hub_cache: Path, reference: str, message: str) -> None:
    with pytest.raises(CheckpointError) as error:
        load_model_checkpoint(reference)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_cached_revision_without_the_weights_names_the_file(hub_cache, folder) -> None:
    hub_cache_repo(hub_cache, "semseg-test/partial", folder, ["config.yaml"])
    with pytest.raises(CheckpointError) as error:
        load_model_checkpoint("hf://semseg-test/partial")
    assert "semseg-test/partial@main has no model.safetensors in the Hugging Face cache" in str(
        error.value
    )
    assert "HF_HUB_OFFLINE=1" in str(error.value) and "\n" not in str(error.value)


def test_bad_folders(folder: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    (no_config / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "config.yaml").write_text((folder / "config.yaml").read_text())
    (damaged / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:999])
    for path, message in [
        (empty, "holds no model.safetensors: point at a model folder"),
        (no_config, "has model.safetensors but no config.yaml"),
        (damaged, "cannot read model.safetensors of"),
    ]:
        with pytest.raises(CheckpointError) as error:
            load_model_checkpoint(path)
        assert str(path) in str(error.value) and message in str(error.value)
        assert "\n" not in str(error.value)


@pytest.mark.slow
def test_bad_reference_through_evaluate_py(toy_root: Path, tmp_path: Path) -> None:
    proc = run_entry(
        "evaluate.py", "checkpoint=hf://semseg-test/missing", "dataset=toy_bdd100k",
        f"dataset.root={toy_root}", "device=cpu", f"hydra.run.dir={tmp_path}", check=False,
        env={"HF_HUB_CACHE": str(tmp_path / "hub")},
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: hf://semseg-test/missing: there is no model repository")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


UNREACHABLE = """
from semseg.checkpoints.model_folder import load_model_checkpoint
from semseg.errors import CheckpointError
for ref in ("hf://semseg-test/missing", "hf://semseg-test/tiny@v1"):
    try:
        print("LOADED", len(load_model_checkpoint(ref)["model"]))
    except CheckpointError as e:
        print("ERROR", e)
"""


# What the stub Hub says of a repository or revision it does not have (the Hub's X-Error-Code).
STUB_HUB_NOT_FOUND = {
    "/api/models/semseg-test/gone/revision/main": "RepoNotFound",
    f"/api/models/{REPO_ID}/revision/v9": "RevisionNotFound",
}


class _StubHub(http.server.BaseHTTPRequestHandler):
    """A Hub on 127.0.0.1 that answers the look-ups of STUB_HUB_NOT_FOUND with 404 as the Hub
    does, and fails anything else (500)."""

    def do_GET(self) -> None:
        code = STUB_HUB_NOT_FOUND.get(self.path.split("?")[0])
        self.send_response(404 if code else 500)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def stub_hub(hub_cache: Path, monkeypatch) -> str:
    """:class:`_StubHub` as the Hub, online, with ``hub_cache`` as the cache."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StubHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(
        huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}"
    )
    yield huggingface_hub.constants.ENDPOINT
    server.shutdown()
    thread.join()


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        ("hf://semseg-test/gone", "hf://semseg-test/gone: there is no model repository "
         "semseg-test/gone on the Hugging Face Hub (or it is private or gated"),
        (f"hf://{REPO_ID}@v9", f"hf://{REPO_ID}@v9: {REPO_ID} has no revision 'v9' (a branch, tag "
         "or commit)"),
        ("hf://semseg-test/other", "hf://semseg-test/other: there is no model repository "
         "semseg-test/other in the Hugging Face cache"),
    ],
)  # fmt: skip
def test_the_hubs_answers_are_one_line_each(stub_hub: str, reference: str, message: str) -> None:
    """huggingface_hub's typed errors for what the Hub does not have; a Hub that fails (500) for
    an uncached repository: the cache miss, with the Hub's failure."""
    with pytest.raises(CheckpointError) as error:
        load_model_checkpoint(reference)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
    if "other" in reference:
        assert "and the Hub failed (HfHubHTTPError: Server error '500" in str(error.value)


def test_a_failing_hub_serves_the_cached_model(stub_hub: str, folder: Path) -> None:
    loaded = load_model_checkpoint(f"hf://{REPO_ID}@v1")
    assert _same_weights(loaded["model"], load_model_checkpoint(folder)["model"])


@pytest.mark.slow
def test_an_unreachable_hub_falls_back_to_the_cache_at_once(folder: Path, tmp_path: Path) -> None:
    """Without HF_HUB_OFFLINE and without a reachable Hub (a closed local port here): one line
    for what the cache lacks, the cached model for what it holds; no retrying for half a minute
    (the subprocess timeout catches a hang)."""
    cache = tmp_path / "hub"
    hub_cache_repo(cache, REPO_ID, folder, FILES, tags=("v1",))
    import os
    import subprocess

    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9",
           "HF_HUB_CACHE": str(cache), "OMP_NUM_THREADS": "1"}  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", UNREACHABLE], env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    missing, cached = proc.stdout.splitlines()
    assert missing.startswith("ERROR hf://semseg-test/missing: there is no model repository")
    assert "the Hub cannot be reached" in missing
    assert cached.startswith("LOADED ")


def test_a_config_that_names_other_code_is_refused(converted: Path, tmp_path: Path) -> None:
    """Building runs what ``_target_`` names: a file may only name model classes (or functions
    of this project's models that return one) and torch.nn layers, and nothing else runs."""
    state = load_checkpoint(converted)
    victim = tmp_path / "written.pt"
    attacks = {
        "model": {"_target_": "semseg.checkpoints.file.save_checkpoint",
                  "state": {}, "path": str(victim)},
        "backbone": {"_target_": "os.system", "command": f"touch {victim}"},
    }  # fmt: skip
    for group, bad in attacks.items():
        config = {**state["config"], group: {**state["config"][group], **bad}}
        with pytest.raises(CheckpointError) as error:
            model_from_checkpoint({**state, "config": config}, source="evil.pt")
        assert f"evil.pt: {group}._target_={bad['_target_']} is not a model class" in str(
            error.value
        )
        assert not victim.exists()


@pytest.mark.slow
def test_hub_folder_of_a_converted_checkpoint(converted, toy_root, tmp_path, capsys) -> None:
    """scripts/hub_folder.py: the card names where the weights came from and the zoo's scores as
    reported (not measured here); with --scores (evaluate.py's JSON) the measured one too."""
    script = load_script("hub_folder")
    out = tmp_path / "hub_folder"
    args = [str(converted), str(out), "--reported-miou-val", "59.24", "--reported-miou-test",
            "52.89", "--repo-id", "semseg-test/fpn-r50"]  # fmt: skip
    assert script.main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.yaml",
        "model.safetensors",
    ]
    card = ModelCard.load(out / "README.md")
    reported = {r.dataset_split: r for r in card.data.eval_results}
    assert (reported["val"].metric_value, reported["test"].metric_value) == (0.5924, 0.5289)
    assert all(r.source_name.endswith(", not measured here") for r in reported.values())
    assert card.data.license == "apache-2.0" and card.data.library_name == "semseg"
    assert card.text.startswith("# Semantic FPN, resnet18 on toy_bdd100k\n")
    assert "semantic-fpn" in card.data.tags
    assert card.data.model_name == "semantic-fpn-resnet18-toy-bdd100k"
    assert "Weights from `fpn_r50_512x1024_40k_sem_seg_bdd100k.pth`" in card.text
    assert "Not measured here yet" in card.text and "hf://semseg-test/fpn-r50" in card.text
    assert _same_weights(load_model_checkpoint(out)["model"], load_checkpoint(converted)["model"])

    # measured: evaluate the folder, then write the card again with its scores
    report = run_evaluate(entry_config("evaluate", f"checkpoint={out}", "dataset=toy_bdd100k",
                                       f"dataset.root={toy_root}", "dataset.num_workers=0",
                                       "device=cpu", f"output_dir={tmp_path / 'eval'}"))  # fmt: skip
    assert (
        script.main([*args, "--scores", str(tmp_path / "eval/eval_val.json"), "--overwrite"]) == 0
    )
    card = ModelCard.load(out / "README.md")  # the measured val score replaces the reported one
    results = {r.dataset_split: r for r in card.data.eval_results}
    assert (results["val"].metric_value, results["val"].source_name) == (
        report["metrics"]["mIoU"], None
    )  # fmt: skip
    assert results["test"].metric_value == 0.5289 and len(card.data.eval_results) == 2
    assert "| val | 59.24 | reported by the BDD100K model zoo" in card.text  # still listed
    assert "Not measured here yet" not in card.text
    assert f"hf upload semseg-test/fpn-r50 {out}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:  # an existing folder needs --overwrite
        script.main(args)
    assert exit_info.value.code == 2
