"""``hydra/launcher=slurm``: hydra-submitit-launcher's SLURM launcher whose jobs resume by
themselves when requeued after a time limit or preemption (see ``metalearn.requeue``).

Hydra instantiates launchers only from the ``hydra_plugins`` namespace, hence this module;
without the ``slurm`` extra it defines nothing (Hydra imports every plugin module at start).
"""

from __future__ import annotations

from typing import Any

try:  # the module, not the class: Hydra registers every launcher class named here
    from hydra_plugins.hydra_submitit_launcher import submitit_launcher
except ImportError:  # pip install -e ".[slurm]"
    submitit_launcher = None

if submitit_launcher is not None:

    class RequeueSlurmLauncher(submitit_launcher.SlurmLauncher):
        """Runs each job as a requeueable one; ``checkpoint()`` (called by submitit on the time
        limit or preemption) resubmits it with ``ckpt_path=auto`` in the same directory."""

        def __call__(self, sweep_overrides, *args: Any, **kwargs: Any):
            from metalearn import requeue

            run = super().__call__
            return requeue.run_requeueable(lambda: run(sweep_overrides, *args, **kwargs))

        def checkpoint(self, sweep_overrides, *args: Any, **kwargs: Any):
            from metalearn import requeue

            return super().checkpoint(requeue.resume_overrides(sweep_overrides), *args, **kwargs)
