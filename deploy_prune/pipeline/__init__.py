"""The compress pipeline, one for both doors: the CLI builds a ``CompressConfig`` from flags, the
Python API (``deploy_prune.api``) adds the user's model, data and callbacks (``UserParts``), and
both call ``compress``.

- ``stages``: ``compress`` as its stage order (baseline, budget, plan, steps, verification,
  fine-tuning, export, report);
- ``loop``: the measured closed loop;
- ``run``: the state of one run, which methods see as a ``MethodContext``;
- ``config``: the settings.
"""

from deploy_prune.pipeline.config import CompressConfig
from deploy_prune.pipeline.run import REMEASURE, FinetuneContext, Run, UserParts, quietest_take
from deploy_prune.pipeline.stages import compress

__all__ = ["REMEASURE", "CompressConfig", "FinetuneContext", "Run", "UserParts", "compress", "quietest_take"]
