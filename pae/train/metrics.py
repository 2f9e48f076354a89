"""Run records: per-epoch metrics as JSON lines and CSV, and a PNG of the curves."""
from __future__ import annotations

import csv
import json
import math
import os
from typing import Mapping

import numpy as np


def summarize(prefix: str, sums: Mapping[str, float], text: bool = False) -> dict[str, float]:
    """Turn metric sums (``loss_sum``, ``correct``, ``count``) into means; text adds bits/char."""
    count = max(float(sums["count"]), 1.0)
    out = {f"{prefix}_loss": float(sums["loss_sum"]) / count,
           f"{prefix}_acc": float(sums["correct"]) / count}
    if text:
        out[f"{prefix}_bpc"] = out[f"{prefix}_loss"] / math.log(2)
    return out


def json_safe(value):
    """``value`` with every non-finite float replaced by None (JSON has no NaN or Infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_history(workdir: str, history: list[dict]) -> None:
    """(Re)write ``metrics.jsonl`` and ``metrics.csv`` from the full history (atomic replace).

    Always valid: a non-finite value is ``null`` in JSON and an empty cell in CSV."""
    os.makedirs(workdir, exist_ok=True)
    rows = [json_safe(row) for row in history]
    atomic_write(os.path.join(workdir, "metrics.jsonl"),
                 "".join(json.dumps(row, allow_nan=False) + "\n" for row in rows))
    columns = list(dict.fromkeys(k for row in rows for k in row))
    tmp = os.path.join(workdir, "metrics.csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, os.path.join(workdir, "metrics.csv"))


def atomic_write(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: never half-written."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def _series(history: list[dict], key: str) -> np.ndarray:
    """``[epochs, runs]`` values of ``key`` (NaN where a row lacks it; one column for a single run)."""
    values = [np.atleast_1d(np.asarray(row.get(key, np.nan), np.float64)) for row in history]
    runs = max(v.size for v in values)
    return np.stack([np.broadcast_to(v, (runs,)) if v.size in (1, runs) else np.full(runs, np.nan)
                     for v in values])


def plot_history(history: list[dict], path: str, title: str = "") -> None:
    """Loss and accuracy per epoch for every split present (one line per parallel run), side by side,
    with the phase boundaries marked and named."""
    from matplotlib.figure import Figure   # no pyplot: the caller's backend and figures stay as they are

    epochs = np.array([row["epoch"] for row in history])
    starts = [i for i, row in enumerate(history)
              if i == 0 or row.get("phase_index") != history[i - 1].get("phase_index")]
    fig = Figure(figsize=(10, 3.8))
    axes = fig.subplots(1, 2)
    for ax, metric in zip(axes, ("loss", "acc")):
        for n, split in enumerate(("train", "val", "test")):
            key = f"{split}_{metric}"
            if not any(key in row for row in history):
                continue
            values = _series(history, key)
            shown = ~np.isnan(values[:, 0])
            for run in range(values.shape[1]):
                ax.plot(epochs[shown], values[shown, run], marker="o", ms=3, color=f"C{n}",
                        alpha=1.0 if values.shape[1] == 1 else 0.6, label=split if run == 0 else None)
        if len(starts) > 1:
            for i in starts:
                ax.axvline(epochs[i] - 0.5, color="gray", ls="--", lw=0.8)
                ax.text(epochs[i] - 0.4, 1.0, history[i].get("phase", ""), rotation=90, va="top",
                        fontsize=7, color="gray", transform=ax.get_xaxis_transform())
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy" if metric == "acc" else "cross-entropy")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
