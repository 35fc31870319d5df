// The server's HTTP API as the page uses it: same-origin fetches only, the key as a Bearer header, chat answers
// read from server-sent events, every failure turned into an ApiError with a readable message.

export class ApiError extends Error {
  constructor(message, { status = null, code = null, retryAfter = null } = {}) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
  }
}

function headers(key, extra = {}) {
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

// Seconds from a Retry-After header (delta-seconds or an HTTP date), or null.
export function retryAfterSeconds(value) {
  if (!value) return null;
  const seconds = Number(value);
  if (Number.isFinite(seconds)) return Math.max(0, seconds);
  const when = Date.parse(value);
  return Number.isNaN(when) ? null : Math.max(0, Math.round((when - Date.now()) / 1000));
}

// What an error answer means to the person at the page, from its status, its {"error": {...}} body and headers.
export function describe(status, body, retryAfter) {
  const error = body && typeof body === "object" ? body.error : null;
  const detail = (error && (error.message || (typeof error === "string" ? error : ""))) || "";
  const code = error && error.code ? error.code : null;
  const when = retryAfter === null ? "" : ` Retry in ${retryAfter} s.`;
  let message;
  if (status === 429) message = `The server is busy (HTTP 429): ${detail || "too many requests"}.${when}`;
  else if (status === 503) message = `The server is not ready (HTTP 503): ${detail || "unavailable"}.${when}`;
  else if (status === 401) message = `Not authorised (HTTP 401): ${detail} Enter the server's API key in Settings.`;
  else if (status === null) message = `The answer failed: ${detail || "error in the stream"}`;
  else message = `HTTP ${status}: ${detail || "the request failed"}`;
  return new ApiError(message, { status, code, retryAfter });
}

async function failure(response) {
  let body = null;
  try {
    body = JSON.parse(await response.text());
  } catch {
    body = null;
  }
  return describe(response.status, body, retryAfterSeconds(response.headers.get("Retry-After")));
}

async function send(path, init) {
  try {
    return await fetch(path, init);
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(`Cannot reach the server (${error.message}).`);
  }
}

// The served model's id (GET /v1/models).
export async function modelId(key) {
  const response = await send("/v1/models", { headers: headers(key) });
  if (!response.ok) throw await failure(response);
  const body = await response.json();
  return body.data && body.data.length ? body.data[0].id : "";
}

// The Prometheus text of GET /metrics.
export async function metricsText() {
  const response = await send("/metrics", {});
  if (!response.ok) throw await failure(response);
  return response.text();
}

// The `data` of each event of a text/event-stream, as its chunks arrive (lines end at CR, LF or CRLF).
async function* events(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let data = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    const lines = buffer.split(/\r\n|\r|\n/);
    buffer = lines.pop();
    for (const line of lines) {
      if (line === "") {
        if (data.length) yield data.join("\n");
        data = [];
      } else if (line.startsWith("data:")) {
        data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
      }
    }
  }
  if (data.length) yield data.join("\n");
}

// POST /v1/chat/completions streamed: `onDelta(text)` for each piece of the answer; resolves to
// {finishReason, usage}. Aborting `signal` closes the connection (the server then cancels the generation).
export async function streamChat(body, { key, signal, onDelta }) {
  const response = await send("/v1/chat/completions", {
    method: "POST",
    headers: headers(key, { "Content-Type": "application/json" }),
    body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }),
    signal,
  });
  if (!response.ok) throw await failure(response);
  let finishReason = null;
  let usage = null;
  for await (const data of events(response.body)) {
    if (data.trim() === "[DONE]") break;
    const chunk = JSON.parse(data);
    if (chunk.error) throw describe(null, chunk, null);
    if (chunk.usage) usage = chunk.usage;
    for (const choice of chunk.choices || []) {
      if (choice.delta && choice.delta.content) onDelta(choice.delta.content);
      if (choice.finish_reason) finishReason = choice.finish_reason;
    }
  }
  return { finishReason, usage };
}
