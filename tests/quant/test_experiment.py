"""The quantization experiment (experiments/quantize.py) in a reduced setting: LeNet-5 on a subset
of the embedded MNIST digits, a few epochs. The learned palette trains, reaches its bit budget, its
export is smaller than fp32 by the expected factor and computes what phase 2 computed, and the table
covers every method asked for (qwix's rows only where qwix is installed)."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest

BUDGET = 3.0


@pytest.fixture(scope="module")
def ex(load_script):
    return load_script("quantize", "quantize_experiment")  # dataclasses look their module up there


@pytest.fixture(scope="module")
def reduced(ex, tmp_path_factory):
    """One reduced run (all methods; qwix rule sets only if qwix is installed), from a fresh dir."""
    work = tmp_path_factory.mktemp("quantize")
    argv = ["--train-size", "1500", "--test-size", "500", "--noise-epochs", "2", "--finetune-epochs", "1",
            "--lr", "3e-3", "--bits-lr", "0.05", "--b-init", "5", "--budgets", str(BUDGET),
            "--ptq-bits", "8", "2", "--qat-bits", "2", "--qwix-rules", "first_last_8_rest_4",
            "--methods", "fp", "ptq", "qat", "learned", "qwix", "--name", "ci"]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)    # results go under ./runs/quantize by default
        result = ex.main(argv)
    return work, result


def _rows(result, method):
    return [r for r in result["rows"] if r["method"] == method]


def test_writes_json_and_png_under_runs_by_default(reduced):
    work, result = reduced
    assert sorted(p.name for p in work.iterdir()) == ["runs"]
    out = work / "runs" / "quantize"
    saved = json.loads((out / "quantize_ci.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    assert (out / "quantize_ci.png").stat().st_size > 20_000
    assert (out / "quantize_ci.seed0.json").exists()


def test_the_table_covers_every_method_requested(ex, reduced):
    _, result = reduced
    want = {("fp", "fp32"), ("ptq", "8"), ("ptq", "2"), ("qat", "2"), ("learned", "3")}
    if ex.qwix_available():
        want |= {("qwix", "first_last_8_rest_4")}
    got = {(r["method"], r["setting"]) for r in result["summary"]}
    assert got == want
    lines = ex.table(result["summary"], text=False).splitlines()
    assert len(lines) == 1 + len(want)
    for r in result["summary"]:
        assert sum(r["label"] in line for line in lines) == 1


def test_learned_palette_trains_and_reaches_its_budget(reduced):
    _, result = reduced
    (fp,), (learned,) = _rows(result, "fp"), _rows(result, "learned")
    assert fp["test_acc"] > 0.8 and learned["test_acc"] > 0.8          # chance is 0.1
    assert abs(learned["learned_weight_bits"] - BUDGET) < 0.2          # phase 1 holds the budget
    assert abs(learned["weight_bits"] - BUDGET) < 0.6                  # the palette stays near it
    for layer, counts in learned["palettes"].items():
        levels = sorted(int(b) for b in counts)
        assert len(levels) in (1, 2), layer
        if len(levels) == 2:
            assert 1 <= levels[0] <= 4 <= levels[1] <= 8, (layer, levels)
    widths = np.concatenate([np.asarray(v) for v in learned["learned_bits"].values()])
    assert widths.min() > 1.0 and widths.max() < 8.0 and widths.std() > 0.0   # learned per channel


def test_export_is_smaller_by_the_expected_factor_and_equals_phase_two(reduced):
    _, result = reduced
    (learned,) = _rows(result, "learned")
    size = learned["size"]
    ideal = 32.0 / learned["weight_bits"]
    # scales, permutations and biases cost LeNet-5 less than 35 % on top of the codes
    assert 0.65 * ideal < learned["fp32_bytes"] / learned["bytes_tight"] <= ideal
    assert size["total"] > size["total_unpadded"]                         # tile padding is counted
    two_level = any(len(counts) == 2 for counts in learned["palettes"].values())
    assert (size["perms"] > 0) == two_level       # a permutation exactly where a layer has two segments
    assert learned["fp32_bytes"] == 4 * 61_706                            # LeNet-5's parameters
    (summary,) = [r for r in result["summary"] if r["method"] == "learned"]
    kernels = (size["fp32"] - size["float"]) / (size["codes_unpadded"] + size["scales_unpadded"] + size["perms"])
    assert summary["weights_ratio_tight"] == pytest.approx(kernels) and kernels > summary["ratio_tight"]
    for r in _rows(result, "learned") + _rows(result, "qat") + _rows(result, "ptq"):
        # packed == phase 2 (logits to float tolerance: at most one near-tie of 500 may flip)
        assert r["export_test_acc"] == pytest.approx(r["test_acc"], abs=1.01 / 500)
    (ptq2,) = [r for r in _rows(result, "ptq") if r["setting"] == "2"]
    assert ptq2["weight_bits"] == 2.0 and ptq2["bytes_tight"] < learned["bytes_tight"]


def test_ptq_at_8_bits_keeps_the_float_accuracy(reduced):
    _, result = reduced
    (fp,) = _rows(result, "fp")
    (ptq8,) = [r for r in _rows(result, "ptq") if r["setting"] == "8"]
    assert abs(ptq8["test_acc"] - fp["test_acc"]) <= 0.004


def test_qwix_rule_sets_train_through_the_engine(ex, reduced):
    if not ex.qwix_available():
        pytest.skip("qwix is not installed (pip install -e '.[experiments]')")
    _, result = reduced
    rows = {r["setting"]: r for r in _rows(result, "qwix")}
    assert rows["first_last_8_rest_4"]["test_acc"] > 0.8
    n = {"Conv_0": 150, "Conv_1": 2400, "Dense_0": 48000, "Dense_1": 10080, "Dense_2": 840}
    mixed = (8 * (n["Conv_0"] + n["Dense_2"]) + 4 * (n["Conv_1"] + n["Dense_0"] + n["Dense_1"])) / sum(n.values())
    assert rows["first_last_8_rest_4"]["weight_bits"] == pytest.approx(mixed)
    assert rows["first_last_8_rest_4"]["act_bits"] == 32                 # weight-only


def test_layer_order_and_rule_sets(ex):
    from pae.models import get_model

    model = get_model("lenet5", 10)
    order = ex.layer_order(model, np.zeros((1, 28, 28, 1), np.float32))
    assert order == ["Conv_0", "Conv_1", "Dense_0", "Dense_1", "Dense_2"]
    if not ex.qwix_available():
        pytest.skip("qwix is not installed")
    rules = ex.qwix_rules("first_last_8_rest_4", order)
    params = {k: {"kernel": np.zeros(s), "bias": np.zeros(s[-1])} for k, s in
              (("Conv_0", (5, 5, 1, 6)), ("Conv_1", (5, 5, 6, 16)), ("Dense_0", (400, 120)),
               ("Dense_1", (120, 84)), ("Dense_2", (84, 10)))}
    acct = ex.qwix_accounting(rules, params, {}, order)
    # codes: 990 8-bit + 60,480 4-bit (int4 containers); scales: one float32 per output channel
    assert acct["bytes"] == 990 + 60_480 // 2 + 4 * (6 + 16 + 120 + 84 + 10) + 4 * 236


def test_bad_flags_are_one_clear_error(ex):
    parse = lambda *argv: ex.resolve(ex.build_parser().parse_args(list(argv)))  # noqa: E731
    with pytest.raises(ValueError, match="--methods: unknown"):
        parse("--methods", "fp", "gptq")
    with pytest.raises(ValueError, match="--ptq-bits"):
        parse("--ptq-bits", "9")
    with pytest.raises(ValueError, match="--budgets"):
        parse("--budgets", "8")
    with pytest.raises(ValueError, match="ptq quantizes the fp model"):
        parse("--methods", "ptq")
    with pytest.raises(ValueError, match="--range-lr"):
        parse("--range-lr", "-1")
    with pytest.raises(ValueError, match="--k-tile"):
        parse("--k-tile", "64")
    lm = parse("--model", "transformer_lm")
    assert (lm.dataset, lm.select, lm.width) == ("pydoc_topics", "kernels_tables", 64)
    assert parse("--model", "transformer_lm", "--width", "32").width == 32   # a flag wins over the preset
    assert parse("--paper").model == "resnet20" and parse("--paper").noise_epochs == 350


def test_targets_compare_at_equal_bits_paired_by_seed(ex):
    def row(seed, method, setting, bits, acc, ratio=4.0, acts=32.0):
        return {"seed": seed, "method": method, "setting": setting, "label": f"{method} {setting}",
                "weight_bits": bits, "act_bits": acts, "test_acc": acc, "fp32_bytes": 1000.0,
                "bytes": 1000.0 / ratio, "bytes_tight": 1000.0 / ratio}
    rows = []
    for seed, (qat2, qat4, learned, qwix3) in enumerate([(0.90, 0.94, 0.95, 0.96), (0.90, 0.96, 0.94, 0.91)]):
        rows += [row(seed, "fp", "fp32", 32, 0.948, 1.0), row(seed, "qat", "2", 2, qat2),
                 row(seed, "qat", "4", 4, qat4), row(seed, "learned", "3", 3.0, learned, 11.0, 3.5),
                 row(seed, "qwix", "int3", 3.0, qwix3), row(seed, "qwix", "int8", 8.0, 0.99)]
    t = ex.check_targets(rows, text=False)
    # uniform QAT at 3 bits by interpolation: 0.92 and 0.93; learned - QAT = 0.03, 0.01
    (c,) = t["vs_qat"]
    assert c["diff"] == pytest.approx(0.02) and c["se"] == pytest.approx(0.01) and c["n"] == 2
    assert t["learned_above_qat"] and not t["learned_above_qat_beyond_spread"]     # 0.02 == 2 se
    # qwix: int3 at the same bits (int8 uses more bits and does not count): -0.01, +0.03
    (w,) = t["vs_qwix"]
    assert w["diff"] == pytest.approx(0.01)
    (comp,) = t["compression"]
    assert comp["within_tolerance"] and t["met_tight"] and t["met_with_activations"]  # 0.945 >= 0.948 - 0.005
    rows = [dict(r, test_acc=r["test_acc"] - 0.01) if r["method"] == "learned" else r for r in rows]
    assert not ex.check_targets(rows, text=False)["met_tight"]                      # 0.935 < 0.948 - 0.005


def test_the_fp_reference_is_the_better_of_its_final_and_best_epochs(ex):
    """An FP model that overfits (final bpc above its best epoch's) must not loosen the target."""
    def row(seed, method, setting, bpc, ratio, **kw):
        return {"seed": seed, "method": method, "setting": setting, "label": f"{method} {setting}",
                "weight_bits": 32.0 if method == "fp" else 3.0, "act_bits": 32.0, "test_bpc": bpc,
                "fp32_bytes": 1000.0, "bytes": 1000.0 / ratio, "bytes_tight": 1000.0 / ratio, **kw}
    rows = [row(s, "fp", "fp32", 2.30, 1.0, best_test_bpc=best) for s, best in ((0, 2.20), (1, 2.22))]
    rows += [row(s, "learned_w", "3", 2.26, 7.5) for s in (0, 1)]
    (c,) = ex.check_targets(rows, text=True)["compression"]
    assert c["fp_score"] == pytest.approx(2.30) and c["fp_reference"] == pytest.approx(2.21)
    assert not c["within_tolerance"]                             # 2.26 > 1.02 * 2.21 = 2.254
    rows = [dict(r, test_bpc=2.25) if r["method"] == "learned_w" else r for r in rows]
    t = ex.check_targets(rows, text=True)
    assert t["compression"][0]["within_tolerance"] and t["met_tight"]
    # the best epoch never makes the reference worse than the final one
    rows = [dict(r, best_test_bpc=2.40) if r["method"] == "fp" else r for r in rows]
    assert ex.check_targets(rows, text=True)["compression"][0]["fp_reference"] == pytest.approx(2.30)


def test_pretrained_start_forks_every_method_from_the_fp_snapshot(ex):
    """--pretrain-epochs: FP keeps its state after P epochs; a quantized method starts from exactly
    those weights and statistics, and its data order continues at epoch P."""
    from flax import traverse_util

    from pae import quant as q

    args = ex.resolve(ex.build_parser().parse_args(
        ["--train-size", "300", "--test-size", "100", "--pretrain-epochs", "1", "--noise-epochs", "1",
         "--finetune-epochs", "1", "--methods", "fp", "learned_w", "--budgets", "3", "--learned-range"]))
    setup = ex.build(args)
    row, final, pre = ex.run_fp(setup, 0)
    assert "pretrained_test_acc" in row and pre is not None
    assert 1 <= row["best_epoch"] <= 3                         # 1 + 1 + 1 epochs
    assert row["best_test_acc"] >= max(row["test_acc"], row["pretrained_test_acc"])
    moved = [float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(jax.tree.leaves(final.params), jax.tree.leaves(pre.params))]
    assert max(moved) > 0                                     # the snapshot is from before the end
    cfg = ex._quant_cfg(setup, 0, target_bits=3.0)
    state = ex.initial_state(setup, 0, pre, q.noise_transform(cfg, setup.select).init)
    weights = traverse_util.flatten_dict(pre.params)
    latent = traverse_util.flatten_dict(state.params, is_leaf=lambda k, v: isinstance(v, q.NoisyWeight))
    assert any(isinstance(v, q.NoisyWeight) for v in latent.values())
    for k, v in latent.items():
        w = v.weight if isinstance(v, q.NoisyWeight) else v
        np.testing.assert_array_equal(np.asarray(w), weights[k])
        if isinstance(v, q.NoisyWeight):    # --learned-range: R = exp(r) starts at the max-abs per column
            w = np.asarray(w)
            np.testing.assert_allclose(np.exp(np.asarray(v.log_range)),
                                       np.abs(w).max(axis=tuple(range(w.ndim - 1))), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(state.batch_stats), jax.tree.leaves(pre.batch_stats)):
        np.testing.assert_array_equal(np.asarray(a), b)
    phases = ex.continuing(q.quant_phases(cfg, setup.select, model=setup.model), setup)
    assert [p.data_epochs_from for p in phases] == [1, 2]
    with pytest.raises(ValueError, match="add fp"):
        ex.resolve(ex.build_parser().parse_args(["--pretrain-epochs", "2", "--methods", "learned"]))


def test_distill_teaches_every_trained_method_from_the_fp_snapshot(ex, monkeypatch):
    """--distill W: the phases of the trained quantized methods carry a Distill whose teacher is the
    FP snapshot they start from, running the float model; it changes what QAT learns."""
    from pae.train import Distill

    argv = ["--train-size", "300", "--test-size", "100", "--pretrain-epochs", "1", "--noise-epochs", "1",
            "--finetune-epochs", "1", "--methods", "fp", "qat", "--qat-bits", "4"]
    plain_args = ex.resolve(ex.build_parser().parse_args(argv))
    args = ex.resolve(ex.build_parser().parse_args(argv + ["--distill", "0.5", "--distill-temperature", "2"]))
    assert "distill" not in ex._config(plain_args) and ex._config(args)["distill"] == 0.5
    setup = ex.build(args)
    _, _, pre = ex.run_fp(setup, 0)
    phases = ex.continuing([ex.Phase("qat", 2, lambda spe: None)], setup, pre)
    d = phases[0].distill
    assert isinstance(d, Distill) and d.teacher is pre and d.model is setup.model
    assert (d.weight, d.temperature, phases[0].data_epochs_from) == (0.5, 2.0, 1)
    assert ex.continuing(phases, ex.build(plain_args), pre)[0].distill is None
    runs, real = [], ex.train_phases

    def recording(task, phases, *a, **k):
        runs.append((phases, real(task, phases, *a, **k)))
        return runs[-1][1]

    monkeypatch.setattr(ex, "train_phases", recording)
    ex.run_qat(setup, 0, 4, pre)
    ex.run_qat(ex.build(plain_args), 0, 4, pre)
    (taught_phases, taught), (plain_phases, plain) = runs
    assert taught_phases[0].distill.teacher is pre and plain_phases[0].distill is None
    moved = [float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
             for a, b in zip(jax.tree.leaves(taught.state.params), jax.tree.leaves(plain.state.params))]
    assert max(moved) > 1e-4     # the teacher changed what QAT learned


def test_distill_flags_are_checked(ex):
    parse = lambda *argv: ex.resolve(ex.build_parser().parse_args(list(argv)))  # noqa: E731
    with pytest.raises(ValueError, match=r"--distill must lie in \[0, 1\]"):
        parse("--pretrain-epochs", "1", "--distill", "2")
    with pytest.raises(ValueError, match="--distill-temperature must be a positive number"):
        parse("--pretrain-epochs", "1", "--distill", "1", "--distill-temperature", "0")
    with pytest.raises(ValueError, match="--distill: the teacher is the FP snapshot after --pretrain-epochs"):
        parse("--distill", "1")


def _quantize_columns(w, bits):
    """NumPy reference: symmetric mid-rise quantizer, range the max-abs per output channel (over every
    axis but the last, whatever the widths' granularity)."""
    w = np.asarray(w, np.float64)
    r = np.abs(w).max(axis=tuple(range(w.ndim - 1)), keepdims=True)
    o = (2 ** bits - 1) / 2
    delta = r / o
    return (np.clip(np.round(w / delta + o), 0, 2 ** bits - 1) - o) * delta


@pytest.mark.parametrize("granularity", ["input", "output"])
def test_granularity_sets_where_every_method_keeps_its_widths_and_scales(ex, granularity):
    """--granularity: the uniform methods' kernels (PTQ, QAT) and the learned method's widths are per
    input channel (one per K row, the default) or per output channel; the range stays per output
    channel, so a one-level kernel quantizes the same either way (NumPy reference). The default
    leaves the saved config unchanged."""
    from flax import traverse_util

    from pae import quant as q

    argv = ["--train-size", "64", "--test-size", "32", "--methods", "fp", "learned_w", "--budgets", "3"]
    args = ex.resolve(ex.build_parser().parse_args(argv + ["--granularity", granularity]))
    assert ("granularity" in ex._config(args)) == (granularity == "output")
    setup = ex.build(args)
    params = ex.init_state(setup.model, setup.task.example, 0).params
    flat = traverse_util.flatten_dict(params, sep="/")
    latent = ex.uniform_latent(setup, params, 3)
    quantized = traverse_util.flatten_dict(q.palette_quantizer().apply(latent, None), sep="/")
    nodes = traverse_util.flatten_dict(latent, sep="/", is_leaf=lambda k, v: isinstance(v, q.QuantWeight))
    kernels = [k for k, v in nodes.items() if isinstance(v, q.QuantWeight)]
    assert kernels
    for k in kernels:
        w = flat[k]
        channels = w.shape[-1] if granularity == "output" else w.shape[-2]
        assert np.shape(nodes[k].bits) == (channels,), k
        np.testing.assert_allclose(quantized[k], _quantize_columns(w, 3), rtol=1e-5, atol=1e-7)
    learned = q.noise_transform(ex._quant_cfg(setup, 0, target_bits=3.0), setup.select).init(
        params, jax.random.PRNGKey(0))
    noisy = traverse_util.flatten_dict(learned, sep="/", is_leaf=lambda k, v: isinstance(v, q.NoisyWeight))
    for k in kernels:
        want = flat[k].shape[-1] if granularity == "output" else flat[k].shape[-2]
        assert np.shape(q.learned_bits(noisy[k])) == (want,), k
