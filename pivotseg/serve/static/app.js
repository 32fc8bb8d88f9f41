// The page of `pivotseg serve`: plain JavaScript over the JSON API of pivotseg/serve/app.py.
"use strict";

const $ = (selector) => document.querySelector(selector);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
let info = null;

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function showMessage(text) {
  const box = $("#message");
  box.textContent = text || "";
  box.hidden = !text;
}

// fetch + JSON; any failure becomes an Error carrying the server's one-line message.
async function api(url, options = {}) {
  let response;
  try {
    response = await fetch(url, options);
  } catch (err) {
    throw new Error(`the server did not answer (${err.message}); is pivotseg serve still running?`);
  }
  let body = null;
  try {
    body = await response.json();
  } catch (err) {
    body = null;
  }
  if (!response.ok) throw new Error((body && body.error) || `HTTP ${response.status}`);
  return body;
}

// One file per request, as the raw body: the server checks its size as it arrives.
async function upload(path, file, params = {}) {
  if (file.size > info.max_upload_bytes) {
    const mb = (n) => (n / 2 ** 20).toFixed(1);
    throw new Error(`${file.name}: ${mb(file.size)} MB is over this server's limit of ` +
      `${mb(info.max_upload_bytes)} MB per file; shrink the image or restart with ` +
      "pivotseg serve --max-upload-mb N");
  }
  const query = new URLSearchParams({ ...params, name: file.name });
  return api(`${path}?${query}`, {
    method: "POST",
    body: file,
    headers: { "Content-Type": "application/octet-stream" },
  });
}

// Dropping a hundred images uploads (and holds decoded on the server) a few at a time.
const UPLOADS_AT_ONCE = 2;

async function inPool(items, size, work) {
  const queue = [...items];
  const worker = async () => {
    while (queue.length) await work(queue.shift());
  };
  await Promise.all(Array.from({ length: Math.min(size, queue.length) }, worker));
}

async function waitForJob(id, onStep) {
  for (;;) {
    const job = await api(`/api/jobs/${id}`);
    onStep(job.step);
    if (job.state === "done") return job.result;
    if (job.state === "error") throw new Error(job.error);
    await sleep(250);
  }
}

// A result card: title, status line (with a busy bar) and a body filled when done.
function card(container, title) {
  const node = element("div", "card");
  node.append(element("h3", "", title));
  const status = element("div", "status");
  const busy = element("progress");
  const body = element("div", "body");
  node.append(status, busy, body);
  container.append(node);
  return {
    node,
    body,
    status(text) { status.textContent = text; },
    fail(text) {
      busy.remove();
      status.className = "status error";
      status.textContent = text;
      node.classList.add("failed");
    },
    finish(text) { busy.remove(); status.textContent = text; node.classList.add("done"); },
  };
}

// "k of n done" over a batch of dropped files.
function counter(bar, label) {
  return {
    total: 0,
    finished: 0,
    add(n) { this.total += n; this.show(); },
    done() { this.finished += 1; this.show(); },
    show() {
      bar.hidden = this.finished >= this.total;
      bar.max = Math.max(this.total, 1);
      bar.value = this.finished;
      label.textContent = this.total ? `${this.finished} of ${this.total} done` : "";
    },
  };
}

function image(src, className, alt) {
  const node = element("img", className);
  node.src = src;
  node.alt = alt;
  return node;
}

function dropZone(zone, input, onFiles) {
  input.addEventListener("change", () => {
    const files = Array.from(input.files);
    input.value = "";
    if (files.length) onFiles(files);
  });
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    const files = Array.from(event.dataTransfer.files);
    if (files.length) onFiles(input.multiple ? files : files.slice(0, 1));
  });
}

// ----- segment images with a run ------------------------------------------------------------
const predictCount = counter($("#predict-progress"), $("#predict-count"));

function areaTable(areas) {
  const table = element("table", "areas");
  for (const row of areas) {
    const tr = element("tr");
    const swatch = element("span", "swatch");
    swatch.style.background = row.colour;
    const cell = element("td");
    cell.append(swatch);
    tr.append(cell, element("td", "", row.name), element("td", "", `${row.percent.toFixed(1)} %`));
    table.append(tr);
  }
  return table;
}

async function predictFile(file, run, view) {
  try {
    view.status("uploading");
    const { job } = await upload("/api/predict", file, { run });
    const result = await waitForJob(job, (step) => view.status(step));
    view.body.append(image(result.overlay, "overlay", `${file.name} segmented`));
    view.body.append(areaTable(result.areas));
    const link = element("a", "", "download the overlay");
    link.href = result.overlay;
    link.download = `${file.name}.overlay.png`;
    view.body.append(link);
    view.finish(`${result.width}x${result.height}, ${result.run}`);
  } catch (err) {
    view.fail(err.message);
  } finally {
    predictCount.done();
  }
}

function predictFiles(files) {
  predictCount.add(files.length);
  const run = $("#run-select").value;
  const work = files.map((file) => [file, card($("#predict-results"), file.name)]);
  work.forEach(([, view]) => view.status("waiting to upload"));
  inPool(work, UPLOADS_AT_ONCE, ([file, view]) => predictFile(file, run, view));
}

// ----- reference segmentation ---------------------------------------------------------------
let ref = null; // {id, width, height, image, points: [[x, y]], labels: [1|0], box, hasMask}
const targetCount = counter($("#target-progress"), $("#target-count"));

function drawMarks() {
  const layer = $("#ref-marks");
  layer.replaceChildren();
  if (!ref) return;
  const pct = (v, size) => `${(100 * v) / size}%`;
  ref.points.forEach(([x, y], i) => {
    const mark = element("div", `mark ${ref.labels[i] ? "fg" : "bg"}`);
    mark.style.left = pct(x, ref.width);
    mark.style.top = pct(y, ref.height);
    layer.append(mark);
  });
  if (ref.box) {
    const [x0, y0, x1, y1] = ref.box;
    const box = element("div", "box");
    Object.assign(box.style, {
      left: pct(x0, ref.width), top: pct(y0, ref.height),
      width: pct(x1 - x0, ref.width), height: pct(y1 - y0, ref.height),
    });
    layer.append(box);
  }
}

function showMask(result, how) {
  ref.hasMask = Boolean(result.overlay);
  $("#ref-image").src = result.overlay || ref.image;
  if (!result.overlay) {
    $("#mask-status").textContent = "No mask: click the object, or upload a mask.";
    return;
  }
  const score = result.score !== undefined ? `, SAM's score ${result.score.toFixed(2)}` : "";
  $("#mask-status").textContent = `Mask (${how}): ${result.area.toFixed(1)} % of the image` +
    `${score}. Add points to refine it, or drop targets below.`;
}

async function sendPrompt() {
  const status = $("#mask-status");
  status.className = "status";
  status.textContent = "SAM is making the mask...";
  try {
    const result = await api(`/api/refseg/${ref.id}/prompt`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ points: ref.points, labels: ref.labels, box: ref.box }),
    });
    showMask(result, "from your marks");
  } catch (err) {
    status.className = "status error";
    status.textContent = err.message;
  }
}

async function setReference(files) {
  const file = files[0];
  const status = $("#ref-status");
  status.className = "status";
  status.textContent = `uploading ${file.name}`;
  try {
    const result = await upload("/api/refseg/reference", file);
    ref = {
      id: result.reference, width: result.width, height: result.height, image: result.image,
      points: [], labels: [], box: null, hasMask: false,
    };
    $("#ref-image").src = result.image;
    $("#ref-panel").hidden = false;
    $("#mask-status").textContent = "";
    drawMarks();
    await waitForJob(result.job, (step) => { status.textContent = `${file.name}: ${step}`; });
    status.textContent = `${file.name} (${result.width}x${result.height}): click the object ` +
      "(or drag a box around it, or upload its mask).";
  } catch (err) {
    status.className = "status error";
    status.textContent = err.message;
  }
}

function imageXY(event) {
  const rect = $("#ref-image").getBoundingClientRect();
  const x = ((event.clientX - rect.left) * ref.width) / rect.width;
  const y = ((event.clientY - rect.top) * ref.height) / rect.height;
  const clamp = (v, size) => Math.min(Math.max(v, 0), size - 0.5);
  return [clamp(x, ref.width), clamp(y, ref.height)];
}

let dragStart = null;
$("#ref-stage").addEventListener("pointerdown", (event) => {
  if (!ref) return;
  event.preventDefault();
  dragStart = imageXY(event);
});
$("#ref-stage").addEventListener("pointerup", (event) => {
  if (!ref || !dragStart) return;
  const start = dragStart;
  dragStart = null;
  const end = imageXY(event);
  const tool = document.querySelector("input[name=tool]:checked").value;
  if (tool === "box") {
    const box = [Math.min(start[0], end[0]), Math.min(start[1], end[1]),
      Math.max(start[0], end[0]), Math.max(start[1], end[1])];
    if (box[2] - box[0] < 2 || box[3] - box[1] < 2) return; // a click, not a drag
    ref.box = box;
  } else {
    ref.points.push(end);
    ref.labels.push(Number(tool));
  }
  drawMarks();
  sendPrompt();
});

$("#ref-undo").addEventListener("click", () => {
  if (!ref) return;
  if (ref.points.length) {
    ref.points.pop();
    ref.labels.pop();
  } else {
    ref.box = null;
  }
  drawMarks();
  sendPrompt();
});

$("#ref-clear").addEventListener("click", () => {
  if (!ref) return;
  ref.points = [];
  ref.labels = [];
  ref.box = null;
  drawMarks();
  sendPrompt();
});

$("#ref-mask-file").addEventListener("change", async (event) => {
  const file = event.target.files[0];
  event.target.value = "";
  if (!file || !ref) return;
  const status = $("#mask-status");
  status.className = "status";
  status.textContent = `uploading ${file.name}`;
  try {
    const result = await upload(`/api/refseg/${ref.id}/mask`, file);
    ref.points = [];
    ref.labels = [];
    ref.box = null;
    drawMarks();
    showMask(result, `uploaded ${file.name}`);
  } catch (err) {
    status.className = "status error";
    status.textContent = err.message;
  }
});

async function segmentTarget(file, method, view) {
  try {
    if (!ref || !ref.hasMask) throw new Error("mark the object on the reference first");
    view.status("uploading");
    const { job } = await upload(`/api/refseg/${ref.id}/targets`, file, { method });
    const result = await waitForJob(job, (step) => view.status(step));
    view.body.append(image(result.overlay, "overlay", `${file.name} segmented`));
    const link = element("a", "", "download the mask (0/255 PNG)");
    link.href = result.mask;
    link.download = `${file.name}.mask.png`;
    view.body.append(link);
    view.finish(`${result.method}: score ${result.score.toFixed(2)}, ` +
      `object ${result.area.toFixed(1)} % of the image`);
  } catch (err) {
    view.fail(err.message);
  } finally {
    targetCount.done();
  }
}

function segmentTargets(files) {
  targetCount.add(files.length);
  const method = $("#method-select").value;
  const work = files.map((file) => [file, card($("#target-results"), file.name)]);
  work.forEach(([, view]) => view.status("waiting to upload"));
  inPool(work, UPLOADS_AT_ONCE, ([file, view]) => segmentTarget(file, method, view));
}

// ----- start ----------------------------------------------------------------------------------
function showView(name) {
  for (const tab of document.querySelectorAll(".tab")) {
    tab.classList.toggle("active", tab.dataset.view === name);
  }
  $("#view-predict").hidden = name !== "predict";
  $("#view-refseg").hidden = name !== "refseg";
}

async function start() {
  for (const tab of document.querySelectorAll(".tab")) {
    tab.addEventListener("click", () => showView(tab.dataset.view));
  }
  try {
    info = await api("/api/info");
  } catch (err) {
    showMessage(err.message);
    return;
  }
  const runs = $("#run-select");
  for (const run of info.runs) {
    const option = element("option", "", run.name);
    option.value = run.index;
    option.title = run.path;
    runs.append(option);
  }
  const showClasses = () => {
    const run = info.runs[Number(runs.value)];
    $("#run-classes").textContent = run && run.classes.length ?
      `${run.classes.length} classes: ${run.classes.join(", ")}` : "";
  };
  runs.addEventListener("change", showClasses);
  showClasses();
  $("#no-runs").hidden = info.runs.length > 0;
  $("#predict-drop").hidden = info.runs.length === 0;
  for (const name of info.methods) $("#method-select").append(element("option", "", name));
  if (info.sam_missing) {
    $("#sam-missing").textContent = info.sam_missing;
    $("#sam-missing").hidden = false;
    $("#ref-drop").hidden = true;
  }
  dropZone($("#predict-drop"), $("#predict-files"), predictFiles);
  dropZone($("#ref-drop"), $("#ref-file"), setReference);
  dropZone($("#target-drop"), $("#target-files"), segmentTargets);
  if (location.hash === "#refseg" || info.runs.length === 0) showView("refseg");
  document.body.dataset.ready = "1";
}

start();
