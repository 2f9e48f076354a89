"""Writes tickets_reference.json: the reduced ticket experiment as computed by the pre-engine drivers
(commit ab504d3). The engine port must reproduce it exactly (tests/sparsity/test_tickets_experiment.py).

    python tests/sparsity/data/make_tickets_reference.py tests/sparsity/data/tickets_reference.json
"""
import importlib.util, json, os, sys, tempfile
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
spec = importlib.util.spec_from_file_location("tickets", os.path.join(ROOT, "experiments", "tickets.py"))
m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
ARGV = ["--dataset", "digits", "--epochs", "3", "--rounds", "2", "--rewind-epoch", "1", "--milestones", "2",
        "--s-inits", "0.0", "0.05", "--batch-size", "64", "--lr", "0.05", "--mask-lr", "0.5",
        "--beta-final", "10", "--imp-levels", "2", "--seeds", "3"]
d = tempfile.mkdtemp()
res = m.main(ARGV + ["--out-dir", d, "--name", "ref"])
json.dump({"argv": ARGV, "rows": res["rows"], "cs_history": res["cs_history"]}, open(sys.argv[1], "w"), indent=1)
