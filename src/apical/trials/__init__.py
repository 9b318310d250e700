"""``apical.trial``: do dendrites help my model? Every mode of a user's task on the same seeds, with
paired confidence intervals and a parameter-matched plain network (``none-matched``)."""

from apical.trials.modes import DEFAULT_MODES, MODES, mode_config
from apical.trials.runner import TrialResult, matched_width, trial
from apical.trials.stats import Comparison
from apical.trials.task import Task, TaskError, load_task_file

__all__ = ["DEFAULT_MODES", "MODES", "Comparison", "Task", "TaskError", "TrialResult", "load_task_file",
           "matched_width", "mode_config", "trial"]
