"""Fine-tuning that never hands back a model worse than its start: the start is validated as epoch 0.

Both ways of QAT here (``qarep-det qat`` and Ultralytics' ``quantize=8``) start from a calibrated INT8 model that is
already good; a learning rate or optimizer that does not suit the fused graph can only make it worse. Ultralytics
writes best.pt when an epoch's fitness is the best it has seen, so validating the start first and saving it as
best.pt makes every epoch compete with it: best.pt stays the start until an epoch beats it.
"""

from __future__ import annotations

import math
import time
from typing import Any, ClassVar

import torch
from ultralytics.engine.trainer import BaseTrainer
from ultralytics.utils import LOGGER, RANK


class KeepsStart(BaseTrainer):
    """Trainer mixin: :meth:`validate_start` makes the start epoch 0 (best.pt, the first row of results.csv), and the
    final evaluation says so when no epoch beat it. Inert in a run that never validates its start."""

    start_log: ClassVar[tuple[str, str, str]] = ("QAT", "PTQ INT8", "try another --optimizer or --lr0")
    """How the log names the run and its start, and what it suggests when training only hurt."""

    _start_row: dict[str, float] | None = None  # epoch 0's metrics, written to results.csv with epoch 1's columns

    def keeps_start(self) -> bool:
        """Whether this run validated (or, resumed, had validated) its start as epoch 0."""
        return False

    def validate_start(self) -> None:
        """Validate the start as epoch 0 and write it as best.pt: an epoch replaces it only by beating it. The first
        epoch writes the resumable last.pt."""
        # what the training loop sets before a validation: the loss items it sums per name, the loss it falls back on
        self.loss = torch.zeros((), device=self.device)
        self.loss_items = {k: self.loss.clone() for k in self.ema.ema.init_criterion().loss_names}
        self.epoch = -1
        self.metrics, self.fitness = self.validate()
        if RANK not in {-1, 0}:
            return
        self.stopper.best_fitness, self.stopper.best_epoch = self.fitness, 0
        self._start_row = dict(self.metrics)
        self.save_model()
        self.last.unlink()
        run, start, _ = self.start_log
        LOGGER.info(
            f"{run}: the start ({start}) is epoch 0, fitness {self.fitness:.5g}; best.pt until an epoch beats it"
        )

    def save_metrics(self, metrics: dict[str, Any]) -> None:
        """Write epoch 0's row before epoch 1's, with its columns (what epoch 0 did not measure is nan)."""
        if self._start_row is not None:
            start, self._start_row = self._start_row, None
            epoch, started = self.epoch, self.train_time_start
            self.epoch, self.train_time_start = -1, time.time()  # the row says epoch 0, time 0
            super().save_metrics({k: start.get(k, math.nan) for k in metrics})
            self.epoch, self.train_time_start = epoch, started
        super().save_metrics(metrics)

    def start_kept(self) -> bool:
        """Whether best.pt is still the start: no epoch beat it."""
        return self.keeps_start() and self.stopper.best_epoch == 0

    def final_eval(self) -> None:
        """Ultralytics' final validation of best.pt, then say so when training did not beat the start."""
        super().final_eval()
        if RANK in {-1, 0} and self.start_kept():
            run, start, retry = self.start_log
            LOGGER.warning(
                f"{run}: no epoch beat the start ({start}, fitness {self.stopper.best_fitness:.5g}): best.pt is the "
                f"start model; {retry}"
            )
