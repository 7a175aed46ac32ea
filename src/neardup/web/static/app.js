// The neardup page: search by image, browse duplicate groups, compare two images. No dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  threshold: null, page: 1, perPage: 25, pages: 1, request: 0, timer: null, loaded: false,
  queryFile: null, queryUrl: null, compareFrom: "search", compared: false,
};

async function api(path, options) {
  const response = await fetch(path, options);
  let body = null;
  try { body = await response.json(); } catch (_) { body = null; }
  if (!response.ok) {
    const reason = body && body.error ? body.error : `${response.status} ${response.statusText}`;
    throw new Error(response.status === 401
      ? "This server needs a token: open the address that `neardup serve` printed (it ends in ?token=…)."
      : reason);
  }
  return body;
}

function showMessage(text) {
  const box = $("message");
  box.textContent = text || "";
  box.hidden = !text;
}

function basename(path) { return path.split(/[\\/]/).pop(); }

function formatBytes(n) {
  if (n == null) return "?";
  const units = ["bytes", "KB", "MB", "GB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "class") node.className = value;
    else if (key in node && typeof value !== "string") node[key] = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function thumb(id, name) {
  return el("img", { src: `/api/images/${id}/thumb`, alt: name, loading: "lazy", width: "160", height: "160" });
}

// ---- views ---------------------------------------------------------------------------------------

function show(view) {
  for (const name of ["search", "duplicates", "compare"]) $(`view-${name}`).hidden = name !== view;
  for (const name of ["search", "duplicates"]) {
    const tab = $(`tab-${name}`);
    if (name === view) tab.setAttribute("aria-current", "page"); else tab.removeAttribute("aria-current");
  }
  if (view === "duplicates" && !state.loaded) loadDuplicates();
}

function route() {
  const view = location.hash.slice(1);
  show(view === "duplicates" ? "duplicates" : view === "compare" && state.compared ? "compare" : "search");
}

async function loadStats() {
  try {
    const stats = await api("/api/stats");
    const model = stats.model ? stats.model.name : "no model yet";
    $("stats").textContent = `${stats.images} images indexed (${stats.failed} failed) · ${model} · ${stats.index}`;
  } catch (error) {
    $("stats").textContent = "";
    showMessage(error.message);
  }
}

// ---- search ----------------------------------------------------------------------------------------

async function search(file) {
  if (!file) return;
  showMessage("");
  state.queryFile = file;
  if (state.queryUrl) URL.revokeObjectURL(state.queryUrl);
  state.queryUrl = URL.createObjectURL(file);
  $("query-image").src = state.queryUrl;
  $("query-image").alt = `Query image ${file.name}`;
  $("query-caption").textContent = `${file.name} · ${formatBytes(file.size)}`;
  $("query").hidden = false;
  const params = new URLSearchParams({ k: $("k").value || "12" });
  if ($("min-score").value !== "") params.set("threshold", $("min-score").value);
  const form = new FormData();
  form.append("file", file, file.name);
  $("search-status").textContent = "Searching…";
  $("results").replaceChildren();
  try {
    const data = await api(`/api/search?${params}`, { method: "POST", body: form });
    renderResults(data.results[0].matches);
  } catch (error) {
    $("search-status").textContent = "";
    showMessage(error.message);
  }
}

function renderResults(matches) {
  $("search-status").textContent = matches.length
    ? `${matches.length} matches, best first. Choose one to compare it with the query.`
    : "No match.";
  const items = matches.map((match, i) => {
    const name = basename(match.path);
    const button = el("button", { type: "button", "aria-label": `Compare ${name} (score ${match.score.toFixed(3)}) with the query` },
      thumb(match.id, name));
    button.addEventListener("click", () => compareWithQuery(match));
    return el("li", { class: "card", "data-rank": String(i + 1) }, button,
      el("p", { class: "score" }, match.score.toFixed(3)),
      el("p", { class: "path", title: match.path }, match.path));
  });
  $("results").replaceChildren(...items);
}

// ---- duplicates ----------------------------------------------------------------------------------

async function loadDuplicates() {
  const request = ++state.request;
  state.loaded = true;
  const params = new URLSearchParams({ page: state.page, per_page: state.perPage });
  if (state.threshold !== null) params.set("threshold", state.threshold);
  $("dups-status").textContent = "Finding groups…";
  try {
    const data = await api(`/api/duplicates?${params}`);
    if (request !== state.request) return; // a newer request (slider moved) is on its way
    if (data.pages > 0 && data.page > data.pages) { state.page = data.pages; return loadDuplicates(); }
    showMessage("");
    state.threshold = data.threshold;
    state.page = data.page;
    state.pages = data.pages;
    $("threshold").value = data.threshold;
    $("threshold-value").textContent = Number(data.threshold).toFixed(2);
    $("page").value = data.page;
    $("page").max = Math.max(1, data.pages);
    $("pages").textContent = Math.max(1, data.pages);
    $("prev").disabled = data.page <= 1;
    $("next").disabled = data.page >= data.pages;
    $("dups-status").textContent = data.total_groups
      ? `${data.total_groups} groups, ${data.total_files} files at threshold ${data.threshold}.`
      : `No duplicates at threshold ${data.threshold}.`;
    $("groups").replaceChildren(...data.groups.map(renderGroup));
  } catch (error) {
    if (request !== state.request) return;
    $("dups-status").textContent = "";
    showMessage(error.message);
  }
}

function renderGroup(group) {
  const selected = [];
  const title = `Group ${group.number}: ${group.images.length} files, score ${group.min_score.toFixed(3)}–${group.max_score.toFixed(3)}`;
  const items = group.images.map((image, i) => {
    const name = basename(image.path);
    const button = el("button", { type: "button", "aria-pressed": "false",
      "aria-label": `Select ${name} for comparison` }, thumb(image.id, name));
    button.addEventListener("click", () => {
      const at = selected.indexOf(image.id);
      if (at >= 0) selected.splice(at, 1); else selected.push(image.id);
      while (selected.length > 2) selected.shift();
      for (const b of list.querySelectorAll("button")) b.setAttribute("aria-pressed", String(selected.includes(Number(b.dataset.id))));
    });
    button.dataset.id = image.id;
    return el("li", {}, button, el("p", { class: "path", title: image.path },
      `${name} · ${image.width}×${image.height} · ${formatBytes(image.bytes)}`));
  });
  const list = el("ul", { class: "strip" }, ...items);
  const compareButton = el("button", { type: "button", class: "compare-button" }, "Compare two");
  compareButton.setAttribute("aria-label", `Compare two images of group ${group.number} (the selected ones, else the first two)`);
  compareButton.addEventListener("click", () => {
    const pair = selected.length === 2 ? selected : group.images.slice(0, 2).map((image) => image.id);
    compareIndexed(pair[0], pair[1]);
  });
  return el("section", { class: "group", "aria-label": title }, el("h3", {}, title), list, compareButton);
}

function scheduleDuplicates() {
  clearTimeout(state.timer);
  state.timer = setTimeout(loadDuplicates, 250);
}

// ---- compare -------------------------------------------------------------------------------------

function details(pairs) {
  const list = el("dl");
  for (const [term, value] of pairs) list.append(el("dt", {}, term), el("dd", {}, value));
  return list;
}

function fillSide(figure, side) {
  const img = figure.querySelector("img");
  img.onerror = side.fallback ? () => { img.onerror = null; img.src = side.fallback; } : null;
  img.src = side.src;
  img.alt = side.name;
  figure.querySelector("figcaption").replaceChildren(el("strong", {}, side.name), details([
    ["Dimensions", side.width ? `${side.width} × ${side.height} px` : "?"],
    ["File size", formatBytes(side.bytes)],
    ["Path", side.path],
  ]));
}

function openCompare(score, a, b) {
  state.compareFrom = location.hash.slice(1) === "duplicates" ? "duplicates" : "search";
  state.compared = true;
  $("compare-score").textContent = `Score (cosine similarity): ${score.toFixed(3)}`;
  fillSide($("compare-a"), a);
  fillSide($("compare-b"), b);
  location.hash = "compare";
  show("compare");
  $("compare-title").tabIndex = -1;
  $("compare-title").focus();
}

function indexedSide(image) {
  return { src: `/api/images/${image.id}`, fallback: `/api/images/${image.id}/thumb`, name: basename(image.path),
           width: image.width, height: image.height, bytes: image.bytes, path: image.path };
}

async function compareIndexed(a, b) {
  try {
    const data = await api(`/api/compare?a=${a}&b=${b}`);
    openCompare(data.score, indexedSide(data.images[0]), indexedSide(data.images[1]));
  } catch (error) { showMessage(error.message); }
}

async function compareWithQuery(match) {
  try {
    const image = await api(`/api/images/${match.id}/info`);
    const preview = $("query-image");
    openCompare(match.score, {
      src: state.queryUrl, name: state.queryFile.name, width: preview.naturalWidth, height: preview.naturalHeight,
      bytes: state.queryFile.size, path: "(your upload; not stored)",
    }, indexedSide(image));
  } catch (error) { showMessage(error.message); }
}

// ---- wiring --------------------------------------------------------------------------------------

function wire() {
  const drop = $("drop");
  $("file").addEventListener("change", (event) => {
    const file = event.target.files[0];
    event.target.value = ""; // so that choosing the same file again searches again
    search(file);
  });
  for (const name of ["dragenter", "dragover"]) drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.add("over"); });
  for (const name of ["dragleave", "drop"]) drop.addEventListener(name, () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => { event.preventDefault(); search(event.dataTransfer.files[0]); });
  document.addEventListener("dragover", (event) => event.preventDefault()); // a missed drop must not navigate away
  document.addEventListener("drop", (event) => event.preventDefault());
  $("search-form").addEventListener("submit", (event) => event.preventDefault());
  for (const id of ["k", "min-score"]) $(id).addEventListener("change", () => state.queryFile && search(state.queryFile));

  $("threshold").addEventListener("input", (event) => {
    state.threshold = Number(event.target.value);
    state.page = 1;
    $("threshold-value").textContent = state.threshold.toFixed(2);
    scheduleDuplicates();
  });
  $("per-page").addEventListener("change", (event) => { state.perPage = Number(event.target.value); state.page = 1; loadDuplicates(); });
  $("prev").addEventListener("click", () => { state.page = Math.max(1, state.page - 1); loadDuplicates(); });
  $("next").addEventListener("click", () => { state.page = Math.min(state.pages, state.page + 1); loadDuplicates(); });
  $("page").addEventListener("change", (event) => {
    state.page = Math.min(Math.max(1, Number(event.target.value) || 1), Math.max(1, state.pages));
    loadDuplicates();
  });
  $("compare-back").addEventListener("click", () => { location.hash = state.compareFrom; });
  window.addEventListener("hashchange", route);
}

wire();
route();
loadStats();
