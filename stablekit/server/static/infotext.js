// Filling the form from parsed infotext (the server's /sdapi/v1/png-info `parameters`).

const $ = (id) => document.getElementById(id);

function setValue(id, value) {
  const el = $(id);
  if (value === undefined || value === null || value === "") return false;
  el.value = String(value);
  return true;
}

/** Sampler names as written by various versions ("DPM++ 2M Karras" carried the schedule). */
function findSampler(name, samplers) {
  const key = String(name).toLowerCase();
  const match = (s) => s.name.toLowerCase() === key || (s.aliases || []).some((a) => a.toLowerCase() === key);
  const direct = samplers.find(match);
  if (direct) return { sampler: direct.name };
  if (key.endsWith(" karras")) {
    const base = samplers.find((s) => s.name.toLowerCase() === key.slice(0, -7));
    if (base) return { sampler: base.name, scheduler: "karras" };
  }
  return null;
}

/** Fill what the infotext gives; returns the names of the fields filled. */
export function fillForm(p, lists) {
  const filled = [];
  const put = (id, value, label) => setValue(id, value) && filled.push(label);
  if ("Prompt" in p) {
    $("prompt").value = p.Prompt;
    filled.push("prompt");
  }
  if ("Negative prompt" in p) {
    $("negative_prompt").value = p["Negative prompt"];
    filled.push("negative prompt");
  }
  put("steps", p.Steps, "steps");
  put("cfg_scale", p["CFG scale"], "CFG scale");
  put("seed", p.Seed, "seed");
  put("width", p["Size-1"], "width");
  put("height", p["Size-2"], "height");
  put("denoising_strength", p["Denoising strength"], "denoising strength");
  put("mask_blur", p["Mask blur"], "mask blur");
  if (p.Sampler) {
    const found = findSampler(p.Sampler, lists.samplers);
    if (found) {
      put("sampler_name", found.sampler, "sampler");
      if (found.scheduler) put("scheduler", found.scheduler, "schedule");
    }
  }
  if (p["Schedule type"]) {
    const label = p["Schedule type"].toLowerCase();
    const s = lists.schedulers.find((x) => x.label.toLowerCase() === label || x.name === label);
    if (s) put("scheduler", s.name, "schedule");
  }
  if (p.Model) {
    const m = lists.models.find((x) => x.model_name === p.Model || x.title === p.Model || x.title.startsWith(`${p.Model} `));
    if (m) put("model", m.title, "model");
  }
  return filled;
}
