"""The structured-growth experiment (experiments/grow_structured.py) in a reduced setting: the search
grows from the seed and settles at the budget on a compacted net, the extracted net computes the
gated logits at no more than the budget's FLOPs, and every method is there at matched FLOPs."""
import json

import jax
import numpy as np
import pytest
from flax import traverse_util


def test_reduced_experiment_grows_settles_and_extracts(tmp_path, monkeypatch, load_script):
    gs = load_script("grow_structured")
    monkeypatch.chdir(tmp_path)   # results go under ./runs/grow_structured by default
    budget = 0.5
    # the default penalty (count); grows at margin 0.5, settles (margin 0) at epoch 4
    results = gs.main(["--models", "vgg3t", "--seeds", "0", "--epochs", "8", "--restructure-at", "0", "4",
                       "--margin", "0.5", "0", "--slim-finetune", "2", "--limit-train", "256",
                       "--batch-size", "32", "--mask-lr", "1", "--lmbda", "10", "--beta-final", "5",
                       "--budget", str(budget), "--name", "tiny"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]
    out = tmp_path / "runs" / "grow_structured"
    result = results["vgg3t"]
    assert sorted(r["method"] for r in result["rows"]) == sorted(gs.DEFAULT_METHODS)
    search = result["per_seed"][0]["search"]
    flops = np.array([r["flops"] for r in search["history"]])
    lam = np.array([r["lambda"] for r in search["history"]])
    assert search["seed_flops"] < 0.15 and lam[0] < 0             # starts small, under budget
    assert flops.max() > 0.4 and np.argmax(flops > 0.4) > 0       # grew, not at the first epoch
    assert abs(flops[-1] - budget) < 0.08                          # settled near the budget
    # the settling restructuring cut the net to its active channels within the budget (fit_budget)
    settle_epoch, settled = search["widths"][-1]
    assert settle_epoch == 4 and flops[3] > budget >= flops[4] and flops.max() > budget
    # trained on the compacted net (seed + margin), not the full one
    widths = np.array([r["width_flops"] for r in search["history"]])
    assert np.all(widths < 0.9) and np.all(widths >= flops - 1e-6)
    assert search["train_flops_executed"] == pytest.approx(widths.mean())
    # the extracted net computes the gated (evaluation) logits, at the counted FLOPs
    assert search["extract_max_abs_diff"] < 1e-4
    # capped groups: learned width == the last growing restructuring's width < the group's size
    last = dict(search["widths"][-2][1])
    assert search["at_capacity"] == sorted(g for g, n in search["learned_widths"].items()
                                           if g in last and n == last[g] < search["original_widths"][g])
    rows = {r["method"]: r for r in result["rows"]}
    assert rows["grown"]["flops"] == pytest.approx(flops[-1], rel=1e-5)
    assert rows["grown"]["flops"] <= budget + 0.05
    assert rows["grown"]["test_acc"] == pytest.approx(search["gated_acc_last_epoch"], abs=1e-6)
    # the baselines are matched to the grown net's inference FLOPs: slimming from below, uniform nearest
    assert rows["grown"]["flops"] - 0.12 < rows["slimming"]["flops"] <= rows["grown"]["flops"] + 1e-9
    assert abs(rows["uniform"]["flops"] - rows["grown"]["flops"]) < 0.06
    assert rows["full"]["test_acc"] > 0.3                          # chance is 0.1
    timing = result["per_seed"][0]["timing"]
    assert timing["search_compile_s"] > 0 and timing["full_compile_s"] > 0
    assert timing["ratio_train"] == pytest.approx((timing["search_s"] - timing["search_compile_s"])
                                                  / (timing["full_s"] - timing["full_compile_s"]))
    saved = json.load(open(out / "grow_structured_vgg3t_tiny.json"))
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    assert (out / "grow_structured_vgg3t_tiny.png").stat().st_size > 10_000
    assert set(saved["targets"]) >= {"grown_flops_le_budget", "grown_within_1pt_of_full",
                                     "grown_above_uniform", "train_flops_counted", "wallclock_ratio",
                                     "wallclock_ratio_train", "uniform_flops"}
    assert len(saved["per_seed"][0]["timing"]["loadavg"]) == 3


def test_at_capacity_names_groups_with_no_room_left(load_script):
    gs = load_script("grow_structured")
    sizes = {"a": 16, "b": 32, "c": 64}
    restructurings = [(0, {"a": 8, "b": 16, "c": 32}), (5, {"a": 12, "b": 32, "c": 48})]
    # a: at its last width 12 < 16 (capped); b: at 32, its full size (not capped); c: 40 < 48 (room)
    assert gs.at_capacity({"a": 12, "b": 32, "c": 40}, restructurings, sizes) == ["a"]
    assert gs.at_capacity({"a": 11, "b": 30, "c": 48}, restructurings, sizes) == ["c"]
    assert gs.at_capacity({"a": 11, "b": 30, "c": 48}, [], sizes) == []     # masked full-size search
    # a settling restructuring (margin 0) cuts to the active channels: the cap is the one before it
    settled = restructurings + [(8, {"a": 12, "b": 30, "c": 40})]
    assert gs.at_capacity({"a": 12, "b": 30, "c": 40}, settled, sizes, [0.25, 0.25, 0.0]) == ["a"]
    assert gs.at_capacity({"a": 12, "b": 30, "c": 40}, settled, sizes) == ["a", "b", "c"]


def test_methods_subset_and_margin_flags(tmp_path, monkeypatch, load_script):
    gs = load_script("grow_structured")
    monkeypatch.chdir(tmp_path)
    tiny = ["--models", "vgg3t", "--seeds", "0", "--epochs", "2", "--limit-train", "64", "--batch-size", "32",
            "--slim-finetune", "1", "--name", "tiny"]
    with pytest.raises(ValueError, match="--margin: give one value or one per --restructure-at epoch"):
        gs.main(tiny + ["--restructure-at", "0", "1", "--margin", "0.25", "0.25", "0"])
    with pytest.raises(ValueError, match="--margin values must be in"):
        gs.main(tiny + ["--restructure-at", "0", "--margin", "1.5"])
    result = gs.main(tiny + ["--restructure-at", "0", "--methods", "uniform", "full"])["vgg3t"]
    # the baselines alone, matched to the budget's FLOPs; no search, so no figure and no timing
    assert [r["method"] for r in result["rows"]] == ["full", "uniform"]
    assert abs(result["rows"][1]["flops"] - 0.5) < 0.1
    assert result["targets"] == {"seeds": 1}
    assert sorted(p.name for p in (tmp_path / "runs" / "grow_structured").iterdir()) == [
        "grow_structured_vgg3t_tiny.json"]
    # the opt-in control: the grown net's architecture trained from a fresh initialization
    result = gs.main(tiny + ["--restructure-at", "0", "--methods", "scratch", "grown", "--no-plot"])["vgg3t"]
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == ["grown", "scratch"]
    assert rows["scratch"]["flops"] == rows["grown"]["flops"] and rows["scratch"]["params"] == rows["grown"]["params"]
    assert "grown_above_scratch" in result["targets"]


def test_restructurings_are_taken_in_epoch_order_with_their_margins(load_script):
    gs = load_script("grow_structured")
    args = gs.resolve(gs.build_parser().parse_args(["--restructure-at", "6", "0", "3", "--margin", "0", "0.25", "0.5"]))
    assert args.restructure_at == [0, 3, 6] and args.margin == [0.25, 0.5, 0.0]
    learned, sizes = {"a": 6, "b": 9}, {"a": 8, "b": 16}
    widths = [(0, {"a": 4, "b": 6}), (3, {"a": 6, "b": 9}), (6, {"a": 6, "b": 9})]
    assert gs.at_capacity(learned, widths, sizes, args.margin) == ["a", "b"]   # the last growing one is epoch 3's


@pytest.mark.parametrize("argv, message", [
    (["--budget", "1.5"], "budget must be in (0, 1]"),
    (["--budget", "0"], "budget must be in (0, 1]"),
    (["--paper", "imagenet-resnet50", "--epochs", "10"], "slim-finetune"),
    (["--restructure-at", "99"], "restructure-at"),
    (["--epochs", "6"], "(the default; set --restructure-at for fewer epochs)"),
    (["--restructure-at", "0", "3", "--margin", "0", "0.25"], "settle last"),
    (["--models", "mlp"], "invalid choice"),
    (["--methods", "scratch", "full"], "add 'grown'"),
])
def test_bad_input_is_one_line(argv, message, capsys, load_script):
    gs = load_script("grow_structured")
    from pae.train.cli import run_script
    with pytest.raises(SystemExit) as err:
        run_script(gs.main, argv)
    assert err.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


def test_uniform_and_slimming_helpers_hit_the_target(load_script):
    """uniform_nearest returns the uniform thinning nearest a FLOPs fraction (against a brute force
    over all width pairs with one common fraction), slimming_masks the widest thinning under it."""
    gs = load_script("grow_structured")
    from pae.growth import flops as pf, structured as ps
    from pae.models import CifarResNet
    x = np.zeros((1, 8, 8, 3), np.float32)
    spec = ps.gate_spec(CifarResNet(14, 10, (8, 16, 16)), x)
    full = pf.full_cost(spec)
    assert sorted({n for _, n in spec.groups}) == [8, 16]
    brute = []                    # (FLOPs fraction, a, b): widths a of the 8s and b of the 16s
    for a in range(1, 9):
        for b in range(1, 17):
            # a common r with |a - 8 r| < 1 and |b - 16 r| < 1 (intervals intersect), or a width at 1
            lo = max((a - 1) / 8, (b - 1) / 16, 0.0)
            hi = min((a + 1) / 8, (b + 1) / 16)
            if lo < hi:
                masks = {g: (np.arange(n) < (a if n == 8 else b)).astype(np.float32) for g, n in spec.groups}
                brute.append((float(pf.cost(spec, masks, {})) / full, a, b))
    for target in (0.3, 0.5, 0.77):
        thin, widths, f = gs.uniform_nearest(spec, target)
        assert f == pytest.approx(pf.full_cost(ps.gate_spec(thin, x)) / full, rel=1e-6)
        best = min(brute, key=lambda t: (abs(t[0] - target), t[0]))
        assert f == pytest.approx(best[0], rel=1e-6), (target, widths, best)
        assert abs(f - target) < 0.03
        assert len({widths[g] for g, n in spec.groups if n == 8}) == 1   # equal widths stay equal
    rng = np.random.default_rng(0)
    params = spec.model.init(jax.random.PRNGKey(0), x)["params"]
    params = jax.tree_util.tree_map_with_path(
        lambda p, v: rng.uniform(0, 1, v.shape).astype(np.float32) if p[-1].key == "scale" else v, params)
    masks = gs.slimming_masks(spec, params, 0.5)
    f = float(pf.cost(spec, {g: m.astype(np.float32) for g, m in masks.items()}, {})) / full
    assert 0.35 < f <= 0.5
    # a global threshold: every kept channel scores at least every dropped one (groups with more
    # than their forced best channel)
    flat = {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}
    scores = {g: np.mean([np.abs(flat[f"{layer.norm}/scale"]) for layer in spec.writers(g) if layer.norm],
                         axis=0) for g, _ in spec.groups}
    kept = np.concatenate([scores[g][m] for g, m in masks.items() if m.sum() > 1])
    dropped = np.concatenate([scores[g][~m] for g, m in masks.items()])
    assert kept.min() > dropped.max()
