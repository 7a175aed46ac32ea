// The neardup page: search by image, browse duplicate groups, compare two images, and (with
// `neardup serve --allow-actions`) preview, apply and undo a clean-up of the groups. No dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  threshold: null, page: 1, perPage: 25, pages: 1, request: 0, timer: null, loaded: false,
  queryFile: null, queryUrl: null, compareFrom: "search", compared: false, groups: [],
  actionsEnabled: false, plan: null, planId: null, planRequest: 0, exclude: new Set(), busy: false,
};
const LEFT_OUT = "left out on request (unchecked on the page)"; // the reason actions_api gives excluded files

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
  for (const name of ["search", "duplicates", "actions", "compare"]) $(`view-${name}`).hidden = name !== view;
  for (const name of ["search", "duplicates", "actions"]) {
    const tab = $(`tab-${name}`);
    if (name === view) tab.setAttribute("aria-current", "page"); else tab.removeAttribute("aria-current");
  }
  if (view === "duplicates" && !state.loaded) loadDuplicates();
  if (view === "actions") loadRuns();
}

function route() {
  const view = location.hash.slice(1);
  show(["duplicates", "actions"].includes(view) ? view : view === "compare" && state.compared ? "compare" : "search");
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
    state.groups = data.groups;
    $("groups").replaceChildren(...data.groups.map(renderGroup));
    decorateGroups();
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
    const item = el("li", {}, button, el("p", { class: "path", title: image.path },
      `${name} · ${image.width}×${image.height} · ${formatBytes(image.bytes)}`));
    item.dataset.path = image.path;
    if (state.actionsEnabled) item.append(...cleanupControls(image, name));
    return item;
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
  state.request++; // an answer still on its way is for the old threshold: it must not reset the slider
  clearTimeout(state.timer);
  state.timer = setTimeout(loadDuplicates, 250);
}

// ---- clean up (`neardup serve --allow-actions`) ---------------------------------------------------

const VERBS = { move: ["move", "Moved"], hardlink: ["hard-link", "Hard-linked"], delete: ["delete", "Deleted (into the trash)"] };

async function postJson(path, body) {
  return api(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
}

async function loadActionsState() {
  try {
    const data = await api("/api/actions");
    state.actionsEnabled = data.enabled;
  } catch (_) {
    state.actionsEnabled = false; // the stats line reports a server that cannot be reached
  }
  $("cleanup").hidden = !state.actionsEnabled;
  if (state.actionsEnabled && state.groups.length) $("groups").replaceChildren(...state.groups.map(renderGroup));
  decorateGroups();
}

// A checkbox per file (checked: the clean-up may act on it), a "kept" mark and a line saying what the
// plan does with it. Updated in place by decorateGroups, so focus stays on the checkbox just used.
function cleanupControls(image, name) {
  const box = el("input", { type: "checkbox", checked: !state.exclude.has(image.id) });
  box.dataset.id = image.id;
  box.addEventListener("change", () => {
    if (box.checked) state.exclude.delete(image.id); else state.exclude.add(image.id);
    if (state.plan) preview(); // the plan shown must be the plan applied: make it again
  });
  return [
    el("label", { class: "include" }, box, ` Include ${name} in the clean-up`),
    el("p", { class: "kept", hidden: true }, "Kept (this group's survivor)"),
    el("p", { class: "plan-note", hidden: true }),
  ];
}

function decorateGroups() {
  const plan = state.plan;
  const entries = new Map(plan ? plan.entries.map((e) => [e.source, e]) : []);
  const kept = new Set(plan ? plan.entries.map((e) => e.survivor) : []);
  for (const item of $("groups").querySelectorAll("li[data-path]")) {
    const include = item.querySelector(".include");
    if (!include) continue;
    const path = item.dataset.path;
    const entry = entries.get(path);
    const isKept = kept.has(path) && !entry;
    include.hidden = isKept;
    item.classList.toggle("survivor", isKept);
    item.querySelector(".kept").hidden = !isKept;
    const note = item.querySelector(".plan-note");
    note.hidden = !entry;
    if (!entry) continue;
    note.classList.toggle("skipped", entry.status === "skipped");
    if (entry.status === "skipped") note.textContent = entry.reason === LEFT_OUT ? "Left out" : `Skipped: ${entry.reason}`;
    else if (entry.action === "hardlink") note.textContent = `Becomes a hard link to ${basename(entry.survivor)}`;
    else if (entry.action === "delete") note.textContent = "Goes to the trash";
    else note.textContent = `Moves to ${entry.destination}`;
  }
}

function planBody() {
  const body = { action: $("action").value, keep: $("keep").value, exclude: [...state.exclude],
    keep_in: $("keep-in").value.split("\n").map((line) => line.trim()).filter(Boolean) };
  if (state.threshold !== null) body.threshold = state.threshold;
  if (body.action === "move") body.to = $("move-to").value.trim();
  return body;
}

function planned() { return state.plan ? state.plan.entries.filter((e) => e.status === "planned") : []; }

function summary(manifest) {
  const acted = manifest.entries.filter((e) => e.status === "planned" || e.status === "done");
  const skipped = manifest.entries.length - acted.length;
  const size = (acted.reduce((n, e) => n + e.size, 0) / 1e6).toFixed(1);
  const groups = new Set(manifest.entries.map((e) => e.group)).size;
  const [verb, past] = VERBS[manifest.action];
  return manifest.state === "planned"
    ? `Would ${verb} ${acted.length} files (${size} MB), skip ${skipped}, in ${groups} groups.`
    : `${past} ${acted.length} files (${size} MB), skipped ${skipped}.`;
}

async function preview() {
  const request = ++state.planRequest;
  $("apply").disabled = true;
  $("plan-status").textContent = "Making the plan (every file is checked against the index)…";
  try {
    const data = await postJson("/api/actions/plan", planBody());
    if (request !== state.planRequest) return; // a newer preview is on its way
    showMessage("");
    state.plan = data.manifest;
    state.planId = data.plan_id;
    $("plan-status").textContent = `${summary(data.manifest)} Nothing has changed yet.`;
    renderPlan(data.manifest);
    $("apply").disabled = planned().length === 0 || state.busy;
  } catch (error) {
    if (request !== state.planRequest) return;
    state.plan = null;
    $("plan-status").textContent = "";
    $("plan-details").hidden = true;
    showMessage(error.message);
  }
  decorateGroups();
}

const MAX_PLAN_LINES = 2000;

function renderPlan(manifest) {
  const [verb] = VERBS[manifest.action];
  const byGroup = new Map();
  for (const entry of manifest.entries) {
    if (!byGroup.has(entry.group)) byGroup.set(entry.group, []);
    byGroup.get(entry.group).push(entry);
  }
  let lines = 0;
  const items = [];
  for (const [group, entries] of byGroup) {
    if (lines >= MAX_PLAN_LINES) break;
    const steps = entries.slice(0, MAX_PLAN_LINES - lines).map((e) => {
      lines++;
      if (e.status === "skipped") return el("li", { class: "skipped" }, "skip ", el("code", {}, e.source), `: ${e.reason}`);
      const target = e.action === "hardlink" ? e.survivor : e.destination;
      return el("li", {}, `${verb} `, el("code", {}, e.source), " → ", el("code", {}, target));
    });
    items.push(el("li", {}, el("p", {}, `Group ${group}: keep `, el("code", {}, entries[0].survivor)), el("ul", {}, ...steps)));
  }
  if (lines < manifest.entries.length) {
    items.push(el("li", { class: "hint" }, `… and ${manifest.entries.length - lines} more steps (the manifest lists them all).`));
  }
  $("plan-list").replaceChildren(...items);
  $("plan-details").hidden = manifest.entries.length === 0;
}

function forgetPlan() {
  if (!state.plan) return;
  state.plan = null;
  state.planRequest++;
  $("apply").disabled = true;
  $("plan-details").hidden = true;
  $("plan-status").textContent = "The settings changed: preview again before applying.";
  decorateGroups();
}

function openConfirm() {
  const plan = state.plan;
  const count = planned().length;
  if (!plan || !count) return;
  const text = {
    move: `Move ${count} files to ${plan.to}?`,
    hardlink: `Replace ${count} files by hard links to their group's kept file? Their own bytes are kept in the index's trash.`,
    delete: `Move ${count} files into the index's trash (${plan.trash})?`,
  }[plan.action];
  $("confirm-text").textContent = `${text} Skipped files are not touched; Undo puts everything back.`;
  const typed = plan.action === "delete";
  $("confirm-count-field").hidden = !typed;
  $("confirm-count-expected").textContent = String(count);
  $("confirm-count").value = "";
  $("confirm-apply").disabled = typed;
  $("confirm").showModal();
  (typed ? $("confirm-count") : $("confirm-cancel")).focus();
}

async function applyPlan() {
  const planId = state.planId;
  state.busy = true;
  $("apply").disabled = true;
  $("preview").disabled = true;
  $("plan-status").textContent = "Applying…";
  try {
    const run = await postJson("/api/actions/apply", { plan_id: planId, confirm: true });
    showMessage("");
    state.plan = null;
    state.exclude.clear();
    $("plan-details").hidden = true;
    $("plan-status").textContent = "";
    showResult(run, summary(run.manifest));
    state.loaded = false;
    loadDuplicates(); // the index changed
  } catch (error) {
    $("plan-status").textContent = "Not applied.";
    showMessage(error.message);
  } finally {
    state.busy = false;
    $("preview").disabled = false;
  }
}

function showResult(run, text) {
  const heading = el("p", { class: "result-title", tabindex: "-1" }, text);
  const undo = el("button", { type: "button", class: "undo" }, "Undo");
  undo.setAttribute("aria-label", `Undo run ${run.run_id}`);
  undo.disabled = !run.manifest.entries.some((e) => e.status === "done");
  undo.addEventListener("click", () => undoRun(run.run_id, (message) => {
    $("result").replaceChildren(el("p", { class: "result-title", tabindex: "-1" }, message));
    $("result").firstChild.focus();
  }));
  $("result").replaceChildren(heading,
    el("p", {}, "Manifest: ", el("code", { class: "manifest-path" }, run.manifest_path)),
    el("p", { class: "hint" }, "From a terminal: ", el("code", {}, `neardup undo ${run.manifest_path}`)), undo);
  $("result").hidden = false;
  heading.focus();
}

async function undoRun(runId, done) {
  try {
    const run = await postJson("/api/actions/undo", { run_id: runId });
    showMessage("");
    const back = run.manifest.entries.filter((e) => e.status === "undone").length;
    done(`Run ${runId} undone: ${back} files are back in place.`);
    state.loaded = false;
    if (!$("view-duplicates").hidden) loadDuplicates();
    if (!$("view-actions").hidden) loadRuns();
  } catch (error) {
    showMessage(error.message);
  }
}

// ---- actions view ----------------------------------------------------------------------------------

async function loadRuns(message) {
  const status = $("actions-status");
  if (!message) status.textContent = "Loading past runs…";
  try {
    const data = await api("/api/actions");
    state.actionsEnabled = data.enabled;
    const rows = data.runs.map((run) => {
      const counts = Object.entries(run.counts).map(([name, n]) => `${n} ${name}`).join(", ") || "none";
      const undo = el("button", { type: "button" }, "Undo");
      undo.setAttribute("aria-label", `Undo run ${run.run_id}`);
      undo.disabled = !data.enabled || !run.counts.done;
      undo.addEventListener("click", () => undoRun(run.run_id, (text) => {
        loadRuns(text);
        status.focus();
      }));
      return el("tr", {}, el("td", {}, el("code", { title: run.manifest_path }, run.run_id)), el("td", {}, run.action),
        el("td", {}, run.created.replace("T", " ").replace("+00:00", "")), el("td", { class: "state" }, run.state),
        el("td", {}, counts), el("td", {}, undo));
    });
    $("runs-body").replaceChildren(...rows);
    $("runs").hidden = rows.length === 0;
    const off = data.enabled ? "" : " Actions are off: start the server with `neardup serve --allow-actions` to apply or undo from this page.";
    status.textContent = (message ? `${message} ` : "") +
      (rows.length ? `${rows.length} runs, newest first.` : "No runs yet.") + off;
  } catch (error) {
    status.textContent = "";
    showMessage(error.message);
  }
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

  $("cleanup-form").addEventListener("submit", (event) => { event.preventDefault(); preview(); });
  $("action").addEventListener("change", () => { $("move-to-field").hidden = $("action").value !== "move"; forgetPlan(); });
  for (const id of ["keep", "keep-in", "move-to"]) $(id).addEventListener("input", forgetPlan);
  $("threshold").addEventListener("input", forgetPlan);
  $("apply").addEventListener("click", openConfirm);
  $("confirm-count").addEventListener("input", () => {
    $("confirm-apply").disabled = $("confirm-count").value.trim() !== $("confirm-count-expected").textContent;
  });
  $("confirm-cancel").addEventListener("click", () => $("confirm").close());
  $("confirm-form").addEventListener("submit", (event) => {
    event.preventDefault();
    if ($("confirm-apply").disabled) return;
    $("confirm").close();
    applyPlan();
  });
  window.addEventListener("hashchange", route);
}

wire();
route();
loadStats();
loadActionsState();
