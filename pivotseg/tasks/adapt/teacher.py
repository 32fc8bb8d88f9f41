"""Mean teacher with the two drift guards: stochastic restore and reset to the source.

* teacher: ``theta' <- m theta' + (1 - m) theta`` after every student step (CoTTA, Eq. 2);
* stochastic restore: each element of each adapted parameter returns to its source value with
  probability p per step (CoTTA). CoTTA restores the student *after* the teacher's EMA; we
  restore *before* it, so that the restore also reaches the deployed teacher in the same step;
* reset: student, teacher and the extra state (DPFT's pivots) all return to the source.

The teacher and the source exist only as copies of the adapted tensors; a forward "as teacher"
or "as source" swaps them into the one model (:class:`~pivotseg.tasks.adapt.params.TensorSet`).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from pivotseg.tasks.adapt.params import TensorSet


class MeanTeacher:
    """EMA teacher of the student's adapted parameters, plus their source values.

    Args:
        params: the live adapted parameters (the student), by name.
        state: live tensors that adaptation changes without gradients (DPFT's pivots): shared by
            student and teacher, swapped to their source values for the source model.
        momentum: m of the teacher's EMA.
        restore_prob: p of the stochastic restore.
        generator: random stream of the restore masks (CPU).
    """

    def __init__(
        self,
        params: dict[str, torch.Tensor],
        state: dict[str, torch.Tensor],
        momentum: float,
        restore_prob: float,
        generator: torch.Generator,
    ):
        self.student = TensorSet(params)
        self.state = TensorSet(state)
        self.source = self.student.snapshot()
        self.source_state = self.state.snapshot()
        self.teacher = self.student.snapshot()
        self.momentum = momentum
        self.restore_prob = restore_prob
        self.generator = generator

    @contextmanager
    def as_teacher(self):
        with self.student.holding(self.teacher):
            yield

    @contextmanager
    def as_source(self):
        with self.student.holding(self.source), self.state.holding(self.source_state):
            yield

    @torch.no_grad()
    def after_student_step(self) -> None:
        """Stochastic restore of the student, then the teacher's EMA step."""
        if self.restore_prob > 0:
            for name, p in self.student.tensors.items():
                draw = torch.rand(p.shape, generator=self.generator)
                mask = (draw < self.restore_prob).to(p.device)
                p.copy_(torch.where(mask, self.source[name], p))
        for name, p in self.student.tensors.items():
            # lerp keeps a teacher equal to the student bit-exact (m x + (1 - m) x may round).
            self.teacher[name].lerp_(p.detach(), 1.0 - self.momentum)

    @torch.no_grad()
    def reset(self) -> None:
        """Student, teacher and extra state back to their source values."""
        self.student.load(self.source)
        self.state.load(self.source_state)
        self.teacher = self.student.snapshot()

    def deploy(self) -> None:
        """Leave the teacher's values in the model (what the adapted run saves)."""
        self.student.load(self.teacher)
