// clipsearch web page: a thin client of the JSON API (/openapi.json). No build step, no outside requests.
"use strict";

const PAGE = 48;
const $ = (id) => document.getElementById(id);
const state = { source: null, offset: 0, info: null, uploadUrl: null, uploadFile: null, current: null };

// ------------------------------------------------------------------------------------------------------------ API
async function api(path, params, options = {}) {
  const query = params ? `?${params}` : "";
  const response = await fetch(`${path}${query}`, options);
  const body = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

// The filters panel, as query parameters of /api/search, /api/images/{id}/similar and /api/upload.
function filterParams() {
  const params = new URLSearchParams();
  const add = (name, id) => { const value = $(id).value.trim(); if (value) params.append(name, value); };
  add("under", "f-under");
  add("after", "f-after");
  add("before", "f-before");
  add("type", "f-type");
  add("threshold", "f-threshold");
  add("not", "f-not");
  return params;
}

// -------------------------------------------------------------------------------------------------------- status
function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function plural(n, word) { return `${n} ${word}${n === 1 ? "" : "s"}`; }

// ------------------------------------------------------------------------------------------------------- results
function clearResults() {
  $("grid").replaceChildren();
  $("caption-results").replaceChildren();
  $("caption-results").hidden = true;
  $("more").hidden = true;
}

function card(hit) {
  const item = document.createElement("li");
  item.className = "card";
  item.dataset.id = hit.id;
  const button = document.createElement("button");
  button.type = "button";
  button.title = hit.path;
  const img = document.createElement("img");
  img.src = hit.thumbnail;
  img.alt = hit.name;
  img.loading = "lazy";
  img.decoding = "async";
  img.addEventListener("error", () => item.classList.add("broken"), { once: true });
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = hit.score === null ? "" : hit.score.toFixed(3);
  const name = document.createElement("span");
  name.className = "name";
  name.textContent = hit.name;
  button.append(img, score, name);
  button.addEventListener("click", () => openDetail(hit.id));
  item.append(button);
  return item;
}

function renderImages(hits, append) {
  if (!append) clearResults();
  $("grid").append(...hits.map(card));
}

function captionItem(hit) {
  const item = document.createElement("li");
  const text = document.createElement("span");
  text.className = "text";
  text.textContent = hit.text;
  item.append(text);
  const meta = document.createElement("span");
  meta.className = "meta";
  meta.textContent = [hit.score === null || hit.score === undefined ? null : hit.score.toFixed(3), hit.collection]
    .filter(Boolean).join(" · ");
  item.append(meta);
  if (hit.image_id) {
    const link = document.createElement("button");
    link.type = "button";
    link.className = "link";
    link.textContent = "its image";
    link.addEventListener("click", () => openDetail(hit.image_id));
    item.append(link);
  }
  return item;
}

function renderCaptions(list, hits) {
  list.replaceChildren(...hits.map(captionItem));
}

// -------------------------------------------------------------------------------------------------------- search
async function load(append = false) {
  const source = state.source;
  if (!source) return;
  const params = filterParams();
  params.set("k", PAGE);
  params.set("offset", state.offset);
  let path = "/api/search";
  if (source.kind === "search") {
    params.set("q", source.q);
  } else if (params.has("not")) {
    params.set("q", `#${source.id}`); // more like this, pushed away from the "Not" part: a mixed query
  } else {
    path = `/api/images/${source.id}/similar`;
  }
  const started = performance.now();
  setStatus(append ? "Loading more…" : "Searching…");
  try {
    const result = await api(path, params);
    if (state.source !== source) return; // a newer search started meanwhile
    renderImages(result.hits, append);
    $("more").hidden = !result.more;
    const shown = $("grid").children.length;
    const seconds = ((performance.now() - started) / 1000).toFixed(2);
    const what = source.kind === "similar" ? `like #${source.id}` : `for ${source.q}`;
    setStatus(shown ? `${plural(shown, "photo")} ${what}, best first (${seconds} s)` : `No photos ${what}`);
  } catch (error) {
    if (state.source === source) setStatus(error.message, true);
  }
}

async function searchCaptions(q) {
  const params = new URLSearchParams({ q, k: 30 });
  for (const name of ["not", "threshold"]) {
    const value = filterParams().get(name);
    if (value) params.set(name, value);
  }
  setStatus("Searching captions…");
  try {
    const result = await api("/api/captions", params);
    clearResults();
    renderCaptions($("caption-results"), result.hits);
    $("caption-results").hidden = false;
    setStatus(result.available ? `${plural(result.hits.length, "caption")} for ${q}`
      : "This index holds no captions yet: add some with `clipsearch captions add FILE`");
  } catch (error) {
    setStatus(error.message, true);
  }
}

function start(source) {
  state.source = source;
  state.offset = 0;
  $("upload-panel").hidden = true;
  load(false);
}

function submit(event) {
  if (event) event.preventDefault();
  const q = $("q").value.trim();
  const url = new URL(location.href);
  url.search = q ? `?q=${encodeURIComponent(q)}` : "";
  history.replaceState(null, "", url);
  if (!q) { setStatus("Type what you are looking for"); return; }
  if ($("mode").value === "captions") {
    state.source = null;
    $("upload-panel").hidden = true;
    searchCaptions(q);
    return;
  }
  const similar = /^#(\d+)$/.exec(q);
  start(similar ? { kind: "similar", id: Number(similar[1]) } : { kind: "search", q });
}

// -------------------------------------------------------------------------------------------------------- detail
function metaRow(list, term, value) {
  if (value === null || value === undefined || value === "") return;
  const dt = document.createElement("dt");
  dt.textContent = term;
  const dd = document.createElement("dd");
  dd.textContent = value;
  list.append(dt, dd);
}

function megabytes(bytes) { return bytes === null ? null : `${(bytes / 1e6).toFixed(2)} MB`; }

async function openDetail(id) {
  const dialog = $("detail");
  try {
    const image = await api(`/api/images/${id}`);
    state.current = image;
    $("detail-image").src = image.preview;
    $("detail-image").alt = image.name;
    $("detail-name").textContent = image.name;
    $("detail-file").href = image.file;
    const meta = $("detail-meta");
    meta.replaceChildren();
    metaRow(meta, "Path", image.path);
    metaRow(meta, "Size", image.width && `${image.width} × ${image.height} px, ${megabytes(image.size)}`);
    metaRow(meta, "Taken", image.taken);
    metaRow(meta, "Modified", image.modified);
    metaRow(meta, "Format", image.format);
    metaRow(meta, "Id", `#${image.id}`);
    renderCaptions($("detail-linked"), image.captions);
    $("detail-linked-section").hidden = image.captions.length === 0;
    $("detail-nearest").replaceChildren();
    $("detail-nearest-section").hidden = true;
    if (!dialog.open) dialog.showModal();
    if (state.info && state.info.captions) {
      const nearest = await api(`/api/images/${id}/captions`, new URLSearchParams({ k: 5 }));
      if (state.current && state.current.id === id) {
        renderCaptions($("detail-nearest"), nearest.hits);
        $("detail-nearest-section").hidden = nearest.hits.length === 0;
      }
    }
  } catch (error) {
    setStatus(error.message, true);
  }
}

function moreLikeThis() {
  const image = state.current;
  $("detail").close();
  $("mode").value = "images";
  $("q").value = `#${image.id}`;
  submit();
}

function notThis() {
  const image = state.current;
  $("detail").close();
  const q = $("q").value.trim();
  if (q) {
    $("q").value = `${q} - #${image.id}`;
    submit();
  } else if (state.source && state.source.kind === "upload") {
    $("f-not").value = `#${image.id}`; // the "Not" filter holds one part: the uploaded image minus this one
    rerun();
  }
}

// Filters changed: run what is on screen again (the query, or the uploaded image).
function rerun() {
  if (state.source && state.source.kind === "upload") upload(state.uploadFile);
  else if ($("q").value.trim()) submit();
}

// -------------------------------------------------------------------------------------------------------- upload
async function upload(file) {
  if (!file) return;
  const limit = state.info ? state.info.limits.max_upload_bytes : Infinity;
  if (file.size > limit) {
    setStatus(`${file.name} is too large: at most ${Math.round(limit / 2 ** 20)} MB`, true);
    return;
  }
  const source = { kind: "upload", name: file.name };
  $("q").value = "";
  state.source = source;
  state.uploadFile = file;
  state.offset = 0;
  if (state.uploadUrl) URL.revokeObjectURL(state.uploadUrl);
  state.uploadUrl = URL.createObjectURL(file);
  setStatus(`Reading ${file.name}…`);
  const params = filterParams();
  params.set("k", PAGE);
  try {
    const result = await api("/api/upload", params, {
      method: "POST", body: file, headers: { "Content-Type": file.type || "application/octet-stream" },
    });
    if (state.source !== source) return;
    $("upload-preview").src = state.uploadUrl;
    renderCaptions($("upload-captions"), result.captions);
    $("upload-captions").hidden = result.captions.length === 0;
    $("upload-panel").hidden = false;
    renderImages(result.similar, false);
    setStatus(`${plural(result.similar.length, "photo")} like ${file.name} (${result.width} × ${result.height})` +
      (result.captions.length ? `, ${plural(result.captions.length, "nearest caption")}` : ""));
  } catch (error) {
    setStatus(error.message, true);
  }
}

function setUpDrop() {
  let depth = 0;
  const hint = $("drop-hint");
  const hasFiles = (event) => event.dataTransfer && Array.from(event.dataTransfer.types).includes("Files");
  document.addEventListener("dragenter", (event) => {
    if (!hasFiles(event)) return;
    depth += 1;
    hint.hidden = false;
  });
  document.addEventListener("dragleave", () => { depth = Math.max(0, depth - 1); if (!depth) hint.hidden = true; });
  document.addEventListener("dragover", (event) => { if (hasFiles(event)) event.preventDefault(); });
  document.addEventListener("drop", (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    depth = 0;
    hint.hidden = true;
    upload(event.dataTransfer.files[0]);
  });
}

// ----------------------------------------------------------------------------------------------------------- init
async function init() {
  $("search-form").addEventListener("submit", submit);
  $("mode").addEventListener("change", () => { if ($("q").value.trim()) submit(); });
  $("more").addEventListener("click", () => {
    if (!state.source || state.source.kind === "upload") return;
    state.offset = $("grid").children.length;
    load(true);
  });
  $("toggle-filters").addEventListener("click", () => {
    const panel = $("filters");
    panel.hidden = !panel.hidden;
    $("toggle-filters").setAttribute("aria-expanded", String(!panel.hidden));
  });
  $("clear-filters").addEventListener("click", () => {
    for (const input of $("filters").querySelectorAll("input")) input.value = "";
    rerun();
  });
  $("filters").addEventListener("change", rerun);
  $("upload").addEventListener("change", (event) => { upload(event.target.files[0]); event.target.value = ""; });
  $("more-like-this").addEventListener("click", moreLikeThis);
  $("not-this").addEventListener("click", notThis);
  setUpDrop();
  try {
    state.info = await api("/api/info");
    $("roots").replaceChildren(...state.info.roots.map((root) => {
      const option = document.createElement("option");
      option.value = root.path;
      return option;
    }));
    $("mode").querySelector('option[value="captions"]').disabled = !state.info.captions;
    setStatus(`${plural(state.info.images, "photo")}, ${plural(state.info.captions, "caption")} in ` +
      `${state.info.index} (${state.info.model}). Type what you are looking for, or drop an image.`);
  } catch (error) {
    setStatus(error.message, true);
  }
  const q = new URLSearchParams(location.search).get("q");
  if (q) { $("q").value = q; submit(); }
}

init();
