// The settings panel: sampling fields and the system prompt become request fields (an empty field is left out,
// so the server's defaults apply); the API key is kept in localStorage. Every field survives a reload.

const STORE = "vlmserve.settings";
const KEY_STORE = "vlmserve.apiKey";
const FIELDS = ["temperature", "max-tokens", "seed", "system"];

function load(name) {
  try {
    return localStorage.getItem(name);
  } catch {
    return null; // storage disabled: the page still works, nothing is kept
  }
}

function save(name, value) {
  try {
    if (value) localStorage.setItem(name, value);
    else localStorage.removeItem(name);
  } catch {
    // storage disabled or full
  }
}

export class Settings {
  constructor(root) {
    this.inputs = Object.fromEntries(FIELDS.map((id) => [id, root.querySelector(`#${id}`)]));
    this.key = root.querySelector("#api-key");
    let stored = {};
    try {
      stored = JSON.parse(load(STORE) || "{}");
    } catch {
      stored = {};
    }
    for (const [id, input] of Object.entries(this.inputs)) {
      if (typeof stored[id] === "string") input.value = stored[id];
      input.addEventListener("input", () => this.persist());
    }
    this.key.value = load(KEY_STORE) || "";
    this.key.addEventListener("input", () => save(KEY_STORE, this.key.value.trim()));
  }

  persist() {
    const values = Object.fromEntries(Object.entries(this.inputs).map(([id, input]) => [id, input.value]));
    save(STORE, JSON.stringify(values));
  }

  get apiKey() {
    return this.key.value.trim();
  }

  get systemPrompt() {
    return this.inputs.system.value.trim();
  }

  // The sampling fields of a chat request.
  requestFields() {
    const fields = {};
    const number = (id) => {
      const text = this.inputs[id].value.trim();
      return text === "" ? null : Number(text);
    };
    const temperature = number("temperature");
    if (temperature !== null && Number.isFinite(temperature)) fields.temperature = temperature;
    const maxTokens = number("max-tokens");
    if (maxTokens !== null && Number.isInteger(maxTokens)) fields.max_tokens = maxTokens;
    const seed = number("seed");
    if (seed !== null && Number.isInteger(seed)) fields.seed = seed;
    return fields;
  }
}
