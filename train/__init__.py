"""Training: one solver class per method, the factory that picks it (and its torch or
Triton steps), the epoch loop, and the whole job that writes a run directory.

``fit`` / ``FitResult`` (:mod:`.loop`), ``run_training`` (:mod:`.run`), ``make_solver``
(:mod:`.factory`), ``prepare_run_dir`` / ``config_differences`` (:mod:`.run_dir`).
"""

from svdfill.train.factory import make_solver
from svdfill.train.loop import FitResult, PhaseResult, fit
from svdfill.train.run import run_training
from svdfill.train.run_dir import config_differences, prepare_run_dir
from svdfill.train.solver import Solver

__all__ = ["FitResult", "PhaseResult", "Solver", "config_differences", "fit", "make_solver",
           "prepare_run_dir", "run_training"]
