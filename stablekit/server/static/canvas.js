// The init picture and the inpainting mask: two canvases of the picture's own size, the mask on top.
// The mask canvas holds opaque colour where the user painted (repaint) and transparency elsewhere;
// it is sent as a black-and-white PNG (white repaints, black keeps), the server's convention.

const MASK_COLOUR = [255, 40, 90];
const UNDO_DEPTH = 40;

export class MaskEditor {
  constructor(picture, mask) {
    this.picture = picture; // <canvas>: the init picture, at its own resolution
    this.mask = mask; // <canvas>: the same size, painted strokes
    this.tool = "brush";
    this.size = 8; // brush diameter in picture pixels
    this.undoStack = [];
    this.drawing = false;
    this.enabled = false; // painting only in inpaint mode
    this.last = null;
    mask.addEventListener("pointerdown", (e) => this.down(e));
    mask.addEventListener("pointermove", (e) => this.move(e));
    for (const name of ["pointerup", "pointercancel", "lostpointercapture"]) mask.addEventListener(name, () => this.up());
  }

  get hasPicture() {
    return this.picture.width > 0 && this.picture.dataset.loaded === "1";
  }

  /** Load a picture (an <img> or <canvas>); clears the mask. */
  setPicture(source) {
    const w = source.naturalWidth || source.width;
    const h = source.naturalHeight || source.height;
    for (const c of [this.picture, this.mask]) {
      c.width = w;
      c.height = h;
    }
    this.picture.getContext("2d").drawImage(source, 0, 0);
    this.picture.dataset.loaded = "1";
    this.undoStack = [];
    this.size = Math.max(2, Math.round(Math.min(w, h) / 10));
  }

  point(e) {
    const r = this.mask.getBoundingClientRect();
    return [((e.clientX - r.left) * this.mask.width) / r.width, ((e.clientY - r.top) * this.mask.height) / r.height];
  }

  ctx() {
    const ctx = this.mask.getContext("2d", { willReadFrequently: true });
    ctx.globalCompositeOperation = this.tool === "eraser" ? "destination-out" : "source-over";
    ctx.strokeStyle = ctx.fillStyle = `rgb(${MASK_COLOUR.join(",")})`;
    ctx.lineWidth = this.size;
    ctx.lineCap = ctx.lineJoin = "round";
    return ctx;
  }

  down(e) {
    if (!this.enabled || !this.hasPicture || e.button !== 0) return;
    e.preventDefault();
    this.mask.setPointerCapture?.(e.pointerId);
    this.snapshot();
    this.drawing = true;
    this.last = this.point(e);
    const ctx = this.ctx();
    ctx.beginPath();
    ctx.arc(this.last[0], this.last[1], this.size / 2, 0, 2 * Math.PI);
    ctx.fill();
  }

  move(e) {
    if (!this.drawing) return;
    const p = this.point(e);
    const ctx = this.ctx();
    ctx.beginPath();
    ctx.moveTo(...this.last);
    ctx.lineTo(...p);
    ctx.stroke();
    this.last = p;
  }

  up() {
    if (this.drawing) this.mask.dispatchEvent(new CustomEvent("maskchange", { bubbles: true }));
    this.drawing = false;
  }

  snapshot() {
    const ctx = this.mask.getContext("2d", { willReadFrequently: true });
    this.undoStack.push(ctx.getImageData(0, 0, this.mask.width, this.mask.height));
    if (this.undoStack.length > UNDO_DEPTH) this.undoStack.shift();
  }

  undo() {
    const data = this.undoStack.pop();
    if (data) this.mask.getContext("2d").putImageData(data, 0, 0);
  }

  clear() {
    this.snapshot();
    this.mask.getContext("2d").clearRect(0, 0, this.mask.width, this.mask.height);
  }

  invert() {
    this.snapshot();
    const ctx = this.mask.getContext("2d", { willReadFrequently: true });
    const data = ctx.getImageData(0, 0, this.mask.width, this.mask.height);
    const px = data.data;
    for (let i = 0; i < px.length; i += 4) {
      [px[i], px[i + 1], px[i + 2]] = MASK_COLOUR;
      px[i + 3] = 255 - px[i + 3];
    }
    ctx.putImageData(data, 0, 0);
  }

  /** True when some pixel would be repainted. */
  isEmpty() {
    const px = this.mask.getContext("2d", { willReadFrequently: true }).getImageData(0, 0, this.mask.width, this.mask.height).data;
    for (let i = 3; i < px.length; i += 4) if (px[i] >= 128) return false;
    return true;
  }

  /** The mask as a PNG data URL: white (alpha >= 128: repaint) on black (keep). */
  maskDataURL() {
    const out = document.createElement("canvas");
    out.width = this.mask.width;
    out.height = this.mask.height;
    const src = this.mask.getContext("2d", { willReadFrequently: true }).getImageData(0, 0, out.width, out.height).data;
    const ctx = out.getContext("2d");
    const img = ctx.createImageData(out.width, out.height);
    for (let i = 0; i < src.length; i += 4) {
      const v = src[i + 3] >= 128 ? 255 : 0;
      img.data[i] = img.data[i + 1] = img.data[i + 2] = v;
      img.data[i + 3] = 255;
    }
    ctx.putImageData(img, 0, 0);
    return out.toDataURL("image/png");
  }

  pictureDataURL() {
    return this.picture.toDataURL("image/png");
  }

  /**
   * Outpainting: grow the canvas by `px` on one side. The new strip is filled by stretching the edge
   * row or column (a neutral start for "fill"), and masked together with `overlap` pixels of the old
   * picture so the seam is repainted too.
   */
  extend(side, px, overlap = 8) {
    const w = this.picture.width;
    const h = this.picture.height;
    const horizontal = side === "left" || side === "right";
    const nw = horizontal ? w + px : w;
    const nh = horizontal ? h : h + px;
    const dx = side === "left" ? px : 0;
    const dy = side === "up" ? px : 0;
    const pic = document.createElement("canvas");
    pic.width = nw;
    pic.height = nh;
    const p = pic.getContext("2d");
    // edge stretch: the outermost row/column of the old picture, scaled over the new strip
    if (side === "left") p.drawImage(this.picture, 0, 0, 1, h, 0, 0, px, h);
    if (side === "right") p.drawImage(this.picture, w - 1, 0, 1, h, w, 0, px, h);
    if (side === "up") p.drawImage(this.picture, 0, 0, w, 1, 0, 0, w, px);
    if (side === "down") p.drawImage(this.picture, 0, h - 1, w, 1, 0, h, w, px);
    p.drawImage(this.picture, dx, dy);
    const oldMask = document.createElement("canvas");
    oldMask.width = w;
    oldMask.height = h;
    oldMask.getContext("2d").drawImage(this.mask, 0, 0);
    this.setPicture(pic);
    const m = this.mask.getContext("2d");
    m.drawImage(oldMask, dx, dy);
    m.fillStyle = `rgb(${MASK_COLOUR.join(",")})`;
    const o = Math.min(overlap, horizontal ? w : h);
    if (side === "left") m.fillRect(0, 0, px + o, nh);
    if (side === "right") m.fillRect(w - o, 0, px + o, nh);
    if (side === "up") m.fillRect(0, 0, nw, px + o);
    if (side === "down") m.fillRect(0, h - o, nw, px + o);
  }
}
