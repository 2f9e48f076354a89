"""experiments/grow_vt.py, reduced: every method of the ablation side by side on digits with a tiny
VGG, one growth step. Run as a subprocess (its persistent compilation cache stays out of this
process's JAX configuration)."""
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from pae import growth

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "experiments" / "grow_vt.py"
METHODS = ["fixed_full", "fixed_small", "net2net", "random_pairs", "vt", "lra", "full", "gradmax"]
EPOCHS, FIRST = 4, 1


def _macs(c0, c1):
    """Independent count for GrowableVGG((c0, 'M', c1)) on 8x8x1 digits, 10 classes: conv0 at 8x8,
    2x2 pool, conv1 at 4x4, global pool, fc."""
    return 8 * 8 * 9 * 1 * c0 + 4 * 4 * 9 * c0 * c1 + c1 * 10


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("grow_vt")
    cmd = [sys.executable, str(SCRIPT), "--model", "vgg_tiny", "--dataset", "digits", "--epochs", str(EPOCHS),
           "--first-epochs", str(FIRST), "--growth-steps", "1", "--seeds", "0", "--lr", "0.2", "--batch-size", "64",
           "--out-dir", str(out), "--compilation-cache", str(out / "cache")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "grow_vt_vgg_tiny_digits.json").read_text())
    assert (out / "grow_vt_vgg_tiny_digits.png").stat().st_size > 1000
    return data, proc.stdout


def test_every_method_is_in_the_table(result):
    data, stdout = result
    assert [r["method"] for r in data["summary"]] == METHODS
    assert all(r["n"] == 1 for r in data["summary"])
    for label in ("fixed full width", "Net2Net copying", "GradMax-style", "full (VT + LRA)"):
        assert label in stdout


def test_growth_runs_end_at_the_final_widths(result):
    data, _ = result
    start = growth.width_schedule({"conv0": 8, "conv1": 16}, steps=1)[0]
    for row in data["rows"]:
        assert row["param_shapes_match_final"]
        if row["method"] == "fixed_small":
            assert row["final_widths"] == start
        else:
            assert row["final_widths"] == {"conv0": 8, "conv1": 16}
        if row["method"] not in ("fixed_full", "fixed_small"):
            assert row["stage_widths"] == [start, {"conv0": 8, "conv1": 16}]
            assert [h["stage"] for h in row["history"]] == [0] * FIRST + [1] * (EPOCHS - FIRST)


def test_training_flops_fractions_match_an_independent_count(result):
    data, _ = result
    s = {r["method"]: r for r in data["summary"]}
    start = growth.width_schedule({"conv0": 8, "conv1": 16}, steps=1)[0]
    full, small = _macs(8, 16), _macs(start["conv0"], start["conv1"])
    grown = (FIRST * small + (EPOCHS - FIRST) * full) / (EPOCHS * full)
    assert data["full_width_macs"] == full
    assert s["fixed_full"]["flops_rel"] == 1.0
    assert s["fixed_small"]["flops_rel"] == pytest.approx(small / full, rel=1e-9)
    for m in METHODS[2:]:
        assert s[m]["flops_rel"] == pytest.approx(grown, rel=1e-9)
    assert s["full"]["flops_rel"] < s["fixed_full"]["flops_rel"] - 0.2
    assert data["targets"]["full_flops_at_most_60pct"] == (grown <= 0.6)


def test_accuracy_above_chance_and_times_recorded(result):
    data, _ = result
    s = {r["method"]: r for r in data["summary"]}
    assert s["fixed_full"]["test_acc"] > 0.5 and s["full"]["test_acc"] > 0.5     # chance: 0.1
    for row in data["rows"]:
        assert row["wall_s"] > 0 and 0 <= row["compile_s"] < row["wall_s"] + 1e-6
        assert len(row["loadavg_before"]) == 3 and len(row["loadavg_after"]) == 3
    assert data["complete"] and data["seeds_done"] == [0]
    assert data["compilation_cache"]["files_at_start"] == 0          # a fresh cache directory: cold
    for r in data["summary"]:                                          # one seed: first seed = all
        assert r["wall_rel_first_seed"] == pytest.approx(r["wall_rel"]) and r["wall_rel_later_seeds"] is None
    assert set(data["targets"]["ordering"]) == {"random_pairs >= net2net", "vt >= random_pairs",
                                                "lra >= random_pairs", "full >= vt", "full >= lra"}


def test_lra_multipliers_recorded_for_lra_runs_only(result):
    """Stage 0's multiplier is ||W_0|| / ||W_0|| = 1 in every layer; the stage born at the growth
    step has its own, positive, finite multipliers."""
    data, _ = result
    for row in data["rows"]:
        m = row["lra_multipliers"]
        if row["method"] not in ("lra", "full"):
            assert m is None
            continue
        assert [s["stage"] for s in m] == [0, 1]
        assert m[0]["min"] == pytest.approx(1.0) and m[0]["max"] == pytest.approx(1.0)
        assert 0 < m[1]["min"] <= m[1]["median"] <= m[1]["max"] < np.inf


def test_first_and_later_seed_wall_ratios(load_script):
    """Synthetic rows (no training): the first listed seed's ratio and the later seeds' ratio of mean
    walls, each against fixed_full's walls of the same seeds; the table follows METHODS' order."""
    script = load_script("grow_vt")
    walls = {("fixed_full", 3): 100.0, ("fixed_full", 1): 80.0, ("fixed_full", 2): 90.0,
             ("full", 3): 95.0, ("full", 1): 40.0, ("full", 2): 60.0}
    rows = [{"method": m, "seed": s, "test_acc": 0.9, "train_flops": 1.0 if m == "fixed_full" else 0.5,
             "wall_s": w, "train_s": w - 1.0, "compile_s": 1.0, "loadavg_before": [1.0, 1.0, 1.0]}
            for (m, s), w in walls.items()]
    summary = {r["method"]: r for r in script.summarize(rows, ["fixed_full", "full"])}
    assert summary["full"]["wall_rel_first_seed"] == pytest.approx(95.0 / 100.0)
    assert summary["full"]["wall_rel_later_seeds"] == pytest.approx(np.mean([40.0, 60.0]) / np.mean([80.0, 90.0]))
    assert summary["full"]["wall_rel"] == pytest.approx(np.mean([95.0, 40.0, 60.0]) / np.mean([100.0, 80.0, 90.0]))
    targets = script.check_targets(list(summary.values()))
    assert not targets["full_wall_clock_first_seed_at_most_70pct"]
    assert targets["full_wall_clock_later_seeds_at_most_70pct"]


@pytest.mark.parametrize("flags,message", [
    (["--model", "resnet50"], "--model resnet50: ResNet-50 is not growable"),
    (["--methods", "full"], "--methods must include fixed_full"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--seeds", "1", "1"], "must not repeat"),
])
def test_bad_flags_fail_clearly(flags, message, load_script):
    script = load_script("grow_vt")
    with pytest.raises(ValueError, match=message):
        script.resolve(script.build_parser().parse_args(flags))


def test_a_bad_flag_is_one_line_on_the_command_line(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out-dir", str(tmp_path), "--model", "resnet50"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --model resnet50: ResNet-50 is not growable")


def test_mnist_cpu_preset_widths_and_flops(load_script):
    """--preset mnist_cpu: ResNet-8 at (32, 64, 128) on mnist_subset, batch 64, stage widths rounded
    to multiples of 8 (each stage's widths a multiple of 8, growing, ending at the full widths); its
    training FLOPs, counted from the stages' shapes with the schedule's epochs, stay under the 60 %
    target; a flag given on the command line wins over the preset."""
    script = load_script("grow_vt")
    args = script.resolve(script.build_parser().parse_args(["--preset", "mnist_cpu"]))
    assert (args.model, args.dataset, args.width_multiple, args.batch_size) == ("resnet8w", "mnist_subset", 8, 64)
    model = script.MODELS[args.model](10)
    cfg = script.vt_config(args, "full", 0)
    stages = growth.stage_models(cfg, model)
    widths = [tuple(m.widths) for m in stages]
    assert widths[-1] == (32, 64, 128) and len(widths) == args.growth_steps + 1
    assert all(w % 8 == 0 for ws in widths for w in ws)
    assert all(a <= b for prev, cur in zip(widths, widths[1:]) for a, b in zip(prev, cur))
    example = np.zeros((1, 28, 28, 1), np.float32)
    macs = [script.forward_macs(m, example) for m in stages]
    fraction = sum(e * m for e, m in zip(cfg.epochs(), macs)) / (args.epochs * macs[-1])
    assert 0.4 < fraction < 0.6
    override = script.resolve(script.build_parser().parse_args(["--preset", "mnist_cpu", "--batch-size", "128"]))
    assert override.batch_size == 128 and override.model == "resnet8w"
