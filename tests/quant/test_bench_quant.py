"""experiments/bench_quant.py: the exported model's inference against the float model's, side by
side. Timings are not asserted (machines are shared and noisy); what the table means is."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pae import models


@pytest.fixture(scope="module")
def bench(load_script):
    return load_script("bench_quant", "bench_quant")


def test_inference_rows_time_the_right_programs_and_count_bytes(bench):
    rows = bench.compare_inference("lenet5", (28, 28, 1), batches=(1, 3), repeats=1)
    variables = models.get_model("lenet5", 10).init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
    n_params = sum(np.size(leaf) for leaf in jax.tree.leaves(variables))
    assert [r["batch"] for r in rows] == [1, 3]
    for r in rows:
        assert r["max_abs_diff"] < 1e-4                      # the exported program is the phase-2 net
        assert r["ratio"] == pytest.approx(r["exported_ms"] / r["fp_ms"])
        assert r["fp32_bytes"] == 4 * n_params
        assert r["file_bytes"] < r["fp32_bytes"] / 4         # codes of at most 8 bits, a few floats
        assert r["memory_bytes"] >= r["file_bytes"]          # tile padding only adds
        assert r["layers"] == 5 and r["two_level_layers"] >= 1   # the slower, two-GEMM case is timed


def test_main_writes_the_parts_asked_for_and_refuses_bad_counts(bench, tmp_path):
    out = tmp_path / "b.json"
    record = bench.main(["--model", "lenet5", "--parts", "inference", "--inference-batches", "2",
                         "--repeats", "1", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert "row" not in saved and [r["batch"] for r in saved["inference"]] == [2]
    assert saved["inference"][0]["fp_ms"] == pytest.approx(record["inference"][0]["fp_ms"])
    assert saved["command"].endswith("--out " + str(out))
    with pytest.raises(ValueError, match="--inference-batches"):
        bench.main(["--inference-batches", "0", "--out", str(out)])
