"""Training: state, jitted steps, the one epoch loop (:func:`train_phases` over a list of
:class:`Phase`), orbax checkpoints, records and data parallelism; :func:`run` is its one-phase case."""
from pae.train.checkpoint import Checkpointer, CheckpointError, DamagedCheckpointError, tree_signature
from pae.train.distributed import (data_mesh, maybe_initialize_distributed, replicate,
                                   shard_batch)
from pae.train.engine import (ON_DAMAGED, OPTIMIZER_STATES, Phase, PhasesResult, Task, TrainingDiverged,
                              evaluate, host, init_state, make_task, train_phases)
from pae.train.loop import ConfigChangedError, RunResult, TrainConfig, count_params, run
from pae.train.optimizers import SCHEDULES, make_optimizer, make_schedule
from pae.train.state import TrainState, create_train_state, init_variables
from pae.train.step import Distill, distillation_loss, make_eval_step, make_train_step, masked_cross_entropy

__all__ = [
    "DamagedCheckpointError", "Distill", "distillation_loss", "ON_DAMAGED", "OPTIMIZER_STATES", "Phase", "PhasesResult", "Task",
    "TrainingDiverged", "evaluate", "host", "init_state", "make_task", "train_phases",
    "CheckpointError", "ConfigChangedError", "SCHEDULES", "Checkpointer", "RunResult", "TrainConfig", "TrainState", "count_params",
    "create_train_state", "data_mesh", "init_variables", "make_eval_step",
    "make_optimizer", "make_schedule", "make_train_step", "masked_cross_entropy",
    "maybe_initialize_distributed", "replicate", "run", "shard_batch", "tree_signature",
]
