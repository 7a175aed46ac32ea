// The neardup page: search by image, browse duplicate groups, compare two images, and (with
// `neardup serve --allow-actions`) preview, apply and undo a clean-up of the groups. No dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  threshold: null, page: 1, perPage: 25, pages: 1, request: 0, timer: null, loaded: false,
  queryFile: null, queryUrl: null, compareFrom: "search", compared: false, groups: [], lastMatches: null,
  actionsEnabled: false, plan: null, planId: null, planRequest: 0, exclude: new Set(), busy: false,
  scoreName: null, dupsThreshold: 0.97, storeKey: null, saved: {},
};
const LEFT_OUT = "left out on request (unchecked on the page)"; // the reason actions_api gives excluded files
// what each survivor criterion (actions.KEEP_CRITERIA) means, in the page's words
const CRITERIA = {
  shape: "the usual shape (not stretched or framed)", central: "the most typical copy", pixels: "most pixels",
  size: "largest file", oldest: "oldest", newest: "newest", "shortest-path": "shortest path",
};
const KEEP_PRESETS = ["pixels,size,oldest", "pixels,oldest", "pixels,size,newest", "oldest,pixels", "newest,pixels",
  "size,pixels", "shortest-path,pixels,size"];

async function api(path, options) {
  const response = await fetch(path, options);
  let body = null;
  try { body = await response.json(); } catch (_) { body = null; }
  if (!response.ok) {
    const reason = body && body.error ? body.error : `${response.status} ${response.statusText}`;
    const error = new Error(response.status === 401
      ? "This server needs a token: open the address that `neardup serve` printed (it ends in ?token=…)."
      : reason);
    error.field = body && body.field ? body.field : null;
    error.status = response.status;
    throw error;
  }
  return body;
}

// ---- what the page remembers across a refresh (per index, in this browser's local storage) ----------

function remember(part, value) {
  state.saved[part] = value;
  if (!state.storeKey) return;
  try { localStorage.setItem(state.storeKey, JSON.stringify(state.saved)); } catch (_) { /* storage off: no memory */ }
}

function recall(indexPath) {
  state.storeKey = `neardup:${indexPath}`;
  try { state.saved = JSON.parse(localStorage.getItem(state.storeKey) || "{}") || {}; } catch (_) { state.saved = {}; }
  state.exclude = new Set(Array.isArray(state.saved.exclude) ? state.saved.exclude : []);
  // copy probabilities since issue 22 (the older "threshold" entry held raw scores: not reused)
  if (typeof state.saved.copyThreshold === "number") state.threshold = state.saved.copyThreshold;
}

function saveForm() {
  remember("form", { action: $("action").value, to: $("move-to").value, keep: $("keep").value, keepIn: $("keep-in").value });
}

function restoreForm() {
  const form = state.saved.form;
  if (!form) return;
  if (form.action && [...$("action").options].some((o) => o.value === form.action)) $("action").value = form.action;
  if (typeof form.to === "string") $("move-to").value = form.to;
  if (form.keep && [...$("keep").options].some((o) => o.value === form.keep)) $("keep").value = form.keep;
  if (typeof form.keepIn === "string") $("keep-in").value = form.keepIn;
  $("move-to-field").hidden = $("action").value !== "move";
}

function saveExclude() {
  remember("exclude", [...state.exclude]);
  const n = state.exclude.size;
  $("left-out").hidden = n === 0;
  $("left-out-text").textContent = `${n} ${n === 1 ? "file is" : "files are"} left out of the clean-up by you (remembered in this browser). `;
}

// ---- scores: the words the CLI and the API use -----------------------------------------------------

function scoreText(value) { return value == null ? "–" : Number(value).toFixed(3); }

function scoreNameNow() { return state.scoreName || "copy probability"; }

function cutOff() { return state.threshold !== null ? state.threshold : state.dupsThreshold; }

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
    recall(stats.index);
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
    if (data.score_name) state.scoreName = data.score_name;
    if (typeof data.dups_threshold === "number") state.dupsThreshold = data.dups_threshold;
    state.lastMatches = data.results[0].matches;
    renderResults(state.lastMatches);
  } catch (error) {
    $("search-status").textContent = "";
    showMessage(error.message);
  }
}

function isCopy(match) { return match.dups_score != null && match.dups_score >= cutOff() - 1e-9; }

function renderResults(matches) {
  const name = scoreNameNow();
  const threshold = cutOff().toFixed(3);
  $("search-status").textContent = matches.length
    ? `${matches.length} matches, best first. Choose one to compare it with the query.`
    : "No match.";
  $("search-help").hidden = !matches.length;
  $("search-help").textContent = `A match is a copy when its ${name} reaches ${threshold}, the threshold \`dups\` ` +
    "groups duplicates by; below that line it is not a copy, only the nearest other photos.";
  // the copies first (by cosine, as found), then one line where they stop, then the rest: the collection-aware
  // score is not in cosine order, so a copy is never shown below the line
  const ranked = [...matches.filter(isCopy), ...matches.filter((m) => !isCopy(m))];
  const items = [];
  let marked = false;
  ranked.forEach((match) => {
    const i = matches.indexOf(match);
    const copy = isCopy(match);
    if (!copy && !marked) {
      marked = true;
      items.push(el("li", { class: "cutoff", role: "separator" },
        `Copies stop here (${name} ${threshold}, the dups threshold): below, not a copy`));
    }
    const file = basename(match.path);
    const shown = `${name} ${scoreText(match.dups_score)}, cosine ${scoreText(match.score)}`;
    const button = el("button", { type: "button", "aria-label": `Compare ${file} (${shown}) with the query` },
      thumb(match.id, file));
    button.addEventListener("click", () => compareWithQuery(match));
    const score = el("p", { class: "score", "data-cosine": String(match.score), "data-probability": String(match.dups_score) },
      `${name} ${scoreText(match.dups_score)}`);
    const parts = [button, score, el("p", { class: "cosine" }, `cosine ${scoreText(match.score)}`)];
    parts.push(el("p", { class: copy ? "verdict copy" : "verdict" }, copy ? "A copy" : "Not a copy"));
    parts.push(el("p", { class: "path", title: match.path }, match.path));
    items.push(el("li", { class: copy ? "card" : "card not-copy", "data-rank": String(i + 1) }, ...parts));
  });
  $("results").replaceChildren(...items);
}

// ---- duplicates ----------------------------------------------------------------------------------

async function loadDuplicates() {
  const request = ++state.request;
  state.loaded = true;
  const params = new URLSearchParams({ page: state.page, per_page: state.perPage, handled: "hide" });
  if (state.threshold !== null) params.set("threshold", state.threshold);
  $("dups-status").textContent = "Finding groups…";
  try {
    const data = await api(`/api/duplicates?${params}`);
    if (request !== state.request) return; // a newer request (slider moved) is on its way
    if (data.pages > 0 && data.page > data.pages) { state.page = data.pages; return loadDuplicates(); }
    showMessage("");
    state.threshold = data.threshold;
    remember("copyThreshold", data.threshold);
    state.page = data.page;
    state.pages = data.pages;
    if (data.score_name) state.scoreName = data.score_name;
    if (data.max_threshold) $("threshold").max = String(data.max_threshold);
    $("threshold-help").textContent = `${scoreNameNow()} a pair needs to be grouped (up to ` +
      `${Number($("threshold").max).toFixed(2)}); higher = stricter`;
    $("threshold").value = data.threshold;
    $("threshold-value").textContent = Number(data.threshold).toFixed(3);
    $("page").value = data.page;
    $("page").max = Math.max(1, data.pages);
    $("pages").textContent = Math.max(1, data.pages);
    $("prev").disabled = data.page <= 1;
    $("next").disabled = data.page >= data.pages;
    const handled = data.handled_hidden
      ? ` ${data.handled_hidden} files that earlier runs moved or linked are left out (the Actions tab lists the runs).` : "";
    $("dups-status").textContent = (data.total_groups
      ? `${data.total_groups} groups, ${data.total_files} files at threshold ${data.threshold}.`
      : `No duplicates at threshold ${data.threshold}.`) + handled;
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
  const range = (low, high) => `${low.toFixed(3)}–${high.toFixed(3)}`;
  const title = `Group ${group.number}: ${group.images.length} files, ` +
    `${scoreNameNow()} ${range(group.min_score, group.max_score)}, cosine ${range(group.min_cosine, group.max_cosine)}`;
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
    fillKeep(data.keep_criteria, data.default_keep);
  } catch (_) {
    state.actionsEnabled = false; // the stats line reports a server that cannot be reached
  }
  $("cleanup").hidden = !state.actionsEnabled;
  if (state.actionsEnabled && state.groups.length) $("groups").replaceChildren(...state.groups.map(renderGroup));
  decorateGroups();
}

// The survivor policies offered: the server's default first, then the presets its criteria allow.
function fillKeep(criteria, defaultKeep) {
  const known = new Set(criteria || Object.keys(CRITERIA));
  const first = defaultKeep || KEEP_PRESETS[0];
  const values = [first, ...KEEP_PRESETS.filter((v) => v !== first)]
    .filter((v) => v.split(",").every((c) => known.has(c)));
  const label = (value) => value.split(",").map((c) => CRITERIA[c] || c).join(", then ");
  $("keep").replaceChildren(...values.map((value) =>
    el("option", { value }, value === first ? `${label(value)} (default)` : label(value))));
  $("keep").value = first;
}

// A checkbox per file (checked: the clean-up may act on it), a "kept" mark and a line saying what the
// plan does with it. Updated in place by decorateGroups, so focus stays on the checkbox just used.
function cleanupControls(image, name) {
  const box = el("input", { type: "checkbox", checked: !state.exclude.has(image.path) });
  box.dataset.id = image.id;
  box.addEventListener("change", () => {
    if (box.checked) state.exclude.delete(image.path); else state.exclude.add(image.path);
    saveExclude();
    if (state.plan) preview(); // the plan shown must be the plan applied: make it again
  });
  return [
    el("label", { class: "include" }, box, el("span", {}, `Include ${name} in the clean-up`)),
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
  const body = { action: $("action").value, keep: $("keep").value, exclude_paths: [...state.exclude],
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

// Notes and errors next to the field they concern (the API names it), else under the plan's status.
const NOTE_FOR = { to: "move-to-note", keep: "keep-note", keep_in: "keep-in-note" };

function clearNotes() {
  for (const id of [...Object.values(NOTE_FOR), "plan-note"]) {
    $(id).hidden = true;
    $(id).replaceChildren();
    $(id).className = "field-note";
  }
  $("move-to").removeAttribute("aria-invalid");
}

function addNote(field, level, text) {
  const box = $(NOTE_FOR[field] || "plan-note");
  box.append(el("span", { class: `note ${level}` }, text));
  box.classList.add(level);
  box.hidden = false;
  if (field === "to" && level === "error") $("move-to").setAttribute("aria-invalid", "true");
}

async function preview() {
  const request = ++state.planRequest;
  $("apply").disabled = true;
  clearNotes();
  $("plan-status").textContent = "Making the plan (every file is checked against the index)…";
  try {
    const data = await postJson("/api/actions/plan", planBody());
    if (request !== state.planRequest) return; // a newer preview is on its way
    showMessage("");
    state.plan = data.manifest;
    state.planId = data.plan_id;
    $("plan-status").textContent = `${summary(data.manifest)} Nothing has changed yet.`;
    for (const note of data.notes || []) addNote(note.field, note.level, note.message);
    renderPlan(data.manifest);
    $("apply").disabled = planned().length === 0 || state.busy;
  } catch (error) {
    if (request !== state.planRequest) return;
    state.plan = null;
    $("plan-status").textContent = "No plan: see the message next to the setting.";
    $("plan-details").hidden = true;
    addNote(error.field, "error", error.message);
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
  clearNotes();
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
    state.plan = null; // the files left out stay left out: they are never planned again by accident
    $("plan-details").hidden = true;
    $("plan-status").textContent = "";
    clearNotes();
    remember("lastRun", run.run_id);
    showResult(run.run_id, run.manifest_path, summary(run.manifest), run.manifest.entries.some((e) => e.status === "done"));
    state.loaded = false;
    loadDuplicates(); // the index changed: the moved files leave their groups, the counts follow
  } catch (error) {
    $("plan-status").textContent = `Not applied: ${error.message}`;
  } finally {
    state.busy = false;
    $("preview").disabled = false;
  }
}

function showResult(runId, manifestPath, text, undoable) {
  const heading = el("p", { class: "result-title", tabindex: "-1" }, text);
  const undo = el("button", { type: "button", class: "undo" }, "Undo");
  undo.setAttribute("aria-label", `Undo run ${runId}`);
  undo.disabled = !undoable;
  undo.addEventListener("click", () => undoRun(runId, undo, (message) => {
    $("result").replaceChildren(el("p", { class: "result-title", tabindex: "-1" }, message));
    $("result").firstChild.focus();
  }, (message) => {
    $("result").querySelector(".undo-error").textContent = message;
    $("result").querySelector(".undo-error").hidden = false;
  }));
  $("result").replaceChildren(heading,
    el("p", {}, "Manifest: ", el("code", { class: "manifest-path" }, manifestPath)),
    el("p", { class: "hint" }, "From a terminal: ", el("code", {}, `neardup undo ${manifestPath}`)), undo,
    el("p", { class: "undo-error field-note error", role: "alert", hidden: true }));
  $("result").hidden = false;
  heading.focus();
}

// After a refresh: the last run this browser applied, with its Undo while it has files to put back.
async function restoreLastRun() {
  const runId = state.saved.lastRun;
  if (!runId || !state.actionsEnabled) return;
  try {
    const data = await api("/api/actions");
    const run = data.runs.find((r) => r.run_id === runId);
    if (!run) return;
    const done = run.counts.done || 0;
    const [, past] = VERBS[run.action];
    const text = done
      ? `Last run ${run.run_id}: ${past} ${done} files, skipped ${run.counts.skipped || 0}${run.to ? ` (into ${run.to})` : ""}.`
      : `Last run ${run.run_id}: ${run.state}${run.counts.undone ? `, ${run.counts.undone} files back in place` : ""}.`;
    showResult(run.run_id, run.manifest_path, text, done > 0);
    $("result").querySelector(".result-title").blur();
  } catch (_) { /* the Actions tab still lists every run */ }
}

// Undo a run: the button says "Undoing…" and is disabled until the answer comes; a second click is not possible.
async function undoRun(runId, button, done, failed) {
  if (button.disabled) return;
  button.disabled = true;
  button.textContent = "Undoing…";
  try {
    const run = await postJson("/api/actions/undo", { run_id: runId });
    showMessage("");
    const back = run.manifest.entries.filter((e) => e.status === "undone").length;
    done(`Run ${runId} undone: ${back} files are back in place.`);
    state.loaded = false;
    if (!$("view-duplicates").hidden) loadDuplicates(); // the Actions view reloads its runs in `done`
  } catch (error) {
    button.textContent = "Undo";
    button.disabled = false;
    failed(`Not undone: ${error.message}`);
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
      undo.addEventListener("click", () => undoRun(run.run_id, undo, (text) => {
        loadRuns(text);
        status.focus();
      }, (text) => { status.textContent = text; status.focus(); }));
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

// scores: {score (the copy probability dups thresholds; 0 under the cosine floor), cosine, score_name}
function openCompare(scores, a, b) {
  state.compareFrom = location.hash.slice(1) === "duplicates" ? "duplicates" : "search";
  state.compared = true;
  const threshold = cutOff();
  const copy = scores.score != null && scores.score >= threshold - 1e-9;
  const shown = `Copy probability ${scoreText(scores.score)} (cosine ${scoreText(scores.cosine)})`;
  const line = $("compare-score");
  line.textContent = `${shown}: ${copy ? "a copy" : "not a copy"} at the dups threshold ${threshold.toFixed(3)}.`;
  line.dataset.score = scores.score == null ? "" : String(scores.score);
  line.dataset.cosine = String(scores.cosine);
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
    openCompare({ score: data.score, cosine: data.cosine, score_name: data.score_name },
      indexedSide(data.images[0]), indexedSide(data.images[1]));
  } catch (error) { showMessage(error.message); }
}

async function compareWithQuery(match) {
  try {
    const image = await api(`/api/images/${match.id}/info`);
    const preview = $("query-image");
    openCompare({ score: match.dups_score, cosine: match.score, score_name: scoreNameNow() }, {
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
    remember("copyThreshold", state.threshold);
    if (state.lastMatches) renderResults(state.lastMatches); // where copies stop follows the threshold
    state.page = 1;
    $("threshold-value").textContent = state.threshold.toFixed(3);
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
  $("action").addEventListener("change", () => { $("move-to-field").hidden = $("action").value !== "move"; saveForm(); forgetPlan(); });
  for (const id of ["keep", "keep-in", "move-to"]) $(id).addEventListener("input", () => { saveForm(); forgetPlan(); });
  $("include-all").addEventListener("click", () => {
    state.exclude.clear();
    saveExclude();
    for (const box of $("groups").querySelectorAll(".include input")) box.checked = true;
    if (state.plan) preview();
  });
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

async function start() {
  wire();
  await loadStats(); // first: the index names what this browser remembers
  await loadActionsState();
  restoreForm();
  saveExclude();
  route();
  restoreLastRun();
}

start();
