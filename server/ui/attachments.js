// Images waiting to go with the next message: from the file picker, dropped on the page or pasted. Each is read
// as a data URL (what OpenAI's image_url parts carry) and shown as a thumbnail that can be removed.

const MAX_BYTES = 20 * 1024 * 1024; // the server's default --max-image-bytes

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

export class Attachments {
  // `container` shows the thumbnails; `onError(text)` reports a file that is not an image or too big.
  constructor(container, onError) {
    this.container = container;
    this.onError = onError;
    this.items = [];
  }

  get size() {
    return this.items.length;
  }

  // Add the image files among `files` (a FileList or array); others are reported and skipped.
  async add(files) {
    for (const file of Array.from(files)) {
      if (!file.type.startsWith("image/")) {
        this.onError(`${file.name || "That file"} is not an image (${file.type || "unknown type"}).`);
        continue;
      }
      if (file.size > MAX_BYTES) {
        this.onError(`${file.name} is over ${MAX_BYTES / 1024 / 1024} MB.`);
        continue;
      }
      const url = await readAsDataURL(file);
      this.items.push({ url, name: file.name || "pasted image" });
    }
    this.render();
  }

  // The attached images (and empties the list).
  take() {
    const taken = this.items;
    this.items = [];
    this.render();
    return taken;
  }

  clear() {
    this.take();
  }

  render() {
    this.container.replaceChildren(
      ...this.items.map((item, i) => {
        const figure = document.createElement("figure");
        figure.className = "thumb";
        const img = document.createElement("img");
        img.src = item.url;
        img.alt = item.name;
        const remove = document.createElement("button");
        remove.type = "button";
        remove.className = "remove";
        remove.textContent = "×";
        remove.setAttribute("aria-label", `Remove picture ${i + 1}`); // not "image": the picker alone is "Image"
        remove.title = `Remove ${item.name}`;
        remove.addEventListener("click", () => {
          this.items.splice(i, 1);
          this.render();
        });
        figure.append(img, remove);
        return figure;
      }),
    );
  }
}

// Wire the three ways in: the picker `input`, drops anywhere on `zone`, and pastes into the document.
export function acceptImages(attachments, input, zone) {
  input.addEventListener("change", async () => {
    await attachments.add(input.files);
    input.value = "";
  });
  const hasFiles = (event) => event.dataTransfer && Array.from(event.dataTransfer.types || []).includes("Files");
  let depth = 0;
  zone.addEventListener("dragenter", (event) => {
    if (!hasFiles(event)) return;
    depth += 1;
    zone.classList.add("dragging");
  });
  zone.addEventListener("dragleave", () => {
    depth = Math.max(0, depth - 1);
    if (depth === 0) zone.classList.remove("dragging");
  });
  zone.addEventListener("dragover", (event) => {
    if (hasFiles(event)) event.preventDefault();
  });
  zone.addEventListener("drop", (event) => {
    depth = 0;
    zone.classList.remove("dragging");
    if (!event.dataTransfer || !event.dataTransfer.files.length) return;
    event.preventDefault();
    attachments.add(event.dataTransfer.files);
  });
  document.addEventListener("paste", (event) => {
    const files = event.clipboardData ? Array.from(event.clipboardData.files) : [];
    const images = files.filter((f) => f.type.startsWith("image/"));
    if (!images.length) return; // plain text pastes as usual
    event.preventDefault();
    attachments.add(images);
  });
}
