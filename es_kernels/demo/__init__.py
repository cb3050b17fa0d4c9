"""The main job (``es-kernels demo``): train a small network on real data with
several methods and compare them fairly.

* ``cli``: the command line (``main``); ``config``: the settings and presets;
* ``run``: the runs in order, the ETA, the outputs (``run_demo``);
* ``loop``: one run of one method (``train``); ``summary``: the fair summaries
  and the verdict; ``metrics``: the fair metrics on curves;
* ``tasks``: the data sets and label noise; ``lmtask``: the LM task;
* ``progress``: ETA, progress log, interrupts; ``report``: tables and plot;
* ``ablation``: the grid of ES settings and the rule behind the defaults.
"""

from .ablation import run_ablation  # noqa: F401
from .cli import main  # noqa: F401
from .config import METHODS, Config  # noqa: F401
from .loop import train  # noqa: F401
from .run import run_demo  # noqa: F401
from .tasks import corrupt_labels, load_dataset  # noqa: F401
