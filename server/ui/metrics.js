// The live panel: a few of GET /metrics' series (vLLM's names under the vlmserve: prefix), polled while the page
// is visible.

const POLL_MS = 2000;

// {name: value} of the unlabelled samples of a Prometheus text exposition (labelled series are summed by name).
export function parseMetrics(text) {
  const values = {};
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const match = /^([A-Za-z_:][\w:]*)(\{[^}]*\})?\s+(\S+)/.exec(line);
    if (!match) continue;
    const value = Number(match[3]);
    if (Number.isFinite(value)) values[match[1]] = (values[match[1]] || 0) + value;
  }
  return values;
}

function percent(part, whole) {
  return whole > 0 ? `${Math.round((100 * part) / whole)}%` : "–";
}

// The panel's cells from parsed metrics.
export function panelValues(m) {
  const get = (name) => m[`vlmserve:${name}`] || 0;
  const visionHits = get("vision_cache_hits_total");
  return {
    running: String(get("num_requests_running")),
    waiting: String(get("num_requests_waiting")),
    kv: `${Math.round(100 * get("kv_cache_usage_perc"))}%`,
    prefix: percent(get("prefix_cache_hits_total"), get("prefix_cache_queries_total")),
    vision: percent(visionHits, visionHits + get("vision_cache_misses_total")),
  };
}

// Poll /metrics with `fetchText` and fill the `[data-metric]` cells under `panel`.
export function watchMetrics(panel, fetchText) {
  const cells = Object.fromEntries(Array.from(panel.querySelectorAll("[data-metric]"), (el) => [el.dataset.metric, el]));
  let timer = null;
  let busy = false;
  const update = async () => {
    if (timer !== null) clearTimeout(timer);
    timer = null;
    if (busy) return; // the running poll schedules the next
    busy = true;
    try {
      const values = panelValues(parseMetrics(await fetchText()));
      for (const [name, cell] of Object.entries(cells)) cell.textContent = values[name] ?? "–";
      panel.classList.remove("stale");
    } catch {
      panel.classList.add("stale");
    } finally {
      busy = false;
    }
    if (!document.hidden && timer === null) timer = setTimeout(update, POLL_MS);
  };
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) update();
  });
  update();
  return { refresh: update };
}
