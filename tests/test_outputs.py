"""Experiments and benchmarks write under runs/ (ignored by git) unless told otherwise: no script
defaults to a tracked path, so running one leaves `git status` clean."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "experiments").glob("*.py"))
OUTPUT_FLAGS = ("--out", "--out-dir", "--workdir")


def _output_defaults(path: pathlib.Path) -> dict[str, object]:
    """``{flag: default}`` of every ``add_argument("--out"/"--out-dir"/"--workdir", default=...)``."""
    out = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument" and node.args:
            flag = node.args[0]
            if isinstance(flag, ast.Constant) and flag.value in OUTPUT_FLAGS:
                default = next((k.value for k in node.keywords if k.arg == "default"), None)
                out[flag.value] = ast.literal_eval(default) if isinstance(default, ast.Constant) \
                    else ast.unparse(default) if default is not None else None
    return out


def test_every_script_writes_under_runs_by_default():
    found = {p.name: _output_defaults(p) for p in SCRIPTS}
    assert found["tickets.py"] and found["optimizers.py"] and found["bench_step.py"]
    for name, flags in found.items():
        for flag, default in flags.items():
            text = str(default)
            assert "results" not in text, f"{name} {flag} defaults to {text!r}, a tracked path"
            assert default is None or "runs" in text, f"{name} {flag} defaults to {text!r}, not under runs/"


def test_runs_is_ignored_by_git():
    assert "/runs/" in (ROOT / ".gitignore").read_text().split()
