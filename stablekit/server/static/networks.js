// The extra-networks panel, as the web UI has it: the server's LoRAs and textual-inversion
// embeddings as buttons; a click puts the tag (<lora:NAME:1>) or trigger word into the prompt
// at the cursor.
import { get } from "./api.js";

export const tagFor = (kind, name) => (kind === "lora" ? `<lora:${name}:1>` : name);

/** Insert `text` at the textarea's cursor, with a space before it where a word would run on. */
export function insertAtCursor(textarea, text) {
  const start = textarea.selectionStart ?? textarea.value.length;
  const end = textarea.selectionEnd ?? start;
  const before = textarea.value.slice(0, start);
  const joined = before + (before && !/\s$/.test(before) ? " " : "") + text;
  textarea.value = joined + textarea.value.slice(end);
  textarea.setSelectionRange(joined.length, joined.length);
  textarea.focus();
  textarea.dispatchEvent(new Event("input", { bubbles: true })); // the form saves itself on input
}

function button(kind, name, prompt) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = `network ${kind}`;
  b.dataset.kind = kind;
  b.textContent = name;
  b.title = `${kind === "lora" ? "LoRA" : "embedding"}: insert ${tagFor(kind, name)}`;
  b.addEventListener("click", () => insertAtCursor(prompt, tagFor(kind, name)));
  return b;
}

/** Fill the panel from the server's lists; it stays hidden when there is nothing to show. */
export async function loadNetworks(panel, list, prompt) {
  const [loras, embeddings] = await Promise.all([get("sdapi/v1/loras"), get("sdapi/v1/embeddings")]);
  const items = [...loras.map((l) => ["lora", l.name]), ...Object.keys(embeddings.loaded || {}).map((n) => ["embedding", n])];
  list.replaceChildren(...items.map(([kind, name]) => button(kind, name, prompt)));
  panel.hidden = items.length === 0;
}
