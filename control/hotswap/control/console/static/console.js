// The hotswap console: polls the control plane's JSON gateway (/api/<Method>, the
// ControlPlane gRPC API as JSON) about once a second and renders what it says. Every value
// from the server goes into the page as text (textContent), never as markup.
"use strict";

const POLL_MS = 1000;
const CHART_POINTS = 60;
const TOKEN_KEY = "hotswap.token";

const state = {
  selected: location.hash.slice(1) || "", // "workspace/pipeline"
  deployed: 0,
  history: new Map(), // version number -> requests/s samples, oldest first
  rendered: new Map(), // section -> JSON of what it shows (re-rendered only on change)
  waitingForToken: false,
  busy: false,
};

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(method, body = {}) {
  const headers = { "Content-Type": "application/json" };
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = `Bearer ${token}`;
  const answer = await fetch(`/api/${method}`, {
    method: "POST",
    headers,
    body: JSON.stringify(body),
    cache: "no-store",
  });
  const doc = await answer.json().catch(() => ({}));
  if (!answer.ok) throw new ApiError(answer.status, doc.error || answer.statusText);
  return doc;
}

// -- small DOM helpers ---------------------------------------------------------------------

function el(tag, text = "", attrs = {}) {
  const node = document.createElement(tag);
  if (text !== "") node.textContent = String(text);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  return node;
}

function row(cells, attrs = {}) {
  const tr = el("tr", "", attrs);
  for (const cell of cells) {
    const td = cell instanceof Node ? el("td") : el("td", cell);
    if (cell instanceof Node) td.append(cell);
    tr.append(td);
  }
  return tr;
}

function fill(tableId, rows) {
  const body = document.querySelector(`#${tableId} tbody`);
  body.replaceChildren(...rows);
}

// Runs `draw` only when `data` differs from what the section shows: rows stay put (and
// buttons stay clickable) between polls that bring nothing new.
function changed(section, data) {
  const text = JSON.stringify(data);
  if (state.rendered.get(section) === text) return false;
  state.rendered.set(section, text);
  return true;
}

function version(number) {
  return number ? `v${number}` : "—";
}

function time(ms) {
  return ms ? new Date(Number(ms)).toLocaleString() : "";
}

function notice(text, kind = "") {
  const box = document.getElementById("notice");
  box.textContent = text;
  box.className = kind;
  box.hidden = !text;
}

// -- sections ------------------------------------------------------------------------------

async function loadPipelines() {
  const { workspaces } = await api("ListWorkspaces");
  const lists = await Promise.all(
    workspaces.map((w) => api("ListPipelines", { workspace: w.name }).then((r) => r.pipelines)),
  );
  const pipelines = lists.flat();
  if (!state.selected && pipelines.length) {
    state.selected = `${pipelines[0].workspace}/${pipelines[0].name}`;
  }
  const statuses = await Promise.all(
    pipelines.map((p) =>
      p.deployed
        ? api("GetPipelineStatus", { workspace: p.workspace, pipeline: p.name })
        : { status: "Undeployed" },
    ),
  );
  const shown = pipelines.map((p, i) => ({
    key: `${p.workspace}/${p.name}`,
    workspace: p.workspace,
    name: p.name,
    status: statuses[i].status,
    deployed: p.deployed ? p.deployed.number : 0,
    replicas: p.replicas,
    versions: p.version_count,
  }));
  if (!changed("pipelines", [shown, state.selected])) return;
  fill(
    "pipelines",
    shown.map((p) => {
      const tr = row(
        [p.workspace, p.name, el("span", p.status, { class: p.status }),
          p.deployed ? `v${p.deployed}` : "—", p.replicas, p.versions],
        { "data-pipeline": p.key, "data-serving-version": p.deployed },
      );
      if (p.key === state.selected) tr.classList.add("selected");
      tr.addEventListener("click", () => select(p.key));
      return tr;
    }),
  );
  document.getElementById("pipelines-empty").hidden = shown.length > 0;
}

function select(key) {
  state.selected = key;
  state.history.clear();
  state.rendered.clear();
  history.replaceState(null, "", `#${key}`);
  poll();
}

async function loadPipeline() {
  const section = document.getElementById("pipeline");
  if (!state.selected.includes("/")) {
    section.hidden = true;
    return;
  }
  const [workspace, pipeline] = state.selected.split("/", 2);
  const ask = { workspace, pipeline };
  const [status, versions, swaps] = await Promise.all([
    api("GetPipelineStatus", ask),
    allVersions(ask),
    api("ListSwaps", { ...ask, limit: 20 }),
  ]);
  section.hidden = false;
  state.deployed = status.deployed ? status.deployed.number : 0;
  showStatus(status);
  showRates(status.rates);
  showVersions(versions, workspace, pipeline);
  showPipelineEngines(status.engines);
  showSwaps(swaps.swaps);
}

// Every version, oldest first: the API pages them (1,000 at most a page).
async function allVersions(ask) {
  const versions = [];
  let token = "";
  do {
    const page = await api("ListPipelineVersions", { ...ask, page_size: 1000, page_token: token });
    versions.push(...page.versions);
    token = page.next_page_token;
  } while (token);
  return versions;
}

function showStatus(status) {
  document.getElementById("pipeline-name").textContent = state.selected;
  const badge = document.getElementById("pipeline-status");
  badge.textContent = status.status;
  badge.className = `badge ${status.status}`;
  const deployed = document.getElementById("deployed-version");
  deployed.textContent = state.deployed ? `serving v${state.deployed}` : "not deployed";
  deployed.dataset.servingVersion = String(state.deployed);
  document.getElementById("pipeline-details").textContent = status.details;
  const swap = status.swap_in_progress;
  const box = document.getElementById("swap-in-progress");
  box.hidden = !swap;
  box.dataset.targetVersion = swap ? String(swap.target_version) : "";
  if (!swap) return;
  document.getElementById("swap-target").textContent = `v${swap.target_version}`;
  document.getElementById("swap-stages").replaceChildren(
    ...swap.engines.map((e) =>
      el("li", `${e.engine}: ${e.stage}`, { class: e.stage, "data-engine": e.engine,
        "data-stage": e.stage }),
    ),
  );
}

function showRates(rates) {
  for (const rate of rates) {
    const samples = state.history.get(rate.number) || [];
    samples.push(rate.requests_per_second);
    state.history.set(rate.number, samples.slice(-CHART_POINTS));
  }
  fill(
    "rates",
    rates.map((r) =>
      row(
        [`v${r.number}`, r.requests_per_second.toFixed(1), r.errors_per_second.toFixed(1),
          `${r.mean_latency_ms.toFixed(2)} ms`, r.engines],
        { "data-rate-version": r.number, "data-requests-per-second": r.requests_per_second },
      ),
    ),
  );
  drawChart();
}

function drawChart() {
  const canvas = document.getElementById("rate-chart");
  const context = canvas.getContext("2d");
  context.clearRect(0, 0, canvas.width, canvas.height);
  const all = [...state.history.values()].flat();
  const top = Math.max(1, ...all);
  const colours = ["#2457c5", "#137333", "#a15c00", "#b3261e"];
  [...state.history.entries()].forEach(([, samples], i) => {
    context.strokeStyle = colours[i % colours.length];
    context.beginPath();
    // The newest sample at the right edge: the line grows in from the left.
    const offset = CHART_POINTS - samples.length;
    samples.forEach((value, x) => {
      const px = ((offset + x) / (CHART_POINTS - 1)) * canvas.width;
      const py = canvas.height - 4 - (value / top) * (canvas.height - 8);
      if (x === 0) context.moveTo(px, py);
      else context.lineTo(px, py);
    });
    context.stroke();
    // The newest point, so one sample shows too; then the version's name beside it.
    const last = samples[samples.length - 1];
    const ly = canvas.height - 4 - (last / top) * (canvas.height - 8);
    context.fillStyle = colours[i % colours.length];
    context.fillRect(canvas.width - 4, ly - 2, 4, 4);
  });
  context.fillStyle = "#5f6368";
  context.font = "11px sans-serif";
  context.fillText(`${top.toFixed(0)} req/s`, 4, 12);
  [...state.history.keys()].forEach((number, i) => {
    context.fillStyle = colours[i % colours.length];
    context.fillText(`v${number}`, 4 + 36 * i, canvas.height - 4);
  });
}

function models(version) {
  return version.steps.map((m) => `${m.name} ${m.version.slice(0, 8)} (${m.sha256.slice(0, 12)})`)
    .join(" → ");
}

function showVersions(versions, workspace, pipeline) {
  const shown = versions.map((v) => ({ n: v.number, models: models(v), created: v.created_ms }));
  if (!changed("versions", [shown, state.deployed])) return;
  fill(
    "versions",
    [...shown].reverse().map((v) => {
      let action = el("span", "serving", { class: "muted" });
      if (v.n !== state.deployed) {
        const verb = state.deployed && v.n < state.deployed ? "Roll back to" : "Deploy";
        action = el("button", `${verb} v${v.n}`, { class: "rollback", "data-rollback": v.n });
        action.addEventListener("click", () => rollback(action, workspace, pipeline, v.n));
      }
      return row([`v${v.n}`, v.models, time(v.created), action], { "data-version": v.n });
    }),
  );
}

async function rollback(button, workspace, pipeline, version) {
  button.disabled = true;
  button.textContent = `Deploying v${version}…`;
  try {
    const done = await api("Deploy", {
      workspace,
      pipeline,
      version,
      // Compare-and-set: refused if someone else deployed since this page looked.
      expected_current_version: state.deployed,
      requested_by: "console",
    });
    notice(`v${done.version.number} serves now (swap took ${done.total_ms.toFixed(0)} ms)`, "ok");
  } catch (err) {
    notice(`Deploy v${version} failed: ${err.message}`, "error");
    if (err.status === 401) askForToken();
  }
  state.rendered.delete("versions");
  poll();
}

function showPipelineEngines(engines) {
  fill(
    "pipeline-engines",
    engines.map((e) =>
      row(
        [e.name, e.address, el("span", e.status, { class: e.status }),
          e.serving_version ? `v${e.serving_version}` : "—",
          e.models.map((m) => `${m.name} ${m.version.slice(0, 8)}`).join(", "), e.reason],
        { "data-engine": e.name, "data-serving-version": e.serving_version },
      ),
    ),
  );
}

function stages(swap) {
  const list = el("ul");
  for (const e of swap.engines) {
    const timing = `prepare ${e.prepare_ms.toFixed(1)} ms, commit ${e.commit_ms.toFixed(1)} ms`;
    const reused = e.reused ? ", reused" : "";
    const error = e.error ? ` — ${e.error}` : "";
    list.append(el("li", `${e.engine}: ${e.stage} (${timing}${reused})${error}`, {
      class: e.stage, "data-engine": e.engine, "data-stage": e.stage,
    }));
  }
  return list;
}

function showSwaps(swaps) {
  if (!changed("swaps", swaps)) return;
  fill(
    "swaps",
    swaps.map((s) =>
      row(
        [time(s.started_ms), s.kind, `${version(s.version_before)} → ${version(s.version_after)}`,
          el("span", s.outcome, { class: s.outcome }), [s.reason, s.note].filter(Boolean).join("; "),
          s.requested_by, stages(s)],
        { "data-swap-id": s.swap_id, "data-kind": s.kind, "data-outcome": s.outcome,
          "data-from": s.version_before, "data-to": s.version_after },
      ),
    ),
  );
}

async function loadEngines() {
  const { engines } = await api("ListEngines");
  if (!changed("engines", engines.map(({ last_seen_ms, ...rest }) => rest))) return;
  fill(
    "engines",
    engines.map((e) =>
      row(
        [e.name, e.address, e.http_address || "—",
          el("span", e.draining ? `${e.state}, draining` : e.state, { class: e.state }),
          e.serving.join(", ") || "—",
          Object.entries(e.labels).map(([k, v]) => `${k}=${v}`).join(", "), time(e.last_seen_ms)],
        { "data-engine": e.name },
      ),
    ),
  );
}

// -- the loop and the token ----------------------------------------------------------------

function askForToken() {
  state.waitingForToken = true;
  notice("This control plane needs a token: enter one above.", "error");
  document.getElementById("token").focus();
}

let timer = 0;

async function poll() {
  clearTimeout(timer);
  if (state.busy) return; // the running poll schedules the next one
  state.busy = true;
  try {
    await loadPipelines();
    await Promise.all([loadPipeline(), loadEngines()]);
    if (state.waitingForToken) notice("");
    state.waitingForToken = false;
  } catch (err) {
    if (err.status === 401) askForToken();
    else notice(`The control plane answered: ${err.message}`, "error");
  } finally {
    state.busy = false;
    if (!state.waitingForToken) timer = setTimeout(poll, POLL_MS);
  }
}

document.getElementById("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const input = document.getElementById("token");
  const token = input.value.trim();
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  input.value = "";
  state.waitingForToken = false;
  state.rendered.clear();
  notice("");
  poll();
});

document.getElementById("token-forget").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  state.rendered.clear();
  poll();
});

poll();
