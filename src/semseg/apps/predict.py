"""What ``src/predict.py`` does: BDD100K-format masks, colour maps (and overlays) of a dataset
split or of any folder of images, read as the datasets read them, and the test-server file
(``submission/<dataset.toolkit_task>.json``, Scalabel RLE frames) of the masks."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from semseg.apps.common import (
    batch_size,
    eval_loader,
    ignored_class,
    load_inference_model,
    output_dir,
    process_group,
    split_loader,
)
from semseg.data import ImageFolder, build_eval_transform, eval_scale, read_rgb
from semseg.distributed import all_gather_object
from semseg.errors import ConfigError
from semseg.evaluation import predict_batches, save_prediction
from semseg.evaluation.submission import write_rle_file

log = logging.getLogger(__name__)


def run_predict(cfg: DictConfig) -> Path:
    """Write masks/colormaps(/overlays) for ``input_dir`` or ``dataset.split``; return the folder.

    Each file is written atomically as its image is predicted: a full disk stops the command with
    one line naming the folder, and the files written before it stay whole."""
    if not cfg.get("checkpoint"):
        raise ConfigError("set checkpoint=PATH (a checkpoint of this project) to predict with")
    out_dir = Path(cfg.output_dir) if cfg.get("output_dir") else output_dir(cfg) / "predictions"
    with process_group(cfg.get("device", "auto")) as env:
        loaded = load_inference_model(cfg, env.device)
        scale = eval_scale(loaded.dataset_cfg)
        log.info("predicting at scale %s", "x".join(map(str, scale)) if scale else "native")
        if cfg.get("input_dir"):
            images = ImageFolder(
                cfg.input_dir, transform=build_eval_transform(scale), what="input_dir"
            )
            # Any image sizes: one at a time.
            loader = eval_loader(images, loaded.dataset_cfg, 1, env)
        else:
            dataset_cfg = loaded.dataset_cfg
            size = batch_size(cfg, dataset_cfg)
            loader = split_loader(dataset_cfg, dataset_cfg.split, size, env)
        sources = dict(zip(loader.dataset.names, loader.dataset.image_paths, strict=True))
        count = 0
        predictions = predict_batches(
            loaded.model, loader, env.device, loaded.inference, loaded.precision, loaded.num_classes
        )
        for batch, pred in predictions:
            for name, mask in zip(batch["name"], pred.to(torch.uint8).cpu().numpy(), strict=True):
                image = read_rgb(sources[name]) if cfg.get("overlays") else None
                save_prediction(
                    out_dir, name, mask, loaded.meta["palette"], image, bool(cfg.get("overlays"))
                )
                count += 1
        total = sum(all_gather_object(count))  # each rank predicted its share of the images
    if env.is_main:
        log.info("wrote %d predictions to %s", total, out_dir)
        task = loaded.dataset_cfg.get("toolkit_task")
        if cfg.get("submission") and task:
            # Every rank's masks are written (the gather above waited for them): rank 0 encodes.
            masks = [
                (Path(path).name, out_dir / "masks" / f"{name}.png")
                for name, path in sources.items()
            ]
            # The toolkit's "ignored" class (drivable background) gets no label, as its to_rle
            # writes the files.
            ignored = ignored_class(loaded.meta, loaded.dataset_cfg)
            labelled = [n for n in loaded.class_names if n != ignored]
            rle = write_rle_file(out_dir / "submission" / f"{task}.json", masks, labelled)
            log.info("wrote the %s test-server file %s (Scalabel RLE frames)", task, rle)
    return out_dir
