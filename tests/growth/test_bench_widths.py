"""experiments/bench_widths.py: step time against channel widths, dense and gated, side by side.
Timings are not asserted (machines are shared and noisy); what the table means is."""
from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def bench(load_script):
    return load_script("bench_widths", "bench_widths")


def _macs(w, depth=8, hw=28, classes=10):
    """Multiply-accumulates of a CIFAR ResNet counted by hand (3x3 convs, 1x1 downsampling shortcuts
    of stages 1 and 2, the classifier), one block per stage for depth 8."""
    n = (depth - 2) // 6
    sizes = [hw, -(-hw // 2), -(-hw // 4)]
    total = sizes[0] ** 2 * 9 * 1 * w[0]                       # stem
    for s in range(3):
        for b in range(n):
            cin = w[s - 1] if (b == 0 and s > 0) else w[s]
            total += sizes[s] ** 2 * 9 * cin * w[s] + sizes[s] ** 2 * 9 * w[s] * w[s]
            if b == 0 and s > 0:
                total += sizes[s] ** 2 * cin * w[s]
    return total + w[2] * classes


def test_table_of_flops_and_times(bench, tmp_path):
    out = tmp_path / "b.json"
    result = bench.main(["--depth", "8", "--widths", "8-16-32", "4-8-16", "--batch", "8", "--repeats", "2",
                         "--gated", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"])) and saved["depth"] == 8
    ref, half = result["rows"]
    assert ref["flops"] == 1.0 and ref["time"] == 1.0
    assert half["flops"] == pytest.approx(_macs((4, 8, 16)) / _macs((8, 16, 32)), rel=1e-6)
    for r in result["rows"]:
        assert r["dense_ms"] > 0 and r["gated_ms"] > 0
        assert r["time"] == pytest.approx(r["dense_ms"] / ref["dense_ms"])
        assert r["gated_over_dense"] == pytest.approx(r["gated_ms"] / r["dense_ms"])


def test_bad_widths_are_one_clear_error(bench, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--widths", "16-32", "--out", "unused.json"])
    assert "three positive stage widths" in capsys.readouterr().err
    assert bench.parse_widths("4-8-16") == (4, 8, 16)
    with pytest.raises(ValueError, match="--widths"):
        bench.parse_widths("4-0-16")
