"""Checkpoint files: written atomically, and the best one remembered across a resume.

Both are kept on purpose, Lightning does neither: its save goes through a file in the system
temp folder, copied over when that is another file system (not atomic on a cluster's shared
disk), and a run resumed into a new directory forgets the earlier best score.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes ``<file>.tmp`` beside the checkpoint, then renames it into place: a run killed
    while writing leaves the previous ``last.ckpt`` whole. Remote URLs keep Lightning's way."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        try:
            torch.save(checkpoint, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


class BestCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that remembers the best score when a run resumes in a new directory.

    ``python train.py ckpt_path=<old run>/checkpoints/last.ckpt`` writes to a new run directory;
    Lightning would then forget the best score, and the first validation after resuming would
    become "best" however bad it is. Here the earlier best (score and file) stays the one to
    beat and, if nothing beats it, the one tested. Lightning never deletes checkpoints outside
    its own directory, so the earlier run's files stay as they are.
    """

    def load_state_dict(self, state_dict: dict) -> None:
        best = state_dict.get("best_model_path")
        if best and Path(best).is_file():
            state_dict = {**state_dict, "dirpath": self.dirpath}
        super().load_state_dict(state_dict)
