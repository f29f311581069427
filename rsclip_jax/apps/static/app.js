// rsclip search page: asks the JSON API of rsclip_jax/apps/serve.py and draws the results.
// Plain browser JavaScript, no libraries, so the page works offline.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const state = { info: null, hits: [], selected: null };
const $ = (id) => document.getElementById(id);

function setStatus(text, isError = false) {
  const el = $("status");
  el.textContent = text;
  el.classList.toggle("error", isError);
}

// The API answers errors as {"detail": "..."} (or FastAPI's list of validation errors).
async function errorText(response) {
  try {
    const body = await response.json();
    if (typeof body.detail === "string") return body.detail;
    if (Array.isArray(body.detail)) return body.detail.map((d) => `${(d.loc || []).slice(-1)[0]}: ${d.msg}`).join("; ");
  } catch (e) { /* not JSON */ }
  return `${response.status} ${response.statusText}`;
}

async function loadInfo() {
  const response = await fetch("/api/info");
  if (!response.ok) { setStatus(await errorText(response), true); return; }
  state.info = await response.json();
  const mb = (state.info.max_upload_bytes / 2 ** 20).toFixed(0);
  $("info").textContent = `${state.info.count} items in ${state.info.root} · uploads up to ${mb} MB`;
  $("k").max = state.info.max_k;
  drawMap();
}

async function search(form, described) {
  setStatus(`searching ${described}…`);
  $("search-button").disabled = true;
  try {
    const response = await fetch("/api/search", { method: "POST", body: form });
    if (!response.ok) { setStatus(await errorText(response), true); return; }
    const result = await response.json();
    state.hits = result.hits;
    state.selected = null;
    $("download-geojson").href = result.downloads.geojson;
    $("download-csv").href = result.downloads.csv;
    $("downloads").hidden = result.hits.length === 0;
    setStatus(`${result.count} hits for ${result.described} (${result.seconds.toFixed(2)} s)`);
    renderResults();
    drawMap();
  } catch (e) {
    setStatus(`the server did not answer: ${e}`, true);
  } finally {
    $("search-button").disabled = false;
  }
}

function queryForm() {
  const form = new FormData();
  const text = $("text").value.trim();
  const file = $("image").files[0];
  if (text) form.append("text", text);
  if (file) form.append("image", file, file.name);
  for (const phrase of $("negative").value.split(";")) {
    if (phrase.trim()) form.append("negative_text", phrase.trim());
  }
  form.append("k", $("k").value || "50");
  const described = [text && `"${text}"`, file && `image ${file.name}`].filter(Boolean).join(", ");
  return { form, described, empty: !text && !file };
}

function moreLikeThis(hit) {
  const form = new FormData();
  form.append("similar_to", String(hit.id));
  form.append("k", $("k").value || "50");
  $("viewer").close();
  search(form, `more like #${hit.id} (${hit.relpath})`);
}

function hitLabel(hit) {
  const where = hit.window ? ` [${hit.window[0]},${hit.window[1]} ${hit.window[2]}×${hit.window[3]}]` : "";
  return `${hit.relpath}${where}`;
}

function renderResults() {
  const grid = $("results");
  grid.replaceChildren();
  for (const hit of state.hits) {
    const card = document.createElement("figure");
    card.className = "hit";
    card.dataset.id = hit.id;
    const img = document.createElement("img");
    img.className = "thumb";
    img.src = hit.thumb;
    img.alt = hitLabel(hit);
    img.loading = "lazy";
    img.addEventListener("click", () => openViewer(hit));
    const caption = document.createElement("figcaption");
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = `#${hit.rank} · ${hit.score.toFixed(4)}`;
    const path = document.createElement("span");
    path.className = "path";
    path.textContent = hitLabel(hit);
    path.title = hit.path;
    const more = document.createElement("button");
    more.type = "button";
    more.className = "similar";
    more.textContent = "more like this";
    more.addEventListener("click", () => moreLikeThis(hit));
    caption.append(score, path, more);
    card.append(img, caption);
    card.addEventListener("mouseenter", () => highlight(hit.id));
    card.addEventListener("mouseleave", () => highlight(null));
    grid.append(card);
  }
}

function highlight(id) {
  state.selected = id;
  for (const el of document.querySelectorAll("[data-id]")) {
    el.classList.toggle("selected", id !== null && el.dataset.id === String(id));
  }
}

function openViewer(hit) {
  const dialog = $("viewer");
  $("viewer-title").textContent = `#${hit.rank} · score ${hit.score.toFixed(4)}`;
  $("viewer-img").src = hit.tile;
  $("viewer-img").alt = hitLabel(hit);
  const meta = [hitLabel(hit)];
  if (hit.date) meta.push(`date ${hit.date}`);
  if (hit.crs) meta.push(hit.crs);
  $("viewer-meta").textContent = meta.join(" · ");
  $("viewer-open").href = hit.tile;
  $("viewer-file").hidden = !hit.file;
  if (hit.file) $("viewer-file").href = hit.file;
  $("viewer-similar").onclick = () => moreLikeThis(hit);
  dialog.showModal();
}

// The map: an equirectangular view of the archive's lon/lat extent (x scaled by cos(latitude) so
// shapes keep their proportions), with the hits' footprints drawn on it.
function mapExtent() {
  let extent = state.info && state.info.extent_lonlat;
  if (!extent) {
    const points = state.hits.flatMap((h) => h.footprint_lonlat || []);
    if (points.length === 0) return null;
    const lons = points.map((p) => p[0]);
    const lats = points.map((p) => p[1]);
    extent = [Math.min(...lons), Math.min(...lats), Math.max(...lons), Math.max(...lats)];
  }
  return extent;
}

function drawMap() {
  const svg = $("map");
  svg.replaceChildren();
  const extent = mapExtent();
  if (!extent) {
    svg.classList.add("empty");
    $("map-note").textContent = "no georeferenced footprints in this index (plain images have none)";
    return;
  }
  svg.classList.remove("empty");
  const [west, south, east, north] = extent;
  const kx = Math.cos(((south + north) / 2) * Math.PI / 180);
  const pad = Math.max((east - west) * kx, north - south, 1e-6) * 0.05;
  const x0 = west * kx - pad, y0 = -north - pad;
  const w = (east - west) * kx + 2 * pad, h = (north - south) + 2 * pad;
  svg.setAttribute("viewBox", `${x0} ${y0} ${w} ${h}`);
  svg.setAttribute("preserveAspectRatio", "xMidYMid meet");

  const frame = document.createElementNS(SVG_NS, "rect");
  frame.setAttribute("class", "extent");
  frame.setAttribute("x", west * kx);
  frame.setAttribute("y", -north);
  frame.setAttribute("width", Math.max((east - west) * kx, 1e-9));
  frame.setAttribute("height", Math.max(north - south, 1e-9));
  svg.append(frame);

  let drawn = 0;
  // Lowest rank last, so the best hits are drawn on top.
  for (const hit of [...state.hits].reverse()) {
    if (!hit.footprint_lonlat || hit.footprint_lonlat.length < 3) continue;
    const polygon = document.createElementNS(SVG_NS, "polygon");
    polygon.setAttribute("points", hit.footprint_lonlat.map(([lon, lat]) => `${lon * kx},${-lat}`).join(" "));
    polygon.setAttribute("class", hit.rank <= 5 ? "footprint top" : "footprint");
    polygon.dataset.id = hit.id;
    const title = document.createElementNS(SVG_NS, "title");
    title.textContent = `#${hit.rank} ${hitLabel(hit)} (${hit.score.toFixed(4)})`;
    polygon.append(title);
    polygon.addEventListener("click", () => openViewer(hit));
    polygon.addEventListener("mouseenter", () => highlight(hit.id));
    polygon.addEventListener("mouseleave", () => highlight(null));
    svg.append(polygon);
    drawn += 1;
  }
  const fmt = (v) => v.toFixed(4);
  $("map-note").textContent = `extent lon ${fmt(west)}…${fmt(east)}, lat ${fmt(south)}…${fmt(north)}` +
    (state.hits.length ? ` · ${drawn} of ${state.hits.length} hits have a footprint` : "");
}

function init() {
  $("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const { form, described, empty } = queryForm();
    if (empty) { setStatus("type a text or choose an image to search", true); return; }
    const file = $("image").files[0];
    const limit = state.info ? state.info.max_upload_bytes : Infinity;
    if (file && file.size > limit) {
      // The server would answer 413 too; saying it here spares sending the file.
      setStatus(`${file.name} is ${(file.size / 2 ** 20).toFixed(1)} MB: uploads are limited to ` +
                `${(limit / 2 ** 20).toFixed(1)} MB (rsclip serve --max-upload-mb)`, true);
      return;
    }
    search(form, described);
  });
  $("image").addEventListener("change", () => { $("clear-image").hidden = !$("image").files.length; });
  $("clear-image").addEventListener("click", () => { $("image").value = ""; $("clear-image").hidden = true; });
  $("viewer-close").addEventListener("click", () => $("viewer").close());
  $("viewer").addEventListener("click", (event) => { if (event.target === $("viewer")) $("viewer").close(); });
  loadInfo();
}

document.addEventListener("DOMContentLoaded", init);
