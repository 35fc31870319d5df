// The chat page: wires the composer, the settings, the conversation and the live panel together.

import { metricsText, modelId, streamChat } from "./api.js";
import { acceptImages, Attachments } from "./attachments.js";
import { answerStats, Conversation } from "./conversation.js";
import { watchMetrics } from "./metrics.js";
import { Settings } from "./settings.js";

const $ = (selector) => document.querySelector(selector);

const conversation = new Conversation($("#log"));
const settings = new Settings(document);
const attachments = new Attachments($("#attachments"), (text) => conversation.addError(text));
const metrics = watchMetrics($("#metrics"), metricsText);
const form = $("#composer");
const message = $("#message");
const sendButton = $("#send");
const stopButton = $("#stop");
let controller = null; // the request in flight, if any

acceptImages(attachments, $("#image"), document.body);
if (window.matchMedia("(min-width: 900px)").matches) $("#settings").open = true;

function setBusy(busy) {
  sendButton.disabled = busy;
  stopButton.disabled = !busy;
  form.classList.toggle("busy", busy);
}

async function showModel() {
  const label = $("#model");
  try {
    label.textContent = await modelId(settings.apiKey);
    label.title = "the served model";
  } catch (error) {
    label.textContent = error.status === 401 ? "API key needed (Settings)" : "";
    label.title = error.message;
  }
}

async function send() {
  const text = message.value.trim();
  if (controller || (!text && !attachments.size)) return;
  const images = attachments.take();
  message.value = "";
  const { node, message: userMessage } = conversation.addUser(text, images);
  const chat = conversation.generation; // "New chat" while this answer streams: it is not kept
  const system = settings.systemPrompt;
  const messages = [...(system ? [{ role: "system", content: system }] : []), ...conversation.messages, userMessage];
  const answer = conversation.startAnswer();
  controller = new AbortController();
  setBusy(true);
  const started = performance.now();
  let first = null;
  try {
    const { usage, finishReason } = await streamChat({ messages, ...settings.requestFields() }, {
      key: settings.apiKey,
      signal: controller.signal,
      onDelta: (delta) => {
        if (first === null) first = performance.now();
        answer.append(delta);
      },
    });
    const ended = performance.now();
    conversation.commit(chat, userMessage, answer.text);
    const stats = answerStats({
      ttft: first === null ? null : (first - started) / 1000,
      decodeSeconds: first === null ? 0 : (ended - first) / 1000,
      usage,
    });
    answer.finish(stats, finishReason === "length" ? "cut at max tokens" : "");
  } catch (error) {
    if (error.name === "AbortError") {
      conversation.commit(chat, userMessage, answer.text);
      answer.finish("", "stopped");
    } else {
      if (answer.text) answer.finish("", "failed");
      else answer.node.remove();
      conversation.addError(error.message, node);
    }
  } finally {
    controller = null;
    setBusy(false);
    metrics.refresh();
    message.focus();
  }
}

$("#settings-form").addEventListener("submit", (event) => event.preventDefault());
form.addEventListener("submit", (event) => {
  event.preventDefault();
  send();
});
message.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    form.requestSubmit();
  }
});
stopButton.addEventListener("click", () => {
  if (controller) controller.abort();
});
$("#new-chat").addEventListener("click", () => {
  if (controller) controller.abort();
  conversation.clear();
  attachments.clear();
  message.focus();
});
$("#api-key").addEventListener("change", showModel);

setBusy(false);
showModel();
