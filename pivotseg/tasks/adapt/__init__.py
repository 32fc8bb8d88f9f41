"""Test-time adaptation of a trained run to unlabelled target images (SPL mode and baselines).

- :func:`adapt_run` (``pivotseg adapt RUN --images DIR --out NEW_RUN``): offline, a set of
  target images; writes a new run folder that ``pivotseg eval`` / ``predict`` open unchanged.
- :func:`adapt_stream` (``pivotseg predict RUN DIR --adapt``): online, predict each frame, then
  update; :func:`evaluate_stream` scores a labelled stream's predictions as they are made.
- Methods (:class:`AdaptSettings`): ``spl`` (DPFT trained with set pivots, i.e. ``pivot_loss``
  or ``presence_gating`` on: mean-teacher self-training of the prompt bank, U and gamma, set
  pivots moved toward the target, pivot loss, reset on drift; offline
  with source replay, ClassMix and the head in the student, DAFormer-style, :mod:`.uda`;
  source-free with class-balanced pseudo-labels and stochastic restore), ``selftrain`` (the
  same without pivots, e.g. on Rein), ``tent`` (entropy minimisation of the normalisation
  layers' affine parameters, always source-free).
"""

from pivotseg.tasks.adapt.adapter import build_adapter, resolve_method
from pivotseg.tasks.adapt.offline import adapt_run
from pivotseg.tasks.adapt.online import adapt_stream, evaluate_stream, stream_labeller
from pivotseg.tasks.adapt.settings import ADAPT_METHODS, AdaptSettings

__all__ = [
    "ADAPT_METHODS",
    "AdaptSettings",
    "adapt_run",
    "adapt_stream",
    "evaluate_stream",
    "build_adapter",
    "resolve_method",
    "stream_labeller",
]
