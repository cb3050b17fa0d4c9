"""The main job (``es-kernels demo``): train a small network on real data with
several methods and compare them fairly. See :mod:`es_kernels.demo.run`.

* ``run``: the training loop, the methods, the command line (``main``);
* ``tasks``: the data sets and label noise; ``lmtask``: the LM task;
* ``report``: tables, plot, machine description;
* ``schedule``: scoring schedules for ES (a prototype for the schedule study).
"""

from .run import METHODS, Config, main, run_ablation, run_demo, train  # noqa: F401
from .tasks import corrupt_labels, load_dataset  # noqa: F401
