// The page: the form, runs through the job API with live progress, the result view and the gallery.
import { ApiError, del, get, post, setCredentials, setLoginHandler, streamEvents } from "./api.js";
import { MaskEditor } from "./canvas.js";
import { controlUnits, loadControlNet } from "./controlnet.js";
import { Gallery } from "./gallery.js";
import { fillForm } from "./infotext.js";
import { loadNetworks } from "./networks.js";

const $ = (id) => document.getElementById(id);
const FORM_KEY = "stablekit.form";
const FIELDS = ["prompt", "negative_prompt", "sampler_name", "scheduler", "steps", "cfg_scale", "seed", "width", "height",
  "batch_size", "n_iter", "denoising_strength", "resize_mode", "mask_blur", "inpainting_fill", "inpaint_area",
  "inpaint_full_res_padding", "inpainting_method", "model", "hr_scale", "hr_upscaler", "hr_second_pass_steps",
  "hr_denoise", "subseed", "subseed_strength", "seed_resize_from_w", "seed_resize_from_h", "noise_level", "upscale_tile"];

const state = { mode: "txt2img", job: null, interrupted: false, lists: { samplers: [], schedulers: [], models: [] } };
const editor = new MaskEditor($("picture"), $("mask"));
const gallery = new Gallery({ onError: showError, onSelect: () => {} });

// --- messages ---------------------------------------------------------------------------------------
export function showError(message) {
  $("error-text").textContent = message;
  $("error").hidden = false;
}
function clearError() {
  $("error").hidden = true;
  $("error-text").textContent = "";
}
function setStatus(text) {
  $("status").textContent = text;
}
$("error-close").addEventListener("click", clearError);

// --- credentials (only when the server asks) -----------------------------------------------------
let login = null; // one dialog for all the calls that got a 401 at the same time
setLoginHandler(() => {
  login ??= new Promise((resolve) => {
    const dialog = $("login");
    dialog.addEventListener("close", () => {
      const token = $("login-token").value.trim();
      const user = $("login-user").value;
      if (token) setCredentials(`Bearer ${token}`);
      else if (user) setCredentials(`Basic ${btoa(`${user}:${$("login-password").value}`)}`);
      login = null;
      resolve(Boolean(token || user));
    }, { once: true });
    dialog.showModal();
  });
  return login;
});

// --- modes ----------------------------------------------------------------------------------------
function setMode(mode) {
  state.mode = mode;
  for (const tab of document.querySelectorAll("[data-mode]")) tab.setAttribute("aria-selected", String(tab.dataset.mode === mode));
  $("picture-panel").hidden = mode === "txt2img";
  $("mask-tools").hidden = $("outpaint-tools").hidden = $("inpaint-options").hidden = mode !== "inpaint";
  $("depth-options").hidden = mode !== "depth2img";
  $("upscale-options").hidden = mode !== "upscale";
  $("hires-options").hidden = mode !== "txt2img";
  $("mask").hidden = mode !== "inpaint";
  editor.enabled = mode === "inpaint";
  document.body.dataset.mode = mode;
  saveForm();
}
for (const tab of document.querySelectorAll("[data-mode]")) tab.addEventListener("click", () => setMode(tab.dataset.mode));

// --- the form ------------------------------------------------------------------------------------
function saveForm() {
  const values = Object.fromEntries(FIELDS.map((f) => [f, $(f).value]));
  localStorage.setItem(FORM_KEY, JSON.stringify({ ...values, mode: state.mode }));
}
function restoreForm() {
  let saved = {};
  try {
    saved = JSON.parse(localStorage.getItem(FORM_KEY) || "{}");
  } catch {
    saved = {};
  }
  for (const f of FIELDS) {
    if (saved[f] === undefined) continue;
    const el = $(f);
    if (el.tagName === "SELECT" && ![...el.options].some((o) => o.value === saved[f])) continue;
    el.value = saved[f];
  }
  return saved.mode;
}
$("form").addEventListener("change", saveForm);
$("form").addEventListener("input", saveForm);

function number(id, { integer = true } = {}) {
  const el = $(id);
  const label = el.closest("label")?.firstChild?.textContent.trim() || id;
  const value = Number(el.value);
  if (el.value.trim() === "" || !Number.isFinite(value)) throw new Error(`${label} must be a number, got "${el.value}"`);
  if (integer && !Number.isInteger(value)) throw new Error(`${label} must be a whole number, got ${el.value}`);
  return value;
}

/** The job request from the form; range checks are the server's (one source of truth). */
function buildRequest() {
  const body = {
    prompt: $("prompt").value, negative_prompt: $("negative_prompt").value,
    sampler_name: $("sampler_name").value, scheduler: $("scheduler").value,
    steps: number("steps"), cfg_scale: number("cfg_scale", { integer: false }), seed: number("seed"),
    width: number("width"), height: number("height"), batch_size: number("batch_size"), n_iter: number("n_iter"),
  };
  if ($("model").value) body.override_settings = { sd_model_checkpoint: $("model").value };
  const units = controlUnits(state.mode);
  if (units.length) body.alwayson_scripts = { controlnet: { args: units } };
  Object.assign(body, {
    subseed: number("subseed"), subseed_strength: number("subseed_strength", { integer: false }),
    seed_resize_from_w: number("seed_resize_from_w"), seed_resize_from_h: number("seed_resize_from_h"),
  });
  if (state.mode === "txt2img") {
    if ($("enable_hr").checked) {
      Object.assign(body, {
        enable_hr: true, hr_scale: number("hr_scale", { integer: false }), hr_upscaler: $("hr_upscaler").value,
        hr_second_pass_steps: number("hr_second_pass_steps"), denoising_strength: number("hr_denoise", { integer: false }),
      });
    }
    return { task: "txt2img", ...body };
  }
  if (!editor.hasPicture) throw new Error("Choose, drop or paste a picture first.");
  if (state.mode === "upscale") {
    for (const size of ["width", "height"]) delete body[size]; // 4x the picture
    return { task: "upscale", ...body, init_images: [editor.pictureDataURL()], noise_level: number("noise_level"),
      upscale_tile: number("upscale_tile") };
  }
  Object.assign(body, {
    init_images: [editor.pictureDataURL()], denoising_strength: number("denoising_strength", { integer: false }),
    resize_mode: Number($("resize_mode").value),
  });
  if (state.mode === "inpaint") {
    if (editor.isEmpty()) throw new Error("Paint a mask on the picture first: painted areas are repainted, the rest is kept.");
    Object.assign(body, {
      mask: editor.maskDataURL(), mask_blur: number("mask_blur"), inpainting_fill: Number($("inpainting_fill").value),
      inpaint_full_res: $("inpaint_area").value === "masked", inpaint_full_res_padding: number("inpaint_full_res_padding"),
      inpainting_method: $("inpainting_method").value,
    });
  }
  return { task: state.mode === "depth2img" ? "depth2img" : "img2img", ...body };
}

// --- depth ---------------------------------------------------------------------------------------
async function showDepth() {
  clearError();
  if (!editor.hasPicture) {
    showError("Choose, drop or paste a picture first.");
    return;
  }
  try {
    const { image } = await post("api/v1/depth", { image: editor.pictureDataURL() });
    $("depth-map").src = `data:image/png;base64,${image}`;
    $("depth-map").hidden = false;
  } catch (e) {
    showError(e instanceof ApiError ? `The server refused: ${e.message}` : e.message);
  }
}
$("show-depth").addEventListener("click", showDepth);

// --- running ------------------------------------------------------------------------------------
async function generate() {
  if (state.job) return; // one run at a time from this page; Interrupt first
  clearError();
  let body;
  try {
    body = buildRequest();
  } catch (e) {
    showError(e.message);
    return;
  }
  $("generate").disabled = true;
  try {
    const job = await post("api/v1/jobs", body);
    await follow(job);
  } catch (e) {
    showError(e instanceof ApiError ? `The server refused: ${e.message}` : e.message);
  } finally {
    $("generate").disabled = false;
  }
}

function formatSeconds(s) {
  if (!Number.isFinite(s) || s < 0) return "…";
  return s < 60 ? `${Math.ceil(s)} s` : `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
}

/** Follow a queued or running job to its end: progress bar, ETA, live preview, then the result. */
async function follow(job) {
  state.job = job;
  state.interrupted = false;
  $("interrupt").disabled = false;
  $("progress").hidden = false;
  $("progress-fill").style.width = "0%";
  $("progress-text").textContent = "Waiting…";
  if (window.matchMedia("(max-width: 820px)").matches) $("progress").scrollIntoView({ block: "nearest" }); // phone: output is below
  const timing = { t0: null, f0: 0 };
  let lastStep = null;
  const onEvent = (name, data) => {
    if (name === "status") {
      state.job = { ...state.job, status: data.status };
      if (data.status === "queued") setStatus(`Queued${data.position != null ? ` (position ${data.position + 1})` : ""}`);
      if (data.status === "running") setStatus("Running");
    } else if (name === "progress") {
      const now = performance.now() / 1000;
      if (timing.t0 === null) Object.assign(timing, { t0: now, f0: data.fraction });
      const done = data.fraction - timing.f0;
      const eta = done > 0 ? ((now - timing.t0) / done) * (1 - data.fraction) : NaN;
      const batch = data.job_count > 1 ? ` · batch ${data.job_no + 1}/${data.job_count}` : "";
      lastStep = data;
      $("progress-fill").style.width = `${Math.round(data.fraction * 100)}%`;
      $("progress-text").textContent = `Step ${data.step}/${data.steps}${batch} · ${Math.round(data.fraction * 100)}% · ETA ${formatSeconds(eta)}`;
      $("progress").dataset.step = String(data.step);
    } else if (name === "preview") {
      $("preview").src = data.image;
      $("preview").hidden = false;
    }
  };
  let final;
  try {
    final = await streamEvents(`api/v1/jobs/${job.id}/events`, onEvent);
  } finally {
    state.job = null;
    $("interrupt").disabled = true;
    $("progress").hidden = true;
    $("preview").hidden = true;
  }
  if (!final) {
    setStatus("Lost the connection to the job; it keeps running on the server (reload to follow it).");
    return;
  }
  if (final.name === "done") {
    const at = lastStep ? ` at step ${lastStep.step}/${lastStep.steps}` : "";
    await gallery.show(final.job, 0);
    setStatus(state.interrupted ? `Interrupted${at}: the picture so far is shown.` : `Done in ${formatSeconds(final.job.finished - final.job.started)}.`);
  } else if (final.name === "cancelled") {
    setStatus("Cancelled.");
  } else {
    setStatus("Failed.");
    showError(`The run failed: ${final.job.error}`);
  }
  gallery.refresh();
}

async function interrupt() {
  const job = state.job;
  if (!job) return;
  state.interrupted = true;
  setStatus("Interrupting…");
  try {
    if (job.status === "queued") await del(`api/v1/jobs/${job.id}`);
    else await post("sdapi/v1/interrupt");
  } catch (e) {
    showError(`Could not interrupt: ${e.message}`);
  }
}

$("form").addEventListener("submit", (e) => {
  e.preventDefault();
  generate();
});
$("interrupt").addEventListener("click", interrupt);
document.addEventListener("keydown", (e) => {
  if ((e.ctrlKey || e.metaKey) && e.key === "Enter") {
    e.preventDefault();
    generate();
  }
});
$("seed-random").addEventListener("click", () => {
  $("seed").value = "-1";
  saveForm();
});
$("seed-reuse").addEventListener("click", () => {
  const seed = gallery.selectedSeed();
  if (seed == null) showError("No picture yet whose seed could be reused.");
  else {
    $("seed").value = String(seed);
    saveForm();
  }
});

// --- pictures in -------------------------------------------------------------------------------
function loadImage(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("This file is not a picture the browser can read."));
    img.src = src;
  });
}

export async function usePicture(blob, mode) {
  const url = URL.createObjectURL(blob);
  try {
    const img = await loadImage(url);
    editor.setPicture(img);
  } finally {
    URL.revokeObjectURL(url);
  }
  syncCanvas();
  $("width").value = String(Math.max(8, Math.round(editor.picture.width / 8) * 8));
  $("height").value = String(Math.max(8, Math.round(editor.picture.height / 8) * 8));
  if (mode) setMode(mode);
  saveForm();
}

function syncCanvas() {
  $("canvas-wrap").hidden = !editor.hasPicture;
  $("dropzone-hint").hidden = editor.hasPicture;
  $("brush-size").value = String(editor.size);
  $("brush-size-value").textContent = String(editor.size);
  $("canvas-wrap").style.aspectRatio = `${editor.picture.width} / ${editor.picture.height}`;
}

$("init-file").addEventListener("change", (e) => {
  const file = e.target.files[0];
  if (file) usePicture(file).catch((err) => showError(err.message));
});
$("dropzone").addEventListener("dragenter", () => $("dropzone").classList.add("over"));
$("dropzone").addEventListener("dragleave", () => $("dropzone").classList.remove("over"));
$("dropzone").addEventListener("drop", (e) => {
  e.preventDefault();
  $("dropzone").classList.remove("over");
  e.stopPropagation();
  const file = e.dataTransfer.files[0];
  if (file) usePicture(file).catch((err) => showError(err.message));
});
document.addEventListener("paste", (e) => {
  const file = [...(e.clipboardData?.files || [])].find((f) => f.type.startsWith("image/"));
  if (file && state.mode !== "txt2img") usePicture(file).catch((err) => showError(err.message));
});

// mask tools
function setTool(tool) {
  editor.tool = tool;
  $("tool-brush").setAttribute("aria-pressed", String(tool === "brush"));
  $("tool-eraser").setAttribute("aria-pressed", String(tool === "eraser"));
}
$("tool-brush").addEventListener("click", () => setTool("brush"));
$("tool-eraser").addEventListener("click", () => setTool("eraser"));
$("brush-size").addEventListener("input", (e) => {
  editor.size = Number(e.target.value);
  $("brush-size-value").textContent = e.target.value;
});
$("mask-invert").addEventListener("click", () => editor.invert());
$("mask-undo").addEventListener("click", () => editor.undo());
$("mask-clear").addEventListener("click", () => editor.clear());
for (const b of document.querySelectorAll("[data-extend]")) {
  b.addEventListener("click", () => {
    if (!editor.hasPicture) return showError("Choose a picture first, then extend its canvas.");
    editor.extend(b.dataset.extend, Number($("extend-by").value));
    syncCanvas();
    $("width").value = String(Math.round(editor.picture.width / 8) * 8);
    $("height").value = String(Math.round(editor.picture.height / 8) * 8);
    $("inpainting_fill").value = "0"; // new canvas has no content to keep: "fill" starts from its surroundings
    setStatus(`Canvas extended to ${editor.picture.width}×${editor.picture.height}; the new strip is masked (masked content: fill).`);
    saveForm();
  });
}

// --- PNG info: drop a PNG anywhere (outside the picture box) or pick one ----------------------------
async function pngInfo(file) {
  if (file.type && file.type !== "image/png") return showError(`${file.name} is not a PNG; only PNGs carry infotext.`);
  const data = await new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
  const info = await post("sdapi/v1/png-info", { image: data });
  if (!info.info) return showError(`${file.name || "This PNG"} has no infotext (no "parameters" text chunk).`);
  const filled = fillForm(info.parameters, state.lists);
  saveForm();
  setStatus(`Filled ${filled.length} fields from the PNG's infotext: ${filled.join(", ")}.`);
}
export function pngInfoSafe(file) {
  clearError();
  return pngInfo(file).catch((e) => showError(`PNG info: ${e.message}`));
}
document.addEventListener("dragover", (e) => e.preventDefault());
document.addEventListener("drop", (e) => {
  e.preventDefault();
  const file = e.dataTransfer?.files?.[0];
  if (file) pngInfoSafe(file);
});
$("pnginfo-file").addEventListener("change", (e) => {
  if (e.target.files[0]) pngInfoSafe(e.target.files[0]);
});

// --- gallery actions ------------------------------------------------------------------------------
gallery.onSend = async (blob, mode) => {
  await usePicture(blob, mode);
  editor.clear();
  editor.undoStack = [];
};
gallery.onUseParams = (blob) => pngInfoSafe(new File([blob], "result.png", { type: "image/png" }));

// --- start ---------------------------------------------------------------------------------------
async function loadLists() {
  const [samplers, schedulers, models, options] = await Promise.all([
    get("sdapi/v1/samplers"), get("sdapi/v1/schedulers"), get("sdapi/v1/sd-models"), get("sdapi/v1/options"),
  ]);
  state.lists = { samplers, schedulers, models };
  $("sampler_name").replaceChildren(...samplers.map((s) => new Option(s.name, s.name)));
  const [latentModes, upscalers] = await Promise.all([get("sdapi/v1/latent-upscale-modes"), get("sdapi/v1/upscalers")]);
  $("hr_upscaler").replaceChildren(...[...latentModes, ...upscalers].map((u) => new Option(u.name, u.name)));
  $("scheduler").replaceChildren(...schedulers.map((s) => new Option(s.label, s.name)));
  $("model").replaceChildren(...models.map((m) => new Option(m.model_name, m.title)));
  $("model").value = options.sd_model_checkpoint;
  state.resolution = options.stablekit_model_resolution;
  $("sampler_name").value = samplers.some((s) => s.name === "DPM++ 2M") ? "DPM++ 2M" : samplers[0]?.name;
  await loadNetworks($("networks"), $("network-list"), $("prompt"));
  await loadControlNet(showError);
}

async function start() {
  try {
    await loadLists();
  } catch (e) {
    showError(`Cannot load the server's lists: ${e.message}`);
  }
  const firstVisit = !localStorage.getItem(FORM_KEY);
  setMode(restoreForm() || "txt2img");
  if (firstVisit && state.resolution) { // the model's own size, not a guess (the demo model makes 64x64)
    $("width").value = $("height").value = String(state.resolution);
    saveForm();
  }
  const jobs = await gallery.refresh();
  const unfinished = (jobs || []).find((j) => j.status === "queued" || j.status === "running");
  if (unfinished) follow(unfinished).catch((e) => showError(e.message));
  else if (jobs?.length) {
    const lastDone = jobs.find((j) => j.status === "done" && j.images.length);
    if (lastDone) await gallery.show(lastDone, 0);
  }
  document.body.dataset.ready = "1";
}
start();
