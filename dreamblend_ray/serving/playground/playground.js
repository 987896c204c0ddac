// DreamBlend playground: plain JS, no dependencies, same-origin requests only.
// The API key lives in `apiKey` (memory) and nowhere else: no storage, no cookie.
"use strict";

(() => {
  const ROWS = [["guidance", "G"], ["edit", "E"], ["dreamblend", "DreamBlend"]];
  // dark blue -> teal -> yellow, as dreamblend_ray.method.heatmap_report.RAMP
  const RAMP = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  const SVG = "http://www.w3.org/2000/svg";
  // subjects per GET /v1/subjects page; "/?page_size=N" picks another (1..200)
  const PAGE = Math.min(200, Math.max(1, parseInt(new URLSearchParams(location.search).get("page_size"), 10) || 50));
  const POLL_MS = 1000; // a training's GET /v1/subjects/{id} period
  const FINAL = ["ready", "failed", "canceled"];
  const STATUS_MS = 2000; // GET /v1/status period while the page is visible

  let apiKey = "";
  let subject = null; // the chosen subject's GET /v1/subjects/{id} body
  let nextCursor = null;
  let collapseUrl = null;
  const trainings = new Map(); // subject id -> {row, timer}: the subjects uploaded from this page
  const statusPoll = { timer: null, asked: 0, stopped: false }; // stopped by a 401 until the key changes

  const $ = (id) => document.getElementById(id);

  // ------------------------------------------------------------------ requests and errors

  function call(path, init = {}) {
    const headers = {};
    if (apiKey) headers.Authorization = "Bearer " + apiKey;
    // JSON text is labelled; a FormData body gets its multipart type (and boundary) from the browser.
    if (typeof init.body === "string") headers["Content-Type"] = "application/json";
    return fetch(path, { ...init, headers, cache: "no-store", credentials: "omit" });
  }

  function fieldName(loc) {
    const parts = (Array.isArray(loc) ? loc : []).filter((p) => !["body", "path", "query"].includes(p));
    return parts.length ? parts.join(".") : "request";
  }

  // {"detail": "sentence"} as is (an upload's 413 adds its file and rule); 422's [{loc, msg}] as
  // "field: message" lines.
  function detailText(body) {
    const detail = body && body.detail;
    if (typeof detail === "string") return body.rule ? `${detail} (file ${body.file}, rule ${body.rule})` : detail;
    if (Array.isArray(detail)) return detail.map((i) => `${fieldName(i.loc)}: ${i.msg}`).join("\n");
    return null;
  }

  async function failure(response) {
    let text = null;
    try {
      text = detailText(await response.json());
    } catch (_) { /* not JSON */ }
    return { status: response.status, text: text || response.statusText || "request failed" };
  }

  async function getJson(path) {
    const response = await call(path);
    if (!response.ok) throw await failure(response);
    return response.json();
  }

  function showError(error) {
    const status = error && error.status ? `HTTP ${error.status}` : "error";
    $("error-status").textContent = status;
    $("error-text").textContent = (error && (error.text || error.message)) || String(error);
    $("error").hidden = false;
  }

  function clearError() {
    $("error").hidden = true;
    $("error-text").textContent = "";
  }

  // ------------------------------------------------------------------ subjects

  function option(value, label) {
    const el = document.createElement("option");
    el.value = String(value);
    el.textContent = label;
    return el;
  }

  async function loadSubjects(append, firstLoad = false) {
    const select = $("subject");
    let path = `/v1/subjects?limit=${PAGE}`;
    if (append && nextCursor) path += `&after=${encodeURIComponent(nextCursor)}`;
    try {
      const page = await getJson(path);
      if (!append) select.replaceChildren(option("", "(choose a subject)"));
      for (const id of page.subjects) select.append(option(id, id));
      nextCursor = page.next;
      $("more-subjects").hidden = !nextCursor;
      if (!append && page.subjects.length === 0) select.replaceChildren(option("", "(no subjects yet)"));
      clearError();
    } catch (error) {
      if (firstLoad && error.status === 401) {
        select.replaceChildren(option("", "(enter the API key)"));
      } else {
        showError(error);
      }
    }
  }

  // The list changes in place (a reload would lose the choice and the pages already loaded).
  function addSubjectOption(id) {
    const select = $("subject");
    if ([...select.options].some((o) => o.value === id)) return;
    if (select.options.length === 0 || select.options[0].value !== "" || select.options.length === 1) {
      select.replaceChildren(option("", "(choose a subject)"), ...[...select.options].filter((o) => o.value));
    }
    select.append(option(id, id));
  }

  function removeSubjectOption(id) {
    const select = $("subject");
    const chosen = select.value === id;
    for (const o of [...select.options]) if (o.value === id) o.remove();
    if (chosen) {
      select.value = "";
      chooseSubject("");
    }
  }

  function fillSteps(select, steps, chosen) {
    select.replaceChildren(...steps.map((s) => option(s, String(s))));
    select.value = String(chosen);
  }

  async function chooseSubject(id) {
    subject = null;
    $("delete-subject").disabled = !id;
    $("subject-info").textContent = "";
    for (const s of [$("g-step"), $("e-step")]) s.replaceChildren();
    showCollapse(null, "choose a subject");
    if (!id) return;
    try {
      const view = await getJson(`/v1/subjects/${encodeURIComponent(id)}`);
      if ($("subject").value !== id) return; // chosen again (or deleted) meanwhile: a stale answer
      subject = view;
      const base = view.base ? `${view.base.name} (${view.base.config_id})` : "?";
      $("subject-info").textContent = `saved steps ${view.steps.join(", ")} · default pair G=${view.guidance_step}, `
        + `E=${view.edit_step} · base ${base}` + (view.kind ? ` · ${view.kind}` : "");
      fillSteps($("g-step"), view.steps, view.guidance_step);
      fillSteps($("e-step"), view.steps, view.edit_step);
      if (!$("prompt").value && view.instance_prompt) $("prompt").value = view.instance_prompt;
      clearError();
      await loadCollapse(id);
    } catch (error) {
      if ($("subject").value === id) showError(error);
    }
  }

  function showCollapse(blob, note) {
    if (collapseUrl) URL.revokeObjectURL(collapseUrl);
    collapseUrl = blob ? URL.createObjectURL(blob) : null;
    const img = $("collapse");
    img.hidden = !collapseUrl;
    if (collapseUrl) img.src = collapseUrl; else img.removeAttribute("src");
    $("collapse-note").textContent = note;
  }

  // <img> cannot send the key: fetch the plot as a blob and show it through an object URL.
  async function loadCollapse(id) {
    const response = await call(`/v1/subjects/${encodeURIComponent(id)}/collapse.png`);
    if (response.status === 404) return showCollapse(null, "no collapse plot yet");
    if (!response.ok) {
      const error = await failure(response);
      return showCollapse(null, `collapse plot unavailable: ${error.text}`);
    }
    showCollapse(await response.blob(), `${id}: attention collapse against the fine-tuning step`);
  }

  // ------------------------------------------------------------------ upload, training, delete

  function uploadForm() {
    const form = new FormData();
    for (const file of $("upload-images").files) form.append("images", file, file.name);
    form.append("class_noun", $("upload-class").value.trim());
    const id = $("upload-id").value.trim();
    if (id) form.append("subject_id", id);
    const steps = $("upload-steps").value.trim();
    if (steps) form.append("steps", steps);
    return form;
  }

  async function upload(event) {
    event.preventDefault();
    if ($("upload-images").files.length === 0) return showError({ text: "choose one or more images to upload" });
    if (!$("upload-class").value.trim()) return showError({ text: "the class noun is required (e.g. dog)" });
    const button = $("upload");
    button.disabled = true;
    $("upload-status").textContent = "uploading…";
    try {
      const response = await call("/v1/subjects", { method: "POST", body: uploadForm() });
      if (!response.ok) throw await failure(response);
      const created = await response.json();
      clearError();
      $("upload-status").textContent = `${created.subject_id} queued`;
      $("upload-form").reset();
      track(created);
    } catch (error) {
      $("upload-status").textContent = "";
      showError(error);
    } finally {
      button.disabled = false;
    }
  }

  function track(state) {
    const old = trainings.get(state.subject_id);
    if (old) { clearTimeout(old.timer); old.row.remove(); }
    const row = $("training-template").content.firstElementChild.cloneNode(true);
    row.dataset.subject = state.subject_id;
    row.querySelector(".training-id").textContent = state.subject_id;
    row.querySelector(".training-id").title = state.subject_id;
    row.querySelector(".training-delete").addEventListener("click", () => deleteSubject(state.subject_id));
    $("trainings").prepend(row);
    trainings.set(state.subject_id, { row, timer: null });
    showTraining(state);
  }

  function statusText(state) {
    const p = state.progress;
    if (state.status === "queued") return state.queue_position ? `queued (#${state.queue_position})` : "queued";
    if (state.status === "training") {
      const retry = p && p.attempt > 1 ? ` · attempt ${p.attempt}` : "";
      return p ? `training · step ${p.step}/${p.total}${retry}` : "training · starting";
    }
    if (state.status === "failed") return `failed: ${state.error || "no reason given"}`;
    return state.status;
  }

  // One GET's answer drawn on its row; the next poll scheduled until the state is final.
  function showTraining(state) {
    const entry = trainings.get(state.subject_id);
    if (!entry) return; // deleted meanwhile
    const { row } = entry;
    const bar = row.querySelector(".training-progress");
    const p = state.progress;
    if (state.status === "ready") {
      bar.max = 1;
      bar.value = 1;
    } else if (p && p.total) {
      bar.max = p.total;
      bar.value = p.step;
    } else {
      bar.removeAttribute("value"); // indeterminate while queued or starting
    }
    row.dataset.status = state.status;
    row.querySelector(".training-status").textContent = statusText(state);
    if (!FINAL.includes(state.status)) entry.timer = setTimeout(() => poll(state.subject_id), POLL_MS);
    else if (state.status === "ready") addSubjectOption(state.subject_id); // it can now be chosen under Subject
  }

  async function poll(id) {
    const entry = trainings.get(id);
    if (!entry) return;
    try {
      showTraining(await getJson(`/v1/subjects/${encodeURIComponent(id)}`));
    } catch (error) {
      if (error.status === 404) return forget(id, "deleted");
      // a restarting service or a lost connection: say so, and keep polling
      entry.row.querySelector(".training-status").textContent = `no answer (${error.text || error}); retrying`;
      entry.timer = setTimeout(() => poll(id), POLL_MS);
    }
  }

  function forget(id, status) {
    const entry = trainings.get(id);
    if (!entry) return;
    clearTimeout(entry.timer);
    trainings.delete(id);
    entry.row.dataset.status = status;
    entry.row.querySelector(".training-status").textContent = status;
    entry.row.querySelector(".training-delete").disabled = true;
  }

  async function deleteSubject(id) {
    if (!id || !confirm(`Delete subject "${id}" and everything stored for it (its images and checkpoints)? `
                        + "This cannot be undone.")) return;
    try {
      const response = await call(`/v1/subjects/${encodeURIComponent(id)}`, { method: "DELETE" });
      if (!response.ok && response.status !== 404) throw await failure(response);
      clearError();
      forget(id, "deleted");
      removeSubjectOption(id);
    } catch (error) {
      showError(error);
    }
  }

  // ------------------------------------------------------------------ status panel

  const DASH = "–";
  const shown = (value, unit = "") => (value == null ? DASH : `${value}${unit}`);
  const ms = (value) => (value == null ? DASH : `${Number(value).toFixed(value < 100 ? 1 : 0)} ms`);
  const round2 = (value) => String(Math.round(value * 100) / 100);

  function ago(unixSeconds) {
    const s = Math.max(0, Date.now() / 1000 - unixSeconds);
    if (s < 120) return `${Math.round(s)} s ago`;
    if (s < 7200) return `${Math.round(s / 60)} min ago`;
    return new Date(unixSeconds * 1000).toLocaleString();
  }

  function stepsText(view) {
    if (view.last_step_at == null) return "no step yet";
    return `${view.recent_steps ? `${view.recent_steps} recent steps, ` : ""}last ${ago(view.last_step_at)}`;
  }

  function latencyText(l) {
    if (!l || !l.count) return "no generations yet";
    const errors = l.errors ? ` · ${l.errors} failed` : "";
    return `p50 ${ms(l.p50_ms)} · p95 ${ms(l.p95_ms)} · ${l.count} request${l.count === 1 ? "" : "s"} `
      + `in ${l.window_s} s${errors}`;
  }

  // One GET /v1/status body, as text in the panel's <output>s (never as markup).
  function showStatus(view) {
    const family = view.family ? ` · ${view.family}` : "";
    $("status-batching").textContent = `${shown(view.batching)}${family}`;
    $("status-queue").textContent = shown(view.queue_depth);
    $("status-active").textContent = shown(view.active_rows);
    $("status-rows").textContent = view.rows_per_step == null ? DASH
      : `${round2(view.rows_per_step)} mean · ${shown(view.max_rows_per_step)} max`;
    $("status-step").textContent = ms(view.step_ms);
    $("status-guided").textContent = view.guided_share == null ? DASH : `${Math.round(view.guided_share * 100)}%`;
    const subjects = view.loaded_subjects || [];
    $("status-subjects").textContent = subjects.length ? subjects.join(", ") : "none";
    $("status-latency").textContent = latencyText(view.latency);
    $("status-note").textContent = `replica ${shown(view.replica)} · ${stepsText(view)} · `
      + `updated ${new Date().toLocaleTimeString()}`;
    $("status-view").hidden = false;
  }

  function showStatusFailure(error) {
    $("status-view").hidden = true;
    let note;
    if (error.status === 503) note = "replica not answering; retrying";
    else if (error.status === 401) note = `${error.text} (enter the API key to see the status)`;
    else note = `${error.status ? `HTTP ${error.status}: ` : ""}${error.text || error.message || error}; retrying`;
    $("status-note").textContent = note;
  }

  function scheduleStatus() {
    clearTimeout(statusPoll.timer);
    statusPoll.timer = null;
    if (!statusPoll.stopped && document.visibilityState === "visible") {
      statusPoll.timer = setTimeout(refreshStatus, STATUS_MS);
    }
  }

  // Asks now; the answer of an older call still in flight is dropped. Polls on while visible.
  async function refreshStatus() {
    clearTimeout(statusPoll.timer);
    statusPoll.timer = null;
    if (statusPoll.stopped) return;
    const asked = ++statusPoll.asked;
    try {
      const view = await getJson("/v1/status");
      if (asked !== statusPoll.asked) return;
      showStatus(view);
    } catch (error) {
      if (asked !== statusPoll.asked) return;
      showStatusFailure(error);
      if (error.status === 401) statusPoll.stopped = true; // until the key changes (Use key)
    }
    scheduleStatus();
  }

  // ------------------------------------------------------------------ generate

  function numberField(body, name, id) {
    const text = $(id).value.trim();
    if (text !== "") body[name] = Number(text);
  }

  function requestBody() {
    const body = { subject_id: $("subject").value, prompt: $("prompt").value, attention_maps: true,
                   response_format: "json" };
    numberField(body, "seed", "seed");
    numberField(body, "num_inference_steps", "steps");
    numberField(body, "guidance_steps", "window");
    numberField(body, "alpha", "alpha");
    if ($("eta-schedule").value) body.eta_schedule = $("eta-schedule").value;
    numberField(body, "guidance_scale", "scale");
    numberField(body, "guidance_step", "g-step");
    numberField(body, "edit_step", "e-step");
    return body;
  }

  async function generate(event) {
    event.preventDefault();
    const button = $("generate");
    button.disabled = true;
    $("status").textContent = "generating…";
    const started = performance.now();
    try {
      const response = await call("/v1/generate", { method: "POST", body: JSON.stringify(requestBody()) });
      if (!response.ok) throw await failure(response);
      const result = await response.json();
      clearError();
      renderResult(result);
      const seconds = ((performance.now() - started) / 1000).toFixed(1);
      $("status").textContent = `${result.model_id} · ${seconds} s · replica ${result.replica}`;
    } catch (error) {
      $("status").textContent = "";
      showError(error);
    } finally {
      button.disabled = false;
      refreshStatus(); // the batch and the latencies this generation changed
    }
  }

  // ------------------------------------------------------------------ drawing

  function ramp(t) {
    const x = Math.min(1, Math.max(0, t)) * (RAMP.length - 1);
    const low = Math.min(RAMP.length - 2, Math.floor(x));
    const f = x - low;
    return RAMP[low].map((c, i) => Math.round(c * (1 - f) + RAMP[low + 1][i] * f));
  }

  // Each word's [low, span] over the three rows: one colour scale per word (column).
  function wordScales(maps, words) {
    return words.map((_, w) => {
      let low = Infinity, high = -Infinity;
      for (const [row] of ROWS) {
        for (const line of maps[row][w]) for (const v of line) { low = Math.min(low, v); high = Math.max(high, v); }
      }
      return [low, Math.max(high - low, 1e-12)];
    });
  }

  function heatCanvas(map, [low, span]) {
    const h = map.length, w = map[0].length;
    const canvas = document.createElement("canvas");
    canvas.width = w;
    canvas.height = h;
    const context = canvas.getContext("2d");
    const image = context.createImageData(w, h);
    for (let y = 0; y < h; y++) {
      for (let x = 0; x < w; x++) {
        const [r, g, b] = ramp((map[y][x] - low) / span);
        image.data.set([r, g, b, 255], (y * w + x) * 4);
      }
    }
    context.putImageData(image, 0, 0);
    return canvas;
  }

  function pngImage(base64, alt) {
    const img = document.createElement("img");
    img.className = "sample-image";
    img.alt = alt;
    img.src = "data:image/png;base64," + base64;
    return img;
  }

  function rowCard(row, label, image, attention, scales) {
    const card = document.createElement("figure");
    card.className = "card";
    card.dataset.row = row;
    const caption = document.createElement("figcaption");
    caption.textContent = label;
    card.append(caption, pngImage(image, label));
    const maps = document.createElement("div");
    maps.className = "maps";
    attention.words.forEach((word, w) => {
      const cell = document.createElement("div");
      cell.className = "map";
      const name = document.createElement("span");
      name.className = "word";
      name.textContent = word;
      name.title = word;
      cell.append(name, heatCanvas(attention.maps[row][w], scales[w]));
      maps.append(cell);
    });
    card.append(maps);
    return card;
  }

  function svgElement(name, attributes) {
    const el = document.createElementNS(SVG, name);
    for (const [key, value] of Object.entries(attributes)) el.setAttribute(key, String(value));
    return el;
  }

  function drawCurve(svg, values) {
    svg.replaceChildren();
    const finite = values.filter((v) => Number.isFinite(v));
    if (finite.length === 0) return false;
    const [left, right, top, bottom] = [40, 312, 10, 100];
    const low = Math.min(...finite), high = Math.max(...finite), span = Math.max(high - low, 1e-12);
    const x = (i) => left + (values.length > 1 ? (i * (right - left)) / (values.length - 1) : (right - left) / 2);
    const y = (v) => bottom - ((v - low) / span) * (bottom - top);
    svg.append(svgElement("line", { x1: left, y1: bottom, x2: right, y2: bottom, class: "axis" }),
               svgElement("line", { x1: left, y1: top, x2: left, y2: bottom, class: "axis" }));
    const points = values.map((v, i) => (Number.isFinite(v) ? `${x(i).toFixed(1)},${y(v).toFixed(1)}` : null))
      .filter(Boolean).join(" ");
    svg.append(svgElement("polyline", { points, class: "line" }));
    values.forEach((v, i) => { if (Number.isFinite(v)) svg.append(svgElement("circle", { cx: x(i), cy: y(v), r: 2.5, class: "dot" })); });
    const label = (text, attrs) => { const t = svgElement("text", attrs); t.textContent = text; svg.append(t); };
    label(high.toPrecision(3), { x: left - 4, y: top + 4, "text-anchor": "end" });
    label(low.toPrecision(3), { x: left - 4, y: bottom, "text-anchor": "end" });
    label("guided step →", { x: right, y: bottom + 16, "text-anchor": "end" });
    return true;
  }

  function renderSample(result, k) {
    const attention = result.attention[k];
    const article = $("sample-template").content.firstElementChild.cloneNode(true);
    article.dataset.index = String(k);
    article.querySelector(".sample-title").textContent = `“${result.prompts[k]}” · seed ${result.seeds[k]}`;
    const scales = wordScales(attention.maps, attention.words);
    const images = { guidance: attention.images.guidance, edit: attention.images.edit, dreamblend: result.images[k] };
    const steps = { guidance: $("g-step").value, edit: $("e-step").value };
    const trio = article.querySelector(".trio");
    for (const [row, name] of ROWS) {
      const step = steps[row] ? ` (step ${steps[row]})` : "";
      trio.append(rowCard(row, row === "dreamblend" ? name : `${name}${step}`, images[row], attention, scales));
    }
    const curve = attention.attention_distance_steps || [];
    const drawn = drawCurve(article.querySelector(".curve-plot"), curve);
    const mean = result.attention_distance[k];
    article.querySelector(".curve-caption").textContent = drawn
      ? `attention distance E→G over the ${curve.length} guided steps` + (mean == null ? "" : ` (mean ${mean.toPrecision(3)})`)
      : "no attention distance measured (window K = 0)";
    return article;
  }

  function renderResult(result) {
    const results = $("results");
    results.replaceChildren();
    if (!Array.isArray(result.attention)) {
      results.append(...result.images.map((b, k) => pngImage(b, `image ${k}`)));
      return;
    }
    result.attention.forEach((_, k) => results.append(renderSample(result, k)));
  }

  // ------------------------------------------------------------------ wiring

  function useKey(event) {
    event.preventDefault();
    apiKey = $("api-key").value.trim();
    nextCursor = null;
    loadSubjects(false);
    statusPoll.stopped = false;
    refreshStatus();
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("key-form").addEventListener("submit", useKey);
    $("more-subjects").addEventListener("click", () => loadSubjects(true));
    $("subject").addEventListener("change", (e) => chooseSubject(e.target.value));
    $("generate-form").addEventListener("submit", generate);
    $("upload-form").addEventListener("submit", upload);
    $("delete-subject").addEventListener("click", () => deleteSubject($("subject").value));
    document.addEventListener("visibilitychange", () => {
      if (document.visibilityState === "visible") refreshStatus(); else scheduleStatus(); // hidden: no polling
    });
    loadSubjects(false, true); // works as is when auth is off; else shows the 401 until a key is given
    refreshStatus();
  });
})();
