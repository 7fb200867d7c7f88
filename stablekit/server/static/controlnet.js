// The ControlNet panel: one unit as the web UI extension has it (model, preprocessor with a preview of
// the map it makes, weight, start/end, control mode, resize), sent as alwayson_scripts.controlnet.
import { get, post } from "./api.js";

const $ = (id) => document.getElementById(id);
let picture = null; // the control picture as a data URL; null: the task's own picture

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error(`cannot read ${file.name}`));
    reader.readAsDataURL(file);
  });
}

function value(id, label) {
  const v = Number($(id).value);
  if ($(id).value.trim() === "" || !Number.isFinite(v)) throw new Error(`ControlNet ${label} must be a number`);
  return v;
}

/** The units of the request (none when the panel is off). */
export function controlUnits(mode) {
  if (!$("cn_enabled").checked) return [];
  if (!$("cn_model").value) throw new Error("Choose a ControlNet model (the server lists those of --controlnet-dir).");
  if (!picture && mode === "txt2img") throw new Error("Choose a control picture for the ControlNet.");
  return [{
    enabled: true, model: $("cn_model").value, module: $("cn_module").value, image: picture || "",
    weight: value("cn_weight", "weight"), guidance_start: value("cn_start", "start"),
    guidance_end: value("cn_end", "end"), control_mode: $("cn_mode").value, resize_mode: $("cn_resize").value,
    save_detected_map: false,
  }];
}

async function previewMap(showError) {
  if (!picture) {
    showError("Choose a control picture first.");
    return;
  }
  try {
    const r = await post("controlnet/detect", { controlnet_module: $("cn_module").value, controlnet_input_images: [picture] });
    $("cn_map").src = `data:image/png;base64,${r.images[0]}`;
    $("cn_map").hidden = false;
  } catch (e) {
    showError(e.message);
  }
}

/** Fill the lists from the server; the panel stays hidden when it has no ControlNets. */
export async function loadControlNet(showError) {
  const [models, modules] = await Promise.all([get("controlnet/model_list"), get("controlnet/module_list")]);
  $("cn_model").replaceChildren(...models.model_list.map((m) => new Option(m, m)));
  $("cn_module").replaceChildren(...modules.module_list.map((m) => new Option(m, m)));
  $("controlnet-options").hidden = models.model_list.length === 0;
  $("cn_picture").addEventListener("change", async (e) => {
    const file = e.target.files[0];
    picture = file ? await readFile(file) : null;
    $("cn_source").src = picture || "";
    $("cn_source").hidden = !picture;
    $("cn_map").hidden = true;
  });
  $("cn_preview").addEventListener("click", () => previewMap(showError));
  $("cn_map").addEventListener("click", () => { // the map at its own size (thin edges vanish in the thumbnail)
    const view = window.open();
    if (view) view.document.body.innerHTML = `<img src="${$("cn_map").src}" alt="control map">`;
  });
}
