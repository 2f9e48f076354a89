"""The training command line as a user meets it: help, one-line errors, output, resume and extend."""
import dataclasses
import errno
import json
import os
import re
import subprocess
import sys

import pytest

from pae.train import TrainConfig
from pae.train.cli import build_parser, describe_error, run_script
from pae.train.engine import TrainingDiverged

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = ["--model", "lenet300_100", "--dataset", "digits", "--batch-size", "64"]


def _train(*args, cwd=None):
    env = {**os.environ, "COLUMNS": "1000", "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "train.py"), *args],
                          capture_output=True, text=True, cwd=cwd or ROOT, env=env, timeout=300)


def _one_error_line(proc) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    return lines[0]


def _epoch_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("phase=train epoch=")]


def _help_entries(text: str) -> dict[str, str]:
    """``{"--flag": "its help, on one line"}`` from argparse's help text."""
    entries, current = {}, None
    for line in text.split("options:", 1)[1].splitlines():
        m = re.match(r"  (-\S+)", line)
        if m:
            current = m.group(1).rstrip(",")
            entries[current] = line
        elif current and line.strip():
            entries[current] += " " + line.strip()
    return {k: " ".join(v.split()) for k, v in entries.items()}


def test_help_shows_help_default_and_choices_of_every_flag():
    proc = _train("--help")
    assert proc.returncode == 0, proc.stderr
    entries = _help_entries(proc.stdout)
    assert _help_entries(build_parser().format_help()).keys() == entries.keys()
    flags = [f for f in entries if f not in ("-h", "--help")]
    assert len(flags) == len(dataclasses.fields(TrainConfig)) + 6   # + workdir extend resume-intact no-progress quiet traceback
    for flag in flags:
        assert re.search(r"\S+ \S.*\(.*default: ", entries[flag]), f"{flag}: {entries[flag]}"
    shown = {"lenet5": "--model", "mnist_subset": "--dataset", "nesterov": "--optimizer",
             "cosine": "--schedule", "0.05": "--learning-rate", "5": "--epochs", "128": "--batch-size",
             "false": "--drop-remainder", "none": "--augment", "{}": "--model-kwargs"}
    for default, flag in shown.items():
        assert f"default: {default}" in entries[flag], entries[flag]
    from pae.data import NAMES as DATASETS
    from pae.models import NAMES as MODELS
    from pae.train import SCHEDULES
    from pae.train.optimizers import NAMES as OPTIMIZERS
    for flag, names in (("--model", MODELS), ("--dataset", DATASETS), ("--optimizer", OPTIMIZERS),
                        ("--schedule", SCHEDULES), ("--augment", ("true", "false"))):
        choices = entries[flag].split("choices: ", 1)[1]
        assert all(name in choices for name in names), (flag, choices)


@pytest.mark.parametrize("args, says", [
    (["--epochs", "0"], "epochs must be >= 1, got 0"),
    (["--optimizer", "adagrad2"], "invalid choice: 'adagrad2'"),
    (["--epochs", "two"], "argument --epochs: invalid int value: 'two'"),
    (["--model", "resnet19"], "unknown model 'resnet19'"),
])
def test_a_bad_flag_value_is_one_error_line_and_exit_2(args, says, tmp_path):
    proc = _train(*SMALL, "--workdir", str(tmp_path / "run"), *args)
    assert says in _one_error_line(proc)
    assert proc.stdout == ""


def test_traceback_flag_shows_the_trace():
    proc = _train("--epochs", "0", "--traceback")
    assert proc.returncode == 1 and "Traceback (most recent call last)" in proc.stderr
    assert "ValueError: epochs must be >= 1" in proc.stderr


def test_an_unwritable_run_directory_is_one_line_naming_it(tmp_path):
    afile = tmp_path / "a_file"
    afile.write_text("not a directory")
    line = _one_error_line(_train(*SMALL, "--workdir", str(afile / "run")))
    assert str(afile / "run") in line and "Not a directory" in line
    line = _one_error_line(_train(*SMALL, "--workdir", str(afile)))
    assert str(afile) in line


def test_disk_errors_found_through_the_chain_name_the_path():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/runs/x/metrics.jsonl")
        except OSError as cause:
            raise RuntimeError("orbax could not save") from cause
    except RuntimeError as err:
        line = describe_error(err)
    assert line.startswith("error: cannot write /runs/x/metrics.jsonl: No space left on device")
    for code in (errno.EACCES, errno.EROFS, errno.EDQUOT, errno.ENOTDIR):
        line = describe_error(OSError(code, os.strerror(code), "/runs/y"))
        assert line.startswith("error: cannot write /runs/y: ") and "\n" not in line
    wrapped = ValueError("tensorstore: write failed:\n  [Errno 28] No space left on device\n spec {...}")
    assert describe_error(wrapped).startswith("error: disk full: ")
    assert describe_error(TrainingDiverged("train loss is nan at epoch 3")) == \
        "error: train loss is nan at epoch 3"
    assert describe_error(KeyError("a bug")) is None     # a bug keeps its trace


def test_run_script_turns_user_errors_into_one_line(capsys):
    def main(argv):
        raise ValueError("bad value\nover two lines")

    with pytest.raises(SystemExit) as exit_:
        run_script(main, [])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "error: bad value over two lines\n"
    with pytest.raises(ValueError, match="bad value"):
        run_script(main, ["--traceback"])
    with pytest.raises(KeyError):
        run_script(lambda argv: {}["missing"], [])
    assert run_script(lambda argv: argv, ["--x", "--traceback"]) == ["--x"]


def test_the_pae_train_console_script_exits_0_on_success_and_2_with_one_line_on_a_user_error(
        monkeypatch, capsys):
    """The installed ``pae-train`` script is ``sys.exit(console())``: a finished run exits 0, and a
    user error is one line, not a trace."""
    from pae.train import cli
    from pae.train.loop import RunResult

    monkeypatch.setattr(cli, "run", lambda config, **kw: RunResult(None, [{"epoch": 1}], "w", 3))
    monkeypatch.setattr(sys, "argv", ["pae-train", "--epochs", "1"])
    with pytest.raises(SystemExit) as exit_:
        sys.exit(cli.console())
    out = capsys.readouterr()
    assert exit_.value.code is None and out.err == "" and json.loads(out.out)["epoch"] == 1
    for argv, says in ((["--epochs", "0"], "error: epochs must be >= 1, got 0"),
                       (["--bogus"], "error: unrecognized arguments: --bogus (see --help)")):
        monkeypatch.setattr(sys, "argv", ["pae-train", *argv])
        with pytest.raises(SystemExit) as exit_:
            sys.exit(cli.console())
        assert exit_.value.code == 2 and capsys.readouterr().err == says + "\n"


def test_output_resume_extend_quiet_and_a_refused_shorter_run(tmp_path, directory_bytes):
    workdir = str(tmp_path / "run")
    # progress on (the default) with the output going to files: one line per epoch, no bar
    first = _train(*SMALL, "--epochs", "2", "--workdir", workdir)
    assert first.returncode == 0, first.stderr[-3000:]
    assert len(_epoch_lines(first.stdout)) == 2 and "\r" not in first.stdout + first.stderr
    assert first.stdout.splitlines()[:2] == _epoch_lines(first.stdout)
    assert "it/s" not in first.stderr

    # --no-progress hides only the bar: "resumed from" and the epoch lines still go to stdout
    extended = _train(*SMALL, "--epochs", "3", "--extend", "--no-progress", "--workdir", workdir)
    assert extended.returncode == 0, extended.stderr[-3000:]
    lines = extended.stdout.splitlines()
    assert lines[0].startswith("resumed from") and "epoch 2/3" in lines[0]
    assert [line.split()[1] for line in _epoch_lines(extended.stdout)] == ["epoch=3"]
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert json.load(open(os.path.join(workdir, "config.json")))["epochs"] == 3

    # --quiet: nothing per epoch, no resume line; the final JSON only
    quiet = _train(*SMALL, "--epochs", "4", "--extend", "--quiet", "--workdir", workdir)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert _epoch_lines(quiet.stdout) == [] and "resumed" not in quiet.stdout
    assert json.loads(quiet.stdout)["epoch"] == 4

    # fewer epochs than the finished run: refused, and the run directory is left as it was
    before = directory_bytes(workdir)
    line = _one_error_line(_train(*SMALL, "--epochs", "2", "--workdir", workdir))
    assert "epochs: 4 -> 2" in line
    assert directory_bytes(workdir) == before


def test_fill_unset_layers_later_over_earlier_and_keeps_given_flags():
    import argparse

    from pae.train.cli import fill_unset

    args = argparse.Namespace(lr=None, epochs=3, model=None)
    out = fill_unset(args, {"lr": 0.1, "epochs": 10, "model": "a"}, {"model": "b"}, {})
    assert vars(out) == {"lr": 0.1, "epochs": 3, "model": "b"}      # given flags win over every layer
    assert args.lr is None                                           # the input is not changed
    with pytest.raises(AttributeError):
        fill_unset(args, {"not_a_flag": 1})


def test_run_seeds_saves_each_seed_and_reuses_only_a_matching_configuration(tmp_path, capsys):
    import numpy as np

    from pae.train.cli import run_seeds

    calls = []

    def run_seed(seed, config):
        calls.append(seed)
        return {"seed": seed, "config": config, "acc": np.float32(0.5 + seed / 8)}

    base = str(tmp_path / "exp")
    config = {"lr": np.float32(0.25), "depth": 2}
    first = run_seeds([0, 1], lambda s: run_seed(s, config), config=config, base=base)
    assert calls == [0, 1] and [r["acc"] for r in first] == [0.5, 0.625]
    saved = json.loads((tmp_path / "exp.seed1.json").read_text())
    assert saved == {"seed": 1, "config": {"lr": 0.25, "depth": 2}, "acc": 0.625}
    again = run_seeds([0, 1, 2], lambda s: run_seed(s, config), config=config, base=base, reuse=True)
    assert calls == [0, 1, 2]                                      # seeds 0 and 1 came from disk
    assert [r["acc"] for r in again] == [0.5, 0.625, 0.75]
    assert "[seed 0] reusing" in capsys.readouterr().out
    other = {"lr": 0.5, "depth": 2}                                # another configuration: run again
    run_seeds([1], lambda s: run_seed(s, other), config=other, base=base, reuse=True)
    assert calls[3:] == [1] and json.loads((tmp_path / "exp.seed1.json").read_text())["config"] == other
    run_seeds([2], lambda s: run_seed(s, config), config=config, base=base)   # no reuse: run
    assert calls[4:] == [2]
    run_seeds([5], lambda s: run_seed(s, config), config=config)   # no base: nothing written
    assert not (tmp_path / "exp.seed5.json").exists() and calls[5:] == [5]
