"""The training progress bar: Lightning's Rich bar, with a meaningful epoch count."""

from __future__ import annotations

import math

from lightning.pytorch.callbacks import RichProgressBar


class MetaProgressBar(RichProgressBar):
    """``Epoch 3/5`` from ``trainer.max_steps`` (training is sized in outer steps, so Lightning's
    own bar shows ``Epoch 3/-2``), and no ``v_num``."""

    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        description = f"Epoch {current_epoch}"
        per_epoch = trainer.num_training_batches
        if trainer.max_steps > 0 and 0 < per_epoch < math.inf:
            description += f"/{math.ceil(trainer.max_steps / per_epoch) - 1}"
        elif trainer.max_epochs is not None and trainer.max_epochs > 0:
            description += f"/{trainer.max_epochs - 1}"
        return f"{description:{len(self.validation_description)}}"

    def get_metrics(self, trainer, pl_module) -> dict:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items
