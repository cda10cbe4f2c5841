// deephash-faiss search page: no build step, no dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
const MODE_HELP = {
  bcs: "Binary code search: rank the whole database by Hamming distance to the query's code.",
  hds: "Coarse-to-fine (the paper's): pool the codes within the Hamming radius, rerank the pool by fc7 L2.",
  es: "Exhaustive search: exact L2 over every fc7 feature (the slow reference).",
};

const state = { info: null, file: null, queryId: null, queryLabel: null, busy: false };

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k === "dataset") Object.assign(e.dataset, v);
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function labelColour(label) {
  if (label == null) return "#9aa3b5";
  let h = 0;
  for (const ch of String(label)) h = (h * 31 + ch.charCodeAt(0)) >>> 0;
  const classes = (state.info && state.info.classes) || [];
  const i = classes.indexOf(label);
  const hue = i >= 0 ? (i * 137.508) % 360 : h % 360;
  return `hsl(${hue.toFixed(0)} 62% 52%)`;
}

function mode() { return document.querySelector('input[name="mode"]:checked').value; }

function showError(msg) {
  const e = $("error");
  e.textContent = msg || "";
  e.hidden = !msg;
}

function updateControls() {
  const m = mode();
  $("mode-help").textContent = MODE_HELP[m];
  const hds = m === "hds";
  for (const id of ["radius-field", "maxc-field"]) $(id).classList.toggle("disabled", !hds);
  $("radius").disabled = !hds;
  $("max-candidates").disabled = !hds;
  $("radius-out").textContent = $("radius").value;
  $("search-btn").disabled = state.busy || (!state.file && state.queryId == null);
}

async function loadInfo() {
  try {
    const r = await fetch("/info");
    const info = await r.json();
    state.info = info;
    $("index-info").innerHTML = "";
    $("index-info").append(
      el("b", {}, info.live_count.toLocaleString()), " images · ",
      el("b", {}, `${info.bits}-bit`), " codes · ",
      el("b", {}, info.model.backbone), ` (${info.feature_dim}-d fc7) · `,
      el("b", {}, info.classes.length), " classes · ",
      `${info.index.type} index on ${info.device}`,
    );
    const k = $("k");
    k.max = info.limits.k_max;
    k.value = Math.min(Number(k.value), info.limits.k_max);
    $("radius").max = info.limits.radius_max;
  } catch (err) {
    $("index-info").textContent = "cannot reach the server";
  }
}

function setFile(file) {
  if (!file) return;
  if (file.type && !file.type.startsWith("image/")) {
    showError(`${file.name} is not an image`);
    return;
  }
  state.file = file;
  state.queryId = null;
  state.queryLabel = null;
  const url = URL.createObjectURL(file);
  $("query-preview").src = url;
  $("query-preview").hidden = false;
  $("drop").classList.add("has-image");
  showError("");
  updateControls();
  runSearch();
}

function fmt(x, digits = 4) {
  if (x == null) return "–";
  if (x === 0) return "0";
  return Math.abs(x) >= 1000 || Math.abs(x) < 0.01 ? x.toExponential(2) : x.toPrecision(digits);
}

function render(data, queryUrl) {
  $("empty").hidden = true;
  $("query-card").hidden = false;
  $("query-img").src = queryUrl;
  const name = data.query_id != null ? `database #${data.query_id} · ${data.query.split("/").pop()}` : data.query;
  $("query-name").textContent = name;
  const stats = $("query-stats");
  stats.innerHTML = "";
  stats.append(
    el("span", { class: "chip accent" }, data.mode.toUpperCase()),
    el("span", { class: "chip" }, `k ${data.k}`),
    el("span", { class: "chip", title: "search time (index + rerank)" }, `search ${data.timing_ms.toFixed(2)} ms`),
    el("span", { class: "chip", title: "query encoding time" }, `encode ${data.encode_ms.toFixed(1)} ms`),
    el("span", { class: "chip", title: "server time for the whole request" }, `total ${data.total_ms.toFixed(1)} ms`),
    el("span", { class: "chip", title: data.mode === "hds" ? "HDS pool size" : "rows scanned" },
      `${data.candidates.toLocaleString()} candidates`),
  );
  if (data.mode === "hds") stats.append(el("span", { class: "chip" }, `radius ${data.radius}`));
  if (state.queryLabel != null) {
    const hits = data.results.filter((r) => r.label === state.queryLabel).length;
    stats.append(el("span", { class: "chip", title: "results with the query's label" },
      `same label ${hits}/${data.results.length}`));
  }
  if (data.truncated) stats.append(el("span", { class: "chip warn" }, "pool capped"));

  const grid = $("grid");
  grid.innerHTML = "";
  for (const r of data.results) {
    const match = state.queryLabel != null && r.label === state.queryLabel;
    const card = el("article", { class: "result" + (match ? " match" : ""),
      dataset: { id: r.id, label: r.label ?? "", rank: r.rank }, title: r.path },
      el("div", { class: "thumb" },
        el("img", { src: r.thumbnail_url, alt: `${r.label ?? "image"} #${r.id}`, loading: "lazy" }),
        el("span", { class: "rank" }, `#${r.rank}`)),
      el("div", { class: "meta" },
        el("div", { class: "label" }, el("span", { class: "swatch", style: `background:${labelColour(r.label)}` }),
          el("span", { class: "label-text" }, r.label ?? "unlabelled")),
        el("div", { class: "dist" }, el("span", {}, "Hamming"), el("b", { class: "hamming" }, r.hamming)),
        el("div", { class: "dist" }, el("span", {}, "L2²"), el("b", { class: "distance" }, fmt(r.distance))),
        el("div", { class: "dist" }, el("span", {}, "id"), el("span", {}, r.id)),
        el("button", { type: "button", class: "by-id", onclick: () => searchById(r.id, r.label) },
          "search with this")),
    );
    grid.append(card);
  }
}

function searchById(id, label) {
  state.file = null;
  state.queryId = id;
  state.queryLabel = label ?? null;
  $("query-preview").src = `/images/${id}?thumb=1`;
  $("query-preview").hidden = false;
  $("drop").classList.add("has-image");
  updateControls();
  runSearch();
  window.scrollTo({ top: 0, behavior: "smooth" });
}

async function runSearch() {
  if (state.busy || (!state.file && state.queryId == null)) return;
  showError("");
  const params = {
    mode: mode(),
    k: Number($("k").value),
    radius: Number($("radius").value),
    max_candidates: Number($("max-candidates").value),
  };
  let req, queryUrl;
  if (state.file) {
    const fd = new FormData();
    fd.append("image", state.file, state.file.name || "upload");
    for (const [k, v] of Object.entries(params)) fd.append(k, String(v));
    req = { method: "POST", body: fd };
    queryUrl = $("query-preview").src;
  } else {
    req = { method: "POST", headers: { "Content-Type": "application/json" },
            body: JSON.stringify({ id: state.queryId, ...params }) };
    queryUrl = `/images/${state.queryId}`;
  }
  state.busy = true;
  $("search-btn").classList.add("busy");
  $("search-btn").textContent = "Searching…";
  updateControls();
  try {
    const r = await fetch("/search", req);
    const data = await r.json().catch(() => ({}));
    if (!r.ok) {
      const d = data.detail;
      showError(typeof d === "string" ? d : `search failed (HTTP ${r.status})`);
      return;
    }
    render(data, queryUrl);
    document.body.dataset.searches = String(Number(document.body.dataset.searches || 0) + 1);
  } catch (err) {
    showError(`cannot reach the server: ${err}`);
  } finally {
    state.busy = false;
    $("search-btn").classList.remove("busy");
    $("search-btn").textContent = "Search";
    updateControls();
  }
}

function init() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => setFile(e.target.files[0]));
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("file").click(); } });
  for (const ev of ["dragenter", "dragover"]) drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
  for (const ev of ["dragleave", "drop"]) drop.addEventListener(ev, () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); setFile(e.dataTransfer.files[0]); });
  document.addEventListener("paste", (e) => {
    const item = [...(e.clipboardData?.items || [])].find((i) => i.type.startsWith("image/"));
    if (item) setFile(item.getAsFile());
  });
  for (const r of document.querySelectorAll('input[name="mode"]')) r.addEventListener("change", () => { updateControls(); runSearch(); });
  $("radius").addEventListener("input", () => { $("radius-out").textContent = $("radius").value; });
  $("search-form").addEventListener("submit", (e) => { e.preventDefault(); runSearch(); });
  updateControls();
  loadInfo();
}

init();
