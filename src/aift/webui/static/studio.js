// aift studio's page (index.html): views, forms, run curves and chat over the JSON API (aift.webui.routes).
"use strict";
// Everything shown from the server or the user goes through textContent (never innerHTML): it is escaped.
const $ = (sel) => document.querySelector(sel);
const state = { options: null, selectedRun: null, runs: [], chat: [], timer: null };
const METHOD_LABELS = { sft: "SFT", dpo: "DPO", orpo: "ORPO", simpo: "SimPO", kto: "KTO", grpo: "GRPO" };
const methodLabel = (name) => METHOD_LABELS[name] || name.toUpperCase();
const TASK_HELP = { sft: "conversations or instruction/answer rows (SFT)",
  preference: "chosen/rejected pairs (DPO, ORPO, SimPO), or answers with a true/false label (KTO)",
  pretrain: "raw text for continued pretraining, packed into blocks, every token trained (by SFT)" };
const SOURCE_HELP = { pretrain: "a .txt/.md file, a folder or a glob (corpus/*.md) below the data folders, or JSONL/CSV/Parquet with a text column" };
const COMMON_TRAINING = ["learning_rate", "optimizer", "lr_scheduler", "num_epochs", "max_steps", "batch_size",
  "gradient_accumulation_steps", "max_length", "warmup_ratio", "warmup_steps", "eval_steps", "logging_steps", "save_steps"];

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

async function api(path, body) {
  const init = body === undefined ? {} : { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  const response = await fetch(path, init);
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(data.error || data.detail && JSON.stringify(data.detail) || response.statusText);
  return data;
}

function show(target, text, kind = "note") { target.replaceChildren(el("div", { class: kind, text })); }
const fmt = (x, digits = 4) => (x === null || x === undefined ? "–" : Number(x).toFixed(digits));

// ------------------------------------------------------------------ views
function switchView(name) {
  document.querySelectorAll("nav button").forEach((b) => b.classList.toggle("active", b.dataset.view === name));
  document.querySelectorAll("section.view").forEach((s) => s.classList.toggle("active", s.id === "view-" + name));
  location.hash = name;
  if (name === "runs") refreshRuns();
  if (name === "chat") refreshChatRuns();
  if (name === "data" || name === "train") refreshDatasets();
}
document.querySelectorAll("nav button").forEach((b) => b.addEventListener("click", () => switchView(b.dataset.view)));
window.addEventListener("hashchange", () => {
  const name = location.hash.slice(1);
  if (["data", "train", "runs", "chat"].includes(name) && !$("#view-" + name).classList.contains("active")) switchView(name);
});

// ------------------------------------------------------------------ data
async function refreshDatasets() {
  const d = await api("/api/datasets");
  const body = $("#prepared-table tbody");
  body.replaceChildren(...d.prepared.map((p) => el("tr", { class: "clickable", title: p.path, onclick: () => showPreview(p.path, $("#preview")) },
    el("td", { text: p.name }), el("td", { text: p.task || "" }), el("td", { text: p.format || "" }), el("td", { text: `${p.train ?? "?"} / ${p.test ?? "?"}` }))));
  if (!d.prepared.length) body.append(el("tr", {}, el("td", { colspan: 4, class: "muted", text: "none yet: prepare one below" })));
  $("#roots").textContent = "Data folders: " + d.roots.join(", ");
  $("#raw-files").replaceChildren(...d.raw.map((r) => el("option", { value: r.path })));
  const select = $("#dataset-path"), keep = select.value;
  select.replaceChildren(...d.prepared.map((p) => el("option", { value: p.path, "data-task": p.task, text: `${p.name} (${p.task} data, ${p.format}, ${p.train} train)` })));
  if (keep) select.value = keep;
  pickDatasetForMethod();
}

async function showPreview(path, target) {
  show(target, "loading preview…", "muted");
  try {
    const p = await api(`/api/preview?path=${encodeURIComponent(path)}&n=3`);
    if (p.kind === "pairs") { target.replaceChildren(...pairPreview(p)); return; }
    const head = el("p", { text: `${p.path} [${p.split}]: format ${p.info.format}, model ${p.info.model}, max_length ${p.info.max_length} — ` +
      `${p.trained} trained / ${p.masked} masked tokens (${(100 * p.trained_share).toFixed(1)}% trained)` });
    const examples = p.examples.map((e) => el("div", {},
      el("div", { class: "muted", text: `example ${e.index}: ${e.trained} trained / ${e.masked} masked tokens` }),
      el("div", { class: "example" }, ...runsOf(e.runs)),
      ...e.warnings.map((w) => el("div", { class: "error", text: "warning: " + w }))));
    target.replaceChildren(head, ...examples, ...p.warnings.map((w) => el("div", { class: "error", text: "warning: " + w })));
  } catch (err) { show(target, err.message, "error"); }
}

const runsOf = (runs) => runs.map(([text, trained, thinking]) =>
  el("span", { class: (trained ? "t" : "m") + (thinking ? " think" : ""), text }));

// Preference data: each pair's chosen answer beside its rejected one (KTO: the answer and its label).
function pairPreview(p) {
  const head = el("p", { text: `${p.path} [${p.split}]: ${p.info.task} data (${p.info.shape}), format ${p.info.format}, model ${p.info.model}, ` +
    `max_length ${p.info.max_length} — ${p.rows} ${p.info.task === "kto" ? "examples" : "pairs"}` });
  const pairs = p.pairs.map((pair) => el("div", { class: "pair-preview" },
    el("div", { class: "muted", text: pair.label === null ? `pair ${pair.index}` : `example ${pair.index} (label ${pair.label})` }),
    el("div", { class: "pair" + (pair.sides.length === 1 ? " single" : "") }, ...pair.sides.map((side) => el("div", { class: "side " + side.name },
      el("div", { class: "side-head " + side.name, text: `${side.name}: ${side.trained} trained tokens` }),
      el("div", { class: "example" }, ...runsOf(side.runs)))))));
  return [head, ...pairs];
}

function showTaskFields() {  // what applies to the task: preference data trains on the answers only, raw text every token
  const task = $("#prep-task").value, streaming = task === "pretrain" && $("#prep-streaming").checked;
  $("#prep-task-help").textContent = TASK_HELP[task] || "";
  $("#prep-source-help").textContent = SOURCE_HELP[task] || "JSON, JSONL, CSV or parquet below the data folders";
  $("#prep-train-on-prompt-label").style.display = task === "sft" ? "" : "none";
  $("#prep-drop-thinking-label").style.display = task === "sft" ? "" : "none";
  $("#prep-format-label").style.display = task === "pretrain" ? "none" : "";
  $("#prep-pretrain-fields").style.display = task === "pretrain" ? "" : "none";
  $("#prep-eval-documents-label").style.display = streaming ? "" : "none";
  $("#prep-val-ratio").closest("label").style.display = streaming ? "none" : "";
}
$("#prep-task").addEventListener("change", showTaskFields);
$("#prep-streaming").addEventListener("change", showTaskFields);

// The mixture's sources, one row each: the YAML datasets: list {path, task, weight | samples, split}.
function addMixRow() {
  const options = (values) => values.map((v) => el("option", { value: v, text: v }));
  const row = el("tr", { class: "mix-row" },
    el("td", {}, el("input", { type: "text", class: "mix-path", list: "raw-files", placeholder: "data/ja_qa.jsonl" })),
    el("td", {}, el("select", { class: "mix-task" }, ...options(state.options.tasks))),
    el("td", {}, el("input", { type: "number", step: "0.01", class: "mix-weight", placeholder: "-" })),
    el("td", {}, el("input", { type: "number", class: "mix-samples", placeholder: "-" })),
    el("td", {}, el("select", { class: "mix-split" }, ...options(["auto", "train", "test"]))));
  row.append(el("td", {}, el("button", { class: "secondary", text: "remove", onclick: () => row.remove() })));
  $("#mix-table tbody").append(row);
}
$("#mix-add").addEventListener("click", addMixRow);

function mixSources() {
  return [...document.querySelectorAll(".mix-row")].map((r) => ({ path: r.querySelector(".mix-path").value.trim(),
    task: r.querySelector(".mix-task").value, weight: r.querySelector(".mix-weight").value, samples: r.querySelector(".mix-samples").value,
    split: r.querySelector(".mix-split").value })).filter((s) => s.path);
}

function prepareOptions() {  // the form as aift prepare's options (aift.webui.prepare)
  const task = $("#prep-task").value, mix = mixSources();
  const options = { task, model: $("#prep-model").value, max_length: $("#prep-max-length").value, num_samples: $("#prep-num-samples").value,
    val_ratio: $("#prep-val-ratio").value };
  if (task !== "pretrain" || mix.length) options.format = $("#prep-format").value;
  if (task === "sft") Object.assign(options, { train_on_prompt: $("#prep-train-on-prompt").checked, drop_earlier_thinking: $("#prep-drop-earlier-thinking").checked });
  if (task === "pretrain") Object.assign(options, { text_column: $("#prep-text-column").value, min_doc_tokens: $("#prep-min-doc-tokens").value });
  if (task === "pretrain" && $("#prep-streaming").checked) Object.assign(options, { streaming: true, eval_documents: $("#prep-eval-documents").value, val_ratio: "" });
  if (mix.length) Object.assign(options, { mix, num_samples: "" });
  return options;
}

$("#prep-button").addEventListener("click", async () => {
  const status = $("#prep-status"), button = $("#prep-button");
  const options = prepareOptions();
  button.disabled = true; show(status, "preparing…", "muted");
  try {
    const r = await api("/api/prepare", { source_path: options.mix ? "" : $("#prep-source").value, name: $("#prep-name").value, options });
    show(status, "prepared " + r.path);
    await refreshDatasets();
    $("#dataset-path").value = r.path;
    showPreview(r.path, $("#preview"));
  } catch (err) { show(status, err.message, "error"); }
  button.disabled = false;
});

// ------------------------------------------------------------------ train form
function asText(value) { return value === null || value === undefined ? "" : Array.isArray(value) ? value.join(",") : String(value); }

function fieldInput(group, f) {
  const id = `${group}-${f.name}`;
  const isBool = f.type === "bool";
  const choices = f.choices && [...(f.default === null ? [""] : []), ...f.choices];  // "": unset, the config decides
  const input = isBool ? el("input", { type: "checkbox", id })
    : choices ? el("select", { id }, ...choices.map((c) => el("option", { value: c, text: c || "(default)" })))
    : el("input", { type: "text", id, placeholder: asText(f.default) || "none" });
  if (isBool) input.checked = Boolean(f.default); else input.value = asText(f.default);
  input.dataset.group = group; input.dataset.name = f.name; input.dataset.initial = isBool ? String(Boolean(f.default)) : asText(f.default);
  const label = isBool ? el("label", { class: "field", title: f.type }, input, f.name, el("span", { class: "help", text: f.help }))
                       : el("label", { class: "field", title: f.type }, f.name, el("span", { class: "help", text: f.help }), input);
  return label;
}

function buildForm(fields) {
  const common = $("#training-fields"), more = $("#training-more"), lora = $("#lora-fields");
  for (const f of fields.training) {
    if (f.name === "model_name") { $("#help-model_name").textContent = f.help; $("#model-name").value = f.default; continue; }
    if (f.name === "dataset_path") { $("#help-dataset_path").textContent = f.help; continue; }
    (COMMON_TRAINING.includes(f.name) ? common : more).append(fieldInput("training", f));
  }
  for (const f of fields.lora) lora.append(fieldInput("lora", f));
}

// The method select (every registered method) and, per method, a card of its own options with their help.
function buildMethods(methods, adapters) {
  $("#method").replaceChildren(...methods.map((m) => el("option", { value: m.name, text: methodLabel(m.name) })));
  $("#adapter").replaceChildren(...adapters.map((a) => el("option", { value: a.name, text: a.help.split(":")[0] })));
  $("#method-cards").replaceChildren(...methods.filter((m) => m.fields.length).map((m) => el("div", { class: "card method-card", id: `method-card-${m.name}` },
    el("h2", {}, `${methodLabel(m.name)} options `, el("span", { class: "muted", style: "font-weight:400", text: `(${m.config}, ${m.section}: in the YAML)` })),
    el("div", { class: "grid", id: `${m.name}-fields` }, ...m.fields.map((f) => fieldInput(m.name, f))))));
}

function selectedMethod() { return state.options.methods.find((m) => m.name === $("#method").value); }

function showMethodFields() {
  const m = selectedMethod();
  $("#method-help").textContent = `${m.summary} Data: aift prepare --task ${m.task}.`;
  document.querySelectorAll(".method-card").forEach((card) => { card.style.display = card.id === `method-card-${m.name}` ? "" : "none"; });
  pickDatasetForMethod();
}

function pickDatasetForMethod() {  // keep the dataset when it suits the method, else the first that does
  if (!state.options) return;
  const select = $("#dataset-path"), task = selectedMethod().task;
  const current = select.selectedOptions[0];
  if (current && current.dataset.task === task) return;
  const fit = [...select.options].find((o) => o.dataset.task === task);
  if (fit) select.value = fit.value;
}

function changedValues(group) {
  const out = {};
  document.querySelectorAll(`[data-group=${group}]`).forEach((input) => {
    const value = input.type === "checkbox" ? String(input.checked) : input.value.trim();
    if (value !== input.dataset.initial) out[input.dataset.name] = input.type === "checkbox" ? input.checked : value;
  });
  return out;
}

function defaultRunName() {
  const d = new Date(), p = (n) => String(n).padStart(2, "0");
  return `run-${d.getFullYear()}${p(d.getMonth() + 1)}${p(d.getDate())}-${p(d.getHours())}${p(d.getMinutes())}${p(d.getSeconds())}`;
}

function showAdapterFields() {
  const adapter = $("#adapter").value;
  $("#adapter-help").textContent = state.options.adapters.find((a) => a.name === adapter).help;
  $("#lora-card").style.display = adapter === "full" ? "none" : "";
  const qlora = $("#lora-qlora_4bit");  // 4-bit or 8-bit base: QLoRA only
  if (qlora) qlora.closest("label").style.display = adapter === "qlora" ? "" : "none";
}
$("#method").addEventListener("change", showMethodFields);
$("#adapter").addEventListener("change", showAdapterFields);
$("#train-preview-button").addEventListener("click", () => showPreview($("#dataset-path").value, $("#train-preview")));
$("#start-button").addEventListener("click", async () => {
  const status = $("#start-status"), button = $("#start-button");
  const method = $("#method").value, adapter = $("#adapter").value;
  const training = { ...changedValues("training"), model_name: $("#model-name").value, dataset_path: $("#dataset-path").value };
  button.disabled = true; show(status, "starting…", "muted");
  try {
    const r = await api("/api/runs", { name: $("#run-name").value, method, adapter, training,
      lora: adapter === "full" ? null : changedValues("lora"), options: changedValues(method) });
    show(status, `started ${r.name} (pid ${r.pid})`);
    $("#run-name").value = defaultRunName();
    state.selectedRun = r.name;
    switchView("runs");
  } catch (err) { show(status, err.message, "error"); }
  button.disabled = false;
});

// ------------------------------------------------------------------ runs
async function refreshRuns() {
  const { runs } = await api("/api/runs");
  state.runs = runs;
  $("#runs-table tbody").replaceChildren(...runs.map((r) => el("tr", { class: "clickable" + (r.name === state.selectedRun ? " selected" : ""), "data-run": r.name,
      onclick: () => { state.selectedRun = r.name; refreshRuns(); } },
    el("td", { text: r.name }), el("td", {}, el("span", { class: "badge " + r.status, text: r.status })),
    el("td", { text: `${r.step}${r.total_steps ? " / " + r.total_steps : ""}` }), el("td", { text: fmt(r.loss) }))));
  if (!runs.length) $("#runs-table tbody").append(el("tr", {}, el("td", { colspan: 4, class: "muted", text: "no runs yet: start one in Train" })));
  if (state.selectedRun) await refreshDetail();
}

async function refreshDetail() {
  const name = state.selectedRun;
  let r;
  try { r = await api(`/api/runs/${encodeURIComponent(name)}`); } catch (err) { show($("#run-detail"), err.message, "error"); return; }
  if (name !== state.selectedRun) return;
  const key = JSON.stringify(r);
  if (key === state.lastDetail) return;  // unchanged: keep the page (open details, chosen options) as it is
  state.lastDetail = key;
  const detail = $("#run-detail");
  const keepResult = detail.querySelector("#action-result");
  const share = r.total_steps ? Math.min(1, r.step / r.total_steps) : (r.status === "done" ? 1 : 0);
  const head = el("div", { class: "row" }, el("h2", { text: r.name, style: "margin:0" }), el("span", { class: "badge " + r.status, id: "run-status", text: r.status }),
    el("span", { class: "muted", text: `${methodLabel(r.method || "?")} · ${r.adapter || "?"} · ${r.model || "?"} · step ${r.step}${r.total_steps ? " / " + r.total_steps : ""} · loss ${fmt(r.loss)} · eval ${fmt(r.eval_loss)}` }));
  const bar = el("div", { class: "progress" }, el("div", { style: `width:${(100 * share).toFixed(1)}%` }));
  const actions = el("div", { class: "row" });
  if (r.status === "running") actions.append(el("button", { class: "secondary", id: "stop-button", text: "Stop (saves a checkpoint)", onclick: () => action(`/api/runs/${encodeURIComponent(name)}/stop`, {}) }));
  actions.append(el("a", { href: `/runs/${encodeURIComponent(name)}/report`, target: "_blank", id: "report-link" }, el("button", { class: "secondary", text: "Open report" })));
  if (r.has_final) {
    actions.append(el("button", { class: "secondary", text: "Chat", onclick: () => { $("#chat-run").value = name; state.chatRun = name; switchView("chat"); } }));
    if (r.is_adapter) actions.append(el("button", { class: "secondary", id: "merge-button", text: "Merge adapter", onclick: () => action(`/api/runs/${encodeURIComponent(name)}/merge`, { dtype: "bf16" }) }));
    const quant = el("select", { id: "export-quant" }, ...state.options.gguf_quants.map((q) => el("option", { value: q, text: q })));
    quant.value = "f16";  // aift export's default
    actions.append(quant, el("button", { class: "secondary", id: "export-button", text: "Export GGUF", onclick: () => action(`/api/runs/${encodeURIComponent(name)}/export`, { format: "gguf", quant: quant.value }) }),
      el("button", { class: "secondary", text: "Export safetensors", onclick: () => action(`/api/runs/${encodeURIComponent(name)}/export`, { format: "safetensors" }) }));
  }
  const chart = el("div", { class: "charts" }, ...r.curves.map((c) => curveChart(c, r.total_steps)));
  const exports = r.exports.length ? el("p", {}, "exports: ", ...r.exports.map((f) => el("a", { href: `/runs/${encodeURIComponent(name)}/exports/${encodeURIComponent(f)}`, text: f + " ", download: f })))
                                   : el("span");
  const parts = [head, bar, chart, actions, keepResult || el("div", { id: "action-result" }), exports];
  if (r.merged) parts.push(el("p", { class: "muted", text: `merged model: ${name}/merged` }));
  parts.push(el("h2", { text: "Log", style: "margin-top:14px" }), el("pre", { id: "run-log", text: r.log || "(no log)" }),
             el("details", {}, el("summary", { text: "Config" }), el("pre", { text: JSON.stringify(r.config, null, 2) })));
  detail.replaceChildren(...parts);
  const logBox = $("#run-log"); logBox.scrollTop = logBox.scrollHeight;  // the newest lines
}

async function action(path, body) {
  const target = $("#action-result");
  state.lastDetail = null;
  show(target, "working…", "muted");
  try { show(target, JSON.stringify(await api(path, body))); } catch (err) { show(target, err.message, "error"); }
  refreshRuns();
}

// One chart of the run's curves (server: runs.CURVES), an inline SVG over steps: train series as lines, eval
// series dashed with dots. Loss for every method; reward margins, accuracies, ... for the methods that log them.
const COLORS = ["#2f6fde", "#e07b10", "#1a7f37", "#c4302b", "#7c3aed", "#0e7490"];
function curveChart(curve, totalSteps) {
  const wide = curve.id === "loss", W = wide ? 760 : 400, H = wide ? 260 : 190, L = 50, R = 14, T = 14, B = 30;
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("id", curve.id + "-chart"); svg.setAttribute("viewBox", `0 0 ${W} ${H}`); svg.setAttribute("width", "100%"); svg.style.maxHeight = "300px";
  const add = (tag, attrs, text) => { const n = document.createElementNS(ns, tag); for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v); if (text !== undefined) n.textContent = text; svg.append(n); return n; };
  const values = curve.series.flatMap((s) => s.points.map(([, v]) => v)).filter((v) => Number.isFinite(v));
  const wrap = el("div", { class: "chart" + (wide ? " wide" : "") }, el("h3", { text: curve.title }), svg);
  add("rect", { x: L, y: T, width: W - L - R, height: H - T - B, fill: "#fbfcfd", stroke: "#e3e6ec" });
  if (!values.length) { add("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, `no ${curve.title.toLowerCase()} logged yet`); return wrap; }
  const xmax = Math.max(1, totalSteps || 0, ...curve.series.flatMap((s) => s.points.map(([step]) => step)));
  let ymin = Math.min(...values), ymax = Math.max(...values);
  if (ymax - ymin < 1e-6) { ymin -= 0.5; ymax += 0.5; }
  const pad = (ymax - ymin) * 0.08; ymin -= pad; ymax += pad;
  if (curve.id === "accuracies") { ymin = 0; ymax = 1; }  // a share of pairs: the whole 0..1
  const x = (s) => L + (s / xmax) * (W - L - R), y = (v) => T + (1 - (v - ymin) / (ymax - ymin)) * (H - T - B);
  for (let i = 0; i <= 4; i++) {
    const v = ymin + (i / 4) * (ymax - ymin);
    add("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), stroke: "#eef0f3" });
    add("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end" }, (Math.abs(v) < 5e-3 ? 0 : v).toFixed(2));
    const s = Math.round((i / 4) * xmax);
    add("text", { x: x(s), y: H - B + 16, "text-anchor": "middle" }, String(s));
  }
  add("text", { x: W - R, y: H - 4, "text-anchor": "end" }, "step");
  const legend = el("div", { class: "legend" });
  curve.series.forEach((series, i) => {
    const color = COLORS[i % COLORS.length], split = series.split;
    const pts = series.points.filter(([, v]) => Number.isFinite(v)).map(([step, v]) => `${x(step).toFixed(1)},${y(v).toFixed(1)}`);
    add("polyline", { class: split, "data-key": series.key, points: pts.join(" "), fill: "none", stroke: color, "stroke-width": 2, ...(split === "eval" ? { "stroke-dasharray": "5 4" } : {}) });
    for (const p of pts) { const [cx, cy] = p.split(","); add("circle", { class: split + "-point", "data-key": series.key, cx, cy, r: 2.6, fill: color }); }
    legend.append(el("span", {}, el("span", { class: "swatch", style: `background:${color}` }), `${split} ${series.key.replace("rewards/", "")}`));
  });
  wrap.append(legend);
  return wrap;
}

// ------------------------------------------------------------------ chat
async function refreshChatRuns() {
  const { runs } = await api("/api/runs");
  const select = $("#chat-run"), keep = state.chatRun || select.value;
  select.replaceChildren(...runs.filter((r) => r.has_final).map((r) => el("option", { value: r.name, text: `${r.name} (${methodLabel(r.method)}, ${r.adapter}, ${r.model})` })));
  if (keep && [...select.options].some((o) => o.value === keep)) select.value = keep;
  if (!select.options.length) show($("#chat-status"), "no run has a final model yet", "muted");
}

function renderChat() {
  $("#chat-log").replaceChildren(...state.chat.map((m) => el("div", { class: "msg " + m.role, text: m.content })));
  $("#chat-log").scrollTop = 1e9;
}

async function sendChat() {
  const text = $("#chat-input").value.trim(), run = $("#chat-run").value;
  if (!text || !run) return;
  state.chatRun = run;
  $("#chat-input").value = ""; $("#chat-send").disabled = true;
  state.chat.push({ role: "user", content: text });
  const messages = state.chat.slice();
  const answer = { role: "assistant", content: "" };
  state.chat.push(answer); renderChat();
  show($("#chat-status"), "generating… (the first message loads the model)", "muted");
  try {
    const response = await fetch(`/api/runs/${encodeURIComponent(run)}/chat`, { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ messages, max_new_tokens: Number($("#chat-max").value), greedy: $("#chat-greedy").checked }) });
    if (!response.ok) throw new Error((await response.json().catch(() => ({}))).error || response.statusText);
    const reader = response.body.getReader(), decoder = new TextDecoder();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      answer.content += decoder.decode(value, { stream: true });
      $("#chat-log").lastChild.textContent = answer.content;
    }
    if (!answer.content) answer.content = "(empty answer)";
    renderChat(); show($("#chat-status"), "");
  } catch (err) { state.chat.pop(); renderChat(); show($("#chat-status"), err.message, "error"); }
  $("#chat-send").disabled = false;
}
$("#chat-send").addEventListener("click", sendChat);
$("#chat-input").addEventListener("keydown", (e) => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); sendChat(); } });
$("#chat-reset").addEventListener("click", () => { state.chat = []; renderChat(); });
$("#chat-run").addEventListener("change", () => { state.chatRun = $("#chat-run").value; state.chat = []; renderChat(); });

// ------------------------------------------------------------------ start
(async function init() {
  const o = await api("/api/options");
  state.options = o;
  $("#runs-dir").textContent = "runs: " + o.runs_dir;
  const models = el("datalist", { id: "models" }, ...o.models.map((m) => el("option", { value: m })));
  document.body.append(models);
  $("#prep-model").value = o.models[0];
  $("#prep-format").replaceChildren(...o.formats.map((f) => el("option", { value: f, text: f })));
  $("#prep-task").replaceChildren(...o.tasks.map((t) => el("option", { value: t, text: t })));
  showTaskFields();
  buildForm(o.fields);
  buildMethods(o.methods, o.adapters);
  showMethodFields();
  showAdapterFields();
  $("#run-name").value = defaultRunName();
  const first = (location.hash || "#train").slice(1);
  switchView(["data", "train", "runs", "chat"].includes(first) ? first : "train");
  // Poll while a run is watched: progress, loss curve and log come from its folder.
  state.timer = setInterval(() => { if ($("#view-runs").classList.contains("active")) refreshRuns().catch(() => {}); }, 1500);
  document.body.dataset.ready = "1";
})();
