// The server's API as the page uses it: JSON calls with credentials, readable errors, and the
// job event stream read through fetch (EventSource cannot send an Authorization header).

const AUTH_KEY = "stablekit.auth";

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

let onUnauthorized = async () => false;

/** Called on a 401; resolves true when the user gave credentials (then the call is retried once). */
export function setLoginHandler(handler) {
  onUnauthorized = handler;
}

export function setCredentials(value) {
  if (value) sessionStorage.setItem(AUTH_KEY, value);
  else sessionStorage.removeItem(AUTH_KEY);
}

function headers(extra = {}) {
  const auth = sessionStorage.getItem(AUTH_KEY);
  return auth ? { Authorization: auth, ...extra } : extra;
}

/** The server's error body is {error, detail, errors}; `detail` may be a list (validation errors). */
function messageOf(status, body, text) {
  if (body && typeof body === "object") {
    if (typeof body.errors === "string" && body.errors) return body.errors;
    if (typeof body.detail === "string" && body.detail) return body.detail;
    if (Array.isArray(body.detail)) return body.detail.map((d) => `${(d.loc || []).join(".")}: ${d.msg}`).join("; ");
  }
  return text ? text.slice(0, 300) : `the server answered ${status}`;
}

export async function request(method, path, body, { retry = true } = {}) {
  let response;
  try {
    response = await fetch(path, {
      method,
      headers: headers(body === undefined ? {} : { "Content-Type": "application/json" }),
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (e) {
    throw new ApiError(0, `cannot reach the server (${e.message})`);
  }
  if (response.status === 401 && retry && (await onUnauthorized())) {
    return request(method, path, body, { retry: false });
  }
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!response.ok) throw new ApiError(response.status, messageOf(response.status, data, text));
  return data;
}

export const get = (path) => request("GET", path);
export const post = (path, body) => request("POST", path, body ?? {});
export const del = (path) => request("DELETE", path);

/** A picture the API serves (it may need credentials) -> a Blob. */
export async function fetchBlob(path) {
  const response = await fetch(path, { headers: headers() });
  if (!response.ok) throw new ApiError(response.status, `cannot load ${path} (${response.status})`);
  return response.blob();
}

/**
 * Read the job's server-sent events; `onEvent(name, data)` for each. Resolves with the final event
 * (done / failed / cancelled) or null when the stream ended without one (connection lost).
 */
export async function streamEvents(path, onEvent, signal) {
  const response = await fetch(path, { headers: headers({ Accept: "text/event-stream" }), signal });
  if (!response.ok) throw new ApiError(response.status, `cannot follow the job (${response.status})`);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let final = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
      }
      if (!data.length) continue; // a keep-alive comment
      const payload = JSON.parse(data.join("\n"));
      onEvent(name, payload);
      if (["done", "failed", "cancelled"].includes(name)) final = { name, job: payload };
    }
  }
  return final;
}
