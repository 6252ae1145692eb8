"""The result as text (progress lines, markdown tables) and its headline numbers (``summary``)."""

from __future__ import annotations

from typing import Any

_SETTING_KEYS = ("precision", "channels_last", "compile")
_TRAIN_COLUMNS = {
    "precision": "precision", "channels_last": "channels_last", "compile": "compile",
    "batch_size": "batch", "s_per_step": "s/step", "img_per_s": "img/s",
    "peak_mem_mb": "peak MiB", "warmup_peak_mem_mb": "warm-up peak MiB",
    "compile_s": "compile s", "achieved_tflops": "TFLOP/s",
    "peak_fraction": "of matmul peak", "speedup_vs_fp32_nchw": "speed-up vs fp32 NCHW",
    "cpu_share": "CPU share",
}  # fmt: skip
_DATA_COLUMNS = {
    "pipeline": "pipeline", "workers": "workers", "img_per_s": "img/s",
    "img_per_s_per_worker": "img/s per worker",
}  # fmt: skip
_INFER_COLUMNS = {
    "precision": "precision", "channels_last": "channels_last", "compile": "compile",
    "batch_size": "batch", "s_per_step": "s/batch", "img_per_s": "img/s",
    "peak_mem_mb": "peak MiB", "achieved_tflops": "TFLOP/s", "peak_fraction": "of matmul peak",
    "cpu_share": "CPU share",
}  # fmt: skip


def format_row(row: dict[str, Any]) -> str:
    """One measured row as a progress line."""
    keys = (*_SETTING_KEYS, "pipeline", "workers", "batch_size", "s_per_step", "img_per_s",
            "peak_mem_mb", "peak_fraction")  # fmt: skip
    parts = []
    for k in keys:
        if k in row:
            v = row[k]
            parts.append(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts)


def _cell(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "on", False: "off", None: "-"}[value]
    if isinstance(value, float):
        if value != value:
            return "nan"
        return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)


def _table(rows: list[dict[str, Any]], columns: dict[str, str]) -> str:
    """A markdown table of ``rows``: the ``columns`` that any row has, in their order."""
    keys = [c for c in columns if any(c in row for row in rows)]
    header = "| " + " | ".join(columns[k] for k in keys) + " |"
    rule = "|" + "|".join("---" for _ in keys) + "|"
    body = ["| " + " | ".join(_cell(row.get(k)) for k in keys) + " |" for row in rows]
    return "\n".join([header, rule, *body])


def _describe(setting: dict[str, Any]) -> str:
    layout = "channels_last" if setting["channels_last"] else "NCHW"
    compiled = {False: "", True: ", compiled", "cuda_graphs": ", CUDA graphs"}[setting["compile"]]
    return f"{setting['precision']}, {layout}{compiled}"


def format_auto(auto: dict[str, Any]) -> str:
    """The setting ``auto`` picks next to the fastest measured one, with the ratio of the two."""
    fastest = auto["fastest"]
    picked = f"auto (precision and channels_last) picks {_describe(auto)}"
    best = f"fastest measured: {_describe(fastest)}, {fastest['s_per_step']:.3g} s/step"
    if not auto["measured"]:
        flags = f"--precision {auto['precision']} --channels-last {_cell(auto['channels_last'])}"
        return f"{picked} (not measured: add {flags}); {best}"
    return (
        f"{picked}, {auto['s_per_step']:.3g} s/step; {best}; auto / fastest = {auto['ratio']:.2f}"
    )


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers: fastest train setting, ours vs direct data, loader vs training."""
    out: dict[str, Any] = {}
    if result.get("train"):
        best = max(result["train"], key=lambda r: r["img_per_s"])
        keys = (*_SETTING_KEYS, "s_per_step", "img_per_s", "peak_fraction")
        out["train_best"] = {k: best[k] for k in keys}
    if result.get("data"):
        out["data_ours_vs_direct"] = result["data"]["ours_vs_direct"]
        loaders = [r for r in result["data"]["rows"] if r["pipeline"] == "ours_dataloader"]
        if loaders:
            fastest = max(loaders, key=lambda r: r["img_per_s"])
            out["loader_best"] = {"workers": fastest["workers"], "img_per_s": fastest["img_per_s"]}
            if "train_best" in out:
                # >= 1: the loader delivers images at least as fast as the fastest train step eats them
                out["loader_vs_train"] = fastest["img_per_s"] / out["train_best"]["img_per_s"]
    if result.get("infer"):
        best = max(result["infer"], key=lambda r: r["img_per_s"])
        out["infer_best"] = {k: best[k] for k in (*_SETTING_KEYS, "batch_size", "img_per_s")}
    return out


def _header(result: dict[str, Any]) -> list[str]:
    env, model = result["env"], result["model"]
    where = env.get("gpu") or f"{env.get('cpu', 'CPU')} ({env['torch_threads']} threads)"
    lines = [
        f"device: {env['device']} - {where}; torch {env['torch']}; "
        f"load average at start {env['load_avg_start'][0]:.2f}, at end {env['load_avg_end'][0]:.2f}",
        f"model: {model['model']} + {model['backbone']}",
    ]
    if "params" in model:
        crop, size = model["train_crop"], model["infer_size"]
        lines.append(
            f"  {model['params'] / 1e6:.2f}M parameters; per image: {model['forward_gflops_per_image']:.1f} "
            f"GFLOPs forward / {model['train_gflops_per_image']:.1f} GFLOPs train at {crop[0]}x{crop[1]}, "
            f"{model['infer_gflops_per_image']:.1f} GFLOPs forward at {size[0]}x{size[1]}"
        )
        peaks = ", ".join(f"{p} {v:.3g}" for p, v in result["matmul_peak"]["tflops"].items())
        lines.append(f"  matmul peak ({result['matmul_peak']['size']}^2): {peaks} TFLOP/s")
    return lines


def _section(
    title: str, rows: list[dict[str, Any]], columns: dict[str, str], *notes: str
) -> list[str]:
    return ["", f"{title}:", _table(rows, columns), *notes]


def _loader_note(summary: dict[str, Any]) -> list[str]:
    if "loader_vs_train" not in summary:
        return []
    workers, ratio = summary["loader_best"]["workers"], summary["loader_vs_train"]
    return [
        f"loader with {workers} workers delivers {ratio:.2f}x the images/s of the fastest "
        "training step"
    ]


def format_report(result: dict[str, Any]) -> str:
    """The result as text: a header with the machine and model, then markdown tables."""
    lines = _header(result)
    if "train" in result:
        crop = result["train"][0]["crop"]
        title = f"Training step ({crop[0]}x{crop[1]} crop, project train_step)"
        lines += _section(title, result["train"], _TRAIN_COLUMNS, format_auto(result["auto"]))
    if "data" in result:
        data = result["data"]
        title = (
            f"Data pipeline (train recipe, {data['image_size'][1]}x{data['image_size'][0]} "
            f"files -> {data['crop'][0]}x{data['crop'][1]} crops; ours / direct with the same "
            f"transforms = {data['ours_vs_direct']:.2f}, ours / stock albumentations = "
            f"{data['ours_vs_stock']:.2f})"
        )
        lines += _section(
            title, data["rows"], _DATA_COLUMNS, *_loader_note(result.get("summary", {}))
        )
    if "infer" in result:
        size = result["infer"][0]["size"]
        title = f"Inference (whole image {size[0]}x{size[1]})"
        lines += _section(title, result["infer"], _INFER_COLUMNS)
    return "\n".join(lines)
