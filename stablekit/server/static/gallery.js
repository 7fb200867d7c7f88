// The result view (selected picture, its infotext, actions) and the gallery of recent jobs, which
// come from the server's job store, so they survive a reload.
import { fetchBlob, get } from "./api.js";

const $ = (id) => document.getElementById(id);
const RECENT = 24;

export class Gallery {
  constructor({ onError }) {
    this.onError = onError;
    this.onSend = async () => {};
    this.onUseParams = async () => {};
    this.selected = null; // {job, index}
    this.urls = new Map(); // image path -> object URL (fetched with credentials)
    $("send-img2img").addEventListener("click", () => this.send("img2img"));
    $("send-inpaint").addEventListener("click", () => this.send("inpaint"));
    $("use-params").addEventListener("click", () => this.useParams());
  }

  async url(path) {
    if (!this.urls.has(path)) this.urls.set(path, URL.createObjectURL(await fetchBlob(path)));
    return this.urls.get(path);
  }

  selectedSeed() {
    if (!this.selected) return null;
    const { job, index } = this.selected;
    return job.info?.all_seeds?.[index] ?? job.info?.seed ?? null;
  }

  /** Show the job's pictures in the result area, picture `index` selected. */
  async show(job, index) {
    this.selected = { job, index };
    const result = $("result");
    const imgs = await Promise.all(job.images.map(async (path, i) => {
      const img = new Image();
      img.src = await this.url(path);
      img.alt = `result ${i + 1}`;
      img.className = i === index ? "selected" : "";
      img.dataset.index = String(i);
      img.addEventListener("click", () => this.show(job, i));
      await img.decode().catch(() => {}); // swap in whole pictures, not half-loaded ones
      return img;
    }));
    result.replaceChildren(...imgs);
    result.dataset.count = String(imgs.length);
    result.dataset.job = job.id;
    const info = job.info?.infotexts?.[index] ?? "";
    $("infotext").textContent = info;
    $("result-actions").hidden = !job.images.length;
    const download = $("download");
    download.href = job.images[index] ? await this.url(job.images[index]) : "#";
    download.download = `stablekit-${this.selectedSeed() ?? job.id}.png`;
  }

  async blob() {
    if (!this.selected) throw new Error("No picture selected.");
    const { job, index } = this.selected;
    return fetchBlob(job.images[index]);
  }

  async send(mode) {
    try {
      await this.onSend(await this.blob(), mode);
    } catch (e) {
      this.onError(e.message);
    }
  }

  async useParams() {
    try {
      await this.onUseParams(await this.blob());
    } catch (e) {
      this.onError(e.message);
    }
  }

  /** Reload the list of recent jobs; returns it (newest first). */
  async refresh() {
    let jobs;
    try {
      jobs = await get(`api/v1/jobs?limit=${RECENT}`);
    } catch (e) {
      this.onError(`Cannot load recent results: ${e.message}`);
      return [];
    }
    const items = [];
    for (const job of jobs) {
      job.images.forEach((path, i) => {
        const button = document.createElement("button");
        button.type = "button";
        button.className = "thumb";
        button.title = job.info?.infotexts?.[i] ?? job.parameters?.prompt ?? "";
        const img = new Image();
        img.alt = job.parameters?.prompt || "picture";
        img.loading = "lazy";
        this.url(path).then((u) => { img.src = u; }).catch(() => { img.alt = "(missing)"; });
        button.append(img);
        button.addEventListener("click", () => this.show(job, i));
        items.push(button);
      });
    }
    $("gallery").replaceChildren(...items);
    return jobs;
  }
}
