"""Domain-generalised semantic segmentation: train on a source, score on unseen targets.

- :func:`train` (``pivotseg train``): a :class:`~pivotseg.config.RunConfig` to a run folder.
- :func:`evaluate` (``pivotseg eval``): mIoU per target dataset and their mean.
- :func:`predict` (``pivotseg predict``): label / colour / overlay PNGs for a folder of images.
"""

from pivotseg.tasks.dgss.evaluate import evaluate, evaluate_datasets, format_table, infer_logits
from pivotseg.tasks.dgss.predict import predict
from pivotseg.tasks.dgss.train import train

__all__ = ["evaluate", "evaluate_datasets", "format_table", "infer_logits", "predict", "train"]
