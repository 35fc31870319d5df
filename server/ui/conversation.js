// The conversation: what the log shows (turns, streaming answers with their figures, errors) and the history
// sent with each request (OpenAI messages: a user turn's images as image_url parts before its text).

function element(tag, className, text) {
  const el = document.createElement(tag);
  if (className) el.className = className;
  if (text !== undefined) el.textContent = text;
  return el;
}

function seconds(s) {
  return s < 1 ? `${Math.round(s * 1000)} ms` : `${s.toFixed(2)} s`;
}

// The figures line of one answer: time to first token, decode speed, tokens, cached prompt tokens.
export function answerStats({ ttft, decodeSeconds, usage }) {
  const parts = [];
  if (ttft !== null) parts.push(`TTFT ${seconds(ttft)}`);
  if (usage) {
    const n = usage.completion_tokens;
    if (n > 1 && decodeSeconds > 0) parts.push(`${((n - 1) / decodeSeconds).toFixed(1)} tokens/s`);
    parts.push(`${n} token${n === 1 ? "" : "s"}`);
    const cached = (usage.prompt_tokens_details && usage.prompt_tokens_details.cached_tokens) || 0;
    parts.push(`prompt ${usage.prompt_tokens} (${cached} cached)`);
  }
  return parts.join(" · ");
}

class Answer {
  constructor(view) {
    this.view = view;
    this.text = "";
    this.body = element("div", "text");
    this.stats = element("p", "stats", "…");
    this.node = element("article", "turn assistant");
    this.node.setAttribute("aria-busy", "true");
    this.node.append(this.body, this.stats);
  }

  append(delta) {
    this.text += delta;
    this.body.textContent = this.text.trimStart(); // answers often begin with a spaced word (" red")
    this.view.follow();
  }

  finish(stats, note) {
    this.node.removeAttribute("aria-busy");
    this.stats.textContent = note ? `${note}${stats ? ` · ${stats}` : ""}` : stats;
    this.view.follow();
  }
}

export class Conversation {
  constructor(log) {
    this.log = log;
    this.hint = log.querySelector(".hint");
    this.messages = []; // the history sent with the next request
    this.generation = 0; // counts "New chat"s
  }

  follow() {
    this.log.scrollTop = this.log.scrollHeight;
  }

  show(node) {
    if (this.hint) this.hint.remove();
    this.log.append(node);
    this.follow();
  }

  // A user turn: shown, and returned as the message to send (the caller commits it once the answer came).
  addUser(text, images) {
    const node = element("article", "turn user");
    if (images.length) {
      const strip = element("div", "images");
      for (const image of images) {
        const img = element("img");
        img.src = image.url;
        img.alt = image.name;
        strip.append(img);
      }
      node.append(strip);
    }
    if (text) node.append(element("div", "text", text));
    this.show(node);
    const parts = images.map((image) => ({ type: "image_url", image_url: { url: image.url } }));
    if (text && parts.length) parts.push({ type: "text", text });
    return { node, message: { role: "user", content: parts.length ? parts : text } };
  }

  startAnswer() {
    const answer = new Answer(this);
    this.show(answer.node);
    return answer;
  }

  // Keep a finished exchange in the history (a stopped answer keeps what it had said), unless the chat it belongs
  // to (`generation`) was cleared meanwhile.
  commit(generation, userMessage, answerText) {
    if (generation === this.generation && answerText) {
      this.messages.push(userMessage, { role: "assistant", content: answerText });
    }
  }

  // A readable error in the log; the exchange that failed is not kept in the history.
  addError(text, userNode) {
    if (userNode) userNode.classList.add("failed");
    const node = element("div", "turn error", text);
    node.setAttribute("role", "alert");
    this.show(node);
  }

  clear() {
    this.generation += 1;
    this.messages = [];
    this.log.replaceChildren();
    if (this.hint) this.log.append(this.hint);
  }
}
