// balancectl dashboard: polls GET /dashboard once a second while the tab is visible and
// draws what it answers. Plain JavaScript, no library, no build step. Read-only until the
// operator shows the controls (with the node's API token, when it has one): the token is
// kept in this page's memory only, never stored, and sent only to this node's verbs.
"use strict";

const POLL_EVERY_MS = 1000;
const ANSWER_WITHIN_MS = 4000; // a node slower than this counts as not answering
const SVG = "http://www.w3.org/2000/svg";
const LANE_HEIGHT = 30;
const TRACK_HEIGHT = 24; // one bar's height; a lane has as many tracks as runs at once
const LANE_PADDING = 3;
const AXIS_HEIGHT = 22;
const STATUSES = ["succeeded", "failed", "timed_out", "unresponsive", "crashed", "lost", "cancelled"];
// The balance route's outcomes (GET /dashboard money.requests_last_minute), in this order.
const OUTCOMES = [
  ["changed", "changed"], ["replayed", "replayed"], ["refused", "refused (409)"],
  ["not_found", "no such user"], ["invalid", "invalid"], ["unauthorized", "unauthorized"],
  ["unavailable", "unavailable (503)"], ["failed", "failed (500)"],
];

const view = {
  minutes: 15,
  timer: null,
  inFlight: false,
  polls: 0,
  lastDocument: null,
  lastRefreshed: null, // the browser's time of the last good answer
  failingSince: null, // the browser's time of the first failed poll after a good one
  failure: "",
};

// The operator's controls: shown once unlocked; `token` lives here only (null: none given).
const operator = { unlocked: false, token: null, tokenRequired: true, busy: false };

// ---------------------------------------------------------------- small helpers

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else node.setAttribute(name, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function svg(tag, attributes = {}, text = null) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  if (text !== null) node.textContent = text;
  return node;
}

function seconds(iso) {
  return Date.parse(iso) / 1000;
}

function clock(iso) {
  return iso ? new Date(iso).toISOString().slice(11, 19) : "—";
}

function localClock(date) {
  return date.toISOString().slice(11, 19) + " UTC";
}

function duration(total) {
  if (total === null || total === undefined) return "—";
  const value = Math.max(0, total);
  if (value < 10) return `${value.toFixed(1)} s`;
  if (value < 60) return `${Math.round(value)} s`;
  if (value < 3600) return `${Math.floor(value / 60)} min ${Math.round(value % 60)} s`;
  return `${Math.floor(value / 3600)} h ${Math.round((value % 3600) / 60)} min`;
}

function ago(iso, now) {
  return `${duration(now - seconds(iso))} ago`;
}

function pill(kind, text = kind.replace("_", " ")) {
  return el("span", { class: `pill ${kind}`, text });
}

function replaceRows(table, rows, columns, emptyText) {
  const body = table.tBodies[0];
  if (rows.length === 0) {
    rows = [el("tr", {}, el("td", { class: "empty", colspan: String(columns), text: emptyText }))];
  }
  body.replaceChildren(...rows);
}

// ---------------------------------------------------------------- the sections

function renderSummary(doc) {
  const alive = doc.nodes.filter((node) => node.alive).length;
  const gone = doc.nodes.length - alive;
  const running = doc.jobs.filter((job) => job.state === "running").length;
  const chips = [
    el("span", { class: "chip", text: `${alive} node${alive === 1 ? "" : "s"} alive` }),
    el("span", { class: gone ? "chip bad" : "chip", text: `${gone} gone` }),
    el("span", { class: "chip", text: `${running} of ${doc.jobs.length} jobs running` }),
    el("span", { class: "chip", text: `served by ${doc.served_by}` }),
  ];
  if (!doc.money.balanced) chips.push(el("span", { class: "chip bad", text: "ledger mismatch" }));
  document.getElementById("summary").replaceChildren(...chips);
}

function renderNodes(doc) {
  const now = seconds(doc.now);
  const rows = doc.nodes.map((node) =>
    el(
      "tr",
      { "data-node": node.id, "data-alive": String(node.alive), class: node.alive ? "" : "gone" },
      el("td", { class: "name", text: node.id }),
      el("td", {}, pill(node.alive ? "alive" : "gone")),
      el("td", { text: ago(node.last_seen_at, now), title: node.last_seen_at }),
      el("td", { class: "num", text: String(node.jobs_held) }),
      el("td", { text: clock(node.started_at), title: node.started_at }),
      el("td", { class: "muted", text: `${node.host} · ${node.pid}` }),
    ),
  );
  replaceRows(document.getElementById("nodes"), rows, 6, "No node has joined yet");
}

function lastRunCell(run) {
  if (!run) return el("td", { class: "muted", text: "never ran" });
  const cell = el("td", { title: run.error || `${run.node}, token ${run.token}` });
  cell.append(pill(run.status), ` ${duration(run.duration_seconds)} on ${run.node}`);
  return cell;
}

const COUNT_LABELS = {
  succeeded: "ok", failed: "failed", timed_out: "timed out", unresponsive: "unresponsive",
  crashed: "crashed", lost: "lost", cancelled: "cancelled",
};

function countsCell(counts) {
  const box = el("span", { class: "counts" });
  for (const status of STATUSES) {
    const value = counts[status];
    if (!value) continue;
    box.append(
      el("span", {
        class: `count ${status}`,
        title: `${value} ${COUNT_LABELS[status]} in the last hour`,
        "data-status": status,
        text: `${value} ${COUNT_LABELS[status]}`,
      }),
    );
  }
  if (!box.childElementCount) box.append(el("span", { class: "muted", text: "none" }));
  return el("td", {}, box);
}

function nextDue(job, now) {
  if (job.state === "running" || !job.next_run_at) return "—";
  const wait = seconds(job.next_run_at) - now;
  return wait <= 0 ? "due now" : `in ${duration(wait)}`;
}

function stateCell(job) {
  const cell = el("td", {}, pill(job.state));
  // A run in progress when the job was paused goes on: "running" and "paused" both show.
  if (job.paused && job.state !== "paused") cell.append(pill("paused"));
  return cell;
}

function verbButton(job, verb, text, title, extra = "") {
  return el("button", {
    type: "button", class: extra, "data-verb": verb, "data-job": job.name, title, text,
  });
}

function verbsCell(job) {
  const cell = el("td", { class: "operator-col" });
  if (!operator.unlocked) return cell;
  const box = el("span", { class: "verbs" });
  if (job.paused) {
    box.append(verbButton(job, "resume", "Resume", "Let the job be claimed again"));
    if (job.state === "running") {
      box.append(verbButton(job, "pause-stop", "Stop the run",
        "Stop the run in progress (recorded cancelled); the job stays paused", "stop"));
    }
  } else {
    box.append(verbButton(job, "run", "Run now",
      "Make the job due now; a running job is due again as soon as its run ends"));
    box.append(verbButton(job, "pause", "Pause", "Never claim it until resumed; a run in progress finishes"));
    if (job.state === "running") {
      box.append(verbButton(job, "pause-stop", "Pause, stop the run",
        "Never claim it until resumed, and stop the run in progress (recorded cancelled)", "stop"));
    }
  }
  if (operator.busy) for (const button of box.children) button.disabled = true;
  cell.append(box);
  return cell;
}

function renderJobs(doc) {
  const now = seconds(doc.now);
  const rows = doc.jobs.map((job) =>
    el(
      "tr",
      { "data-job": job.name, "data-state": job.state, "data-node": job.node || "",
        "data-paused": String(job.paused) },
      el("td", { class: "name", text: job.name, title: job.function }),
      stateCell(job),
      el("td", { text: job.node || "—" }),
      el("td", { class: "num", text: job.state === "running" ? duration(job.elapsed_seconds) : "—" }),
      el("td", { text: nextDue(job, now), title: job.next_run_at || "" }),
      el("td", { class: "num", text: duration(job.interval_seconds) }),
      lastRunCell(job.last_run),
      countsCell(job.last_hour),
      verbsCell(job),
    ),
  );
  replaceRows(document.getElementById("jobs"), rows, 9, "No job is configured");
}

function renderMoney(doc) {
  const money = doc.money;
  const audit = money.audit;
  const verdict = money.balanced
    ? el("div", { class: "verdict ok", text: "Balances equal the ledger" })
    : el("div", { class: "verdict bad", text: "Balances differ from the ledger" });
  const auditText = audit
    ? `at ${clock(audit.finished_at)} (${ago(audit.finished_at, seconds(doc.now))})`
    : "has not run yet";
  const box = el("dl", { class: "money", "data-balanced": String(money.balanced) });
  const requests = el("dd", { class: "requests", id: "requests" });
  for (const [outcome, label] of OUTCOMES) {
    const value = money.requests_last_minute[outcome];
    requests.append(el("span", {
      class: value ? `count ${outcome}` : `count ${outcome} zero`, "data-outcome": outcome,
      "data-count": String(value), text: `${value} ${label}`,
    }));
  }
  box.append(
    verdict,
    el("dt", { text: "Total balance" }), el("dd", { text: money.total_balance }),
    el("dt", { text: "Ledger sum" }), el("dd", { text: money.ledger_sum }),
    el("dt", { text: "Users" }), el("dd", { text: String(money.users) }),
    el("dt", { text: "Last audit" }),
    el("dd", { "data-audit": audit ? audit.status : "none", title: audit?.error || "" },
      audit ? pill(audit.status) : "", ` ${auditText}`),
    el("dt", { class: "requests-title", text: "Balance requests of the last minute, every node", title: "POST /users/{id}/balance on every node, by outcome" }),
    requests,
  );
  document.getElementById("money").replaceChildren(box);
}

// ---------------------------------------------------------------- the timeline

function lanesOf(doc) {
  const lanes = new Map(doc.nodes.map((node) => [node.id, node.alive]));
  for (const run of doc.timeline) if (!lanes.has(run.node)) lanes.set(run.node, false);
  return [...lanes.entries()].sort((a, b) => a[0].localeCompare(b[0], "en", { numeric: true }));
}

function timelineDefs() {
  const defs = svg("defs");
  const hatch = svg("pattern", {
    id: "hatch-lost", width: "6", height: "6", patternUnits: "userSpaceOnUse",
    patternTransform: "rotate(45)",
  });
  hatch.append(svg("rect", { width: "6", height: "6", fill: "#fdf0e1" }));
  hatch.append(svg("rect", { width: "3", height: "6", fill: "#f7c48f" }));
  defs.append(hatch);
  return defs;
}

function tickStep(minutes) {
  if (minutes <= 5) return 30;
  if (minutes <= 20) return 60;
  if (minutes <= 60) return 300;
  return 900;
}

function drawAxis(chart, scale, start, now, height) {
  const step = tickStep(view.minutes);
  for (let t = Math.ceil(start / step) * step; t <= now; t += step) {
    const x = scale(t);
    chart.append(svg("line", { class: "grid", x1: x, x2: x, y1: AXIS_HEIGHT - 4, y2: height }));
    if (x > scale(now) - 28) continue; // a label would run past the chart's right edge
    chart.append(svg("text", { class: "tick", x, y: 12, "text-anchor": "middle" },
      new Date(t * 1000).toISOString().slice(11, step < 60 ? 19 : 16)));
  }
  chart.append(svg("line", { class: "now-line", x1: scale(now), x2: scale(now), y1: AXIS_HEIGHT - 4, y2: height }));
}

function drawBar(chart, run, scale, start, now, y) {
  const open = run.finished_at === null;
  const from = Math.max(seconds(run.started_at), start);
  const to = open ? now : seconds(run.finished_at);
  const x = scale(from);
  const width = Math.max(2, scale(to) - x);
  const runTime = (open ? now : seconds(run.finished_at)) - seconds(run.started_at);
  const group = svg("g");
  const bar = svg("rect", {
    class: `bar ${run.status}`, x, y: y + 2, width, height: TRACK_HEIGHT - 4, rx: 3,
    "data-job": run.job, "data-node": run.node, "data-status": run.status,
    "data-token": String(run.token),
  });
  bar.append(svg("title", {}, `${run.job} on ${run.node} (token ${run.token}): ${run.status}` +
    `, started ${clock(run.started_at)}, ${open ? "for" : "lasted"} ${duration(runTime)}` +
    (run.error ? `\n${run.error}` : "")));
  group.append(bar);
  if (open) {
    // An open-ended run: an arrowhead at "now" says it has not finished.
    const tip = x + width;
    group.append(svg("path", {
      class: `open-end ${run.status}`,
      d: `M${tip} ${y + 2} L${tip + 6} ${y + TRACK_HEIGHT / 2} L${tip} ${y + TRACK_HEIGHT - 2} Z`,
    }));
  }
  if (width > run.job.length * 7 + 10) { // an 11 px label, with room either side
    group.append(svg("text", { class: "bar-label", x: x + 5, y: y + TRACK_HEIGHT / 2 + 4 }, run.job));
  }
  chart.append(group);
}

// Runs of one node that overlap in time (two jobs at once) go on separate tracks of its lane.
function tracksOf(doc, now) {
  const byNode = new Map();
  const ordered = [...doc.timeline].sort((a, b) => seconds(a.started_at) - seconds(b.started_at));
  for (const run of ordered) {
    const ends = byNode.get(run.node) || [];
    const end = run.finished_at === null ? now : seconds(run.finished_at);
    let track = ends.findIndex((last) => last < seconds(run.started_at));
    if (track === -1) track = ends.length;
    ends[track] = end;
    byNode.set(run.node, ends);
    run.track = track;
  }
  return new Map([...byNode.entries()].map(([node, ends]) => [node, ends.length]));
}

function renderTimeline(doc) {
  const box = document.getElementById("timeline");
  const lanes = lanesOf(doc);
  const now = seconds(doc.now);
  const tracks = tracksOf(doc, now);
  const width = Math.max(480, box.clientWidth);
  const laneTop = new Map();
  let height = AXIS_HEIGHT;
  for (const [node] of lanes) {
    laneTop.set(node, height);
    height += Math.max(1, tracks.get(node) || 1) * TRACK_HEIGHT + LANE_PADDING * 2;
  }
  if (lanes.length === 0) height += LANE_HEIGHT;
  const start = now - doc.minutes * 60;
  const right = width - 12;
  const longest = Math.max(6, ...lanes.map(([node, alive]) => node.length + (alive ? 0 : 7)));
  const LABEL_WIDTH = Math.ceil(longest * 7.4 + 14); // the lane labels fit, whatever the names
  const scale = (t) => LABEL_WIDTH + ((t - start) / (now - start)) * (right - LABEL_WIDTH);
  const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, height, role: "img",
    "aria-label": `Runs of the last ${doc.minutes} minutes, one lane per node` });
  chart.append(timelineDefs());
  lanes.forEach(([node, alive], index) => {
    const y = laneTop.get(node);
    const laneHeight = Math.max(1, tracks.get(node) || 1) * TRACK_HEIGHT + LANE_PADDING * 2;
    chart.append(svg("rect", { class: index % 2 ? "lane odd" : "lane", x: LABEL_WIDTH, y, width: right - LABEL_WIDTH, height: laneHeight }));
    chart.append(svg("text", { class: alive ? "lane-label" : "lane-label gone", x: 4, y: y + LANE_PADDING + TRACK_HEIGHT / 2 + 4, "data-lane": node },
      alive ? node : `${node} (gone)`));
  });
  drawAxis(chart, scale, start, now, height);
  for (const run of doc.timeline) {
    drawBar(chart, run, scale, start, now, laneTop.get(run.node) + LANE_PADDING + run.track * TRACK_HEIGHT);
  }
  if (lanes.length === 0) {
    chart.append(svg("text", { class: "tick", x: LABEL_WIDTH + 8, y: AXIS_HEIGHT + 19 }, "No runs yet"));
  }
  box.replaceChildren(chart);
}

// ---------------------------------------------------------------- freshness and polling

function renderFreshness() {
  const live = document.getElementById("live");
  const refreshed = document.getElementById("refreshed");
  const banner = document.getElementById("banner");
  const main = document.getElementById("main");
  const state = document.hidden ? "paused" : view.failingSince ? "failing" : view.lastDocument ? "live" : "starting";
  live.dataset.live = state;
  live.textContent = { paused: "paused (tab hidden)", failing: "not answering", live: "live", starting: "connecting" }[state];
  if (view.lastDocument) {
    const age = (Date.now() - view.lastRefreshed.getTime()) / 1000;
    refreshed.textContent = `refreshed ${localClock(view.lastRefreshed)} (${duration(age)} ago), database time ${clock(view.lastDocument.now)}`;
  }
  main.classList.toggle("stale", Boolean(view.failingSince));
  if (view.failingSince) {
    const shown = view.lastDocument ? `; showing data as of ${clock(view.lastDocument.now)} (database time)` : "";
    banner.textContent = `Node not answering since ${localClock(view.failingSince)}: ${view.failure}${shown}`;
    banner.hidden = false;
  } else {
    banner.hidden = true;
  }
}

// ---------------------------------------------------------------- the operator's controls

function showOperatorMessage(text, kind) {
  const box = document.getElementById("operator-message");
  box.textContent = text;
  box.className = `operator-message ${kind}`;
  box.dataset.kind = kind;
  box.hidden = false;
}

function renderOperator() {
  document.body.dataset.operator = operator.unlocked ? "unlocked" : "locked";
  document.getElementById("unlock").hidden = operator.unlocked;
  document.getElementById("lock-row").hidden = !operator.unlocked;
  document.getElementById("token-label").hidden = !operator.tokenRequired;
  document.getElementById("unlock-note").textContent = operator.tokenRequired
    ? "The token stays in this page's memory only: a reload asks for it again."
    : "This node has no API token: anyone who can reach it may use its verbs. Show the controls to use them.";
  document.getElementById("operator-state").textContent = operator.unlocked ? "controls shown" : "read-only";
}

function lock(message = null) {
  operator.unlocked = false;
  operator.token = null;
  document.getElementById("token").value = "";
  renderOperator();
  if (message) showOperatorMessage(message, "bad");
  if (view.lastDocument) renderJobs(view.lastDocument);
}

function unlock(event) {
  event.preventDefault();
  const field = document.getElementById("token");
  const token = field.value.trim();
  field.value = "";
  if (operator.tokenRequired && !token) {
    showOperatorMessage("Enter the node's API token to show the controls.", "bad");
    return;
  }
  operator.token = operator.tokenRequired ? token : null;
  operator.unlocked = true;
  document.getElementById("operator-message").hidden = true;
  renderOperator();
  if (view.lastDocument) renderJobs(view.lastDocument);
}

const VERB_PATHS = { run: "run", pause: "pause", "pause-stop": "pause?stop=true", resume: "resume" };
const VERB_DONE = {
  run: "is due now", pause: "is paused (a run in progress finishes)",
  "pause-stop": "is paused and its run in progress is being stopped", resume: "is resumed",
};

async function callVerb(verb, name) {
  const headers = { Accept: "application/json" };
  if (operator.token !== null) headers.Authorization = `Bearer ${operator.token}`;
  const controller = new AbortController();
  const timeout = setTimeout(() => controller.abort(), ANSWER_WITHIN_MS);
  try {
    return await fetch(`/jobs/${encodeURIComponent(name)}/${VERB_PATHS[verb]}`, {
      method: "POST", cache: "no-store", headers, signal: controller.signal,
    });
  } finally {
    clearTimeout(timeout);
  }
}

async function onVerb(event) {
  const button = event.target.closest("button[data-verb]");
  if (!button || !operator.unlocked || operator.busy) return;
  const { verb, job } = button.dataset;
  operator.busy = true;
  if (view.lastDocument) renderJobs(view.lastDocument);
  try {
    const response = await callVerb(verb, job);
    if (response.status === 401 || response.status === 403) {
      lock(`The node refused the token (${await problemText(response)}). ` +
        "The controls are hidden again: enter the right token to show them.");
    } else if (!response.ok) {
      showOperatorMessage(`${job}: ${await problemText(response)}`, "bad");
    } else {
      const answer = await response.json();
      showOperatorMessage(`${job} ${VERB_DONE[verb]}; it is ${answer.state} now.`, "ok");
    }
  } catch (error) {
    const reason = error.name === "AbortError" ? `no answer within ${ANSWER_WITHIN_MS / 1000} s` : error.message;
    showOperatorMessage(`${job}: the request failed (${reason}); it may or may not have applied.`, "bad");
  } finally {
    operator.busy = false;
    refreshNow();
  }
}

function refreshNow() {
  if (view.inFlight) return;
  clearTimeout(view.timer);
  view.timer = null;
  poll();
}

function render(doc) {
  if (doc.token_required !== operator.tokenRequired) {
    operator.tokenRequired = doc.token_required;
    renderOperator();
  }
  renderSummary(doc);
  renderNodes(doc);
  renderJobs(doc);
  renderTimeline(doc);
  renderMoney(doc);
}

async function problemText(response) {
  try {
    const problem = await response.json();
    return `${response.status} ${problem.title}: ${problem.detail}`;
  } catch {
    return `answered ${response.status}`;
  }
}

async function fetchDocument() {
  const controller = new AbortController();
  const timeout = setTimeout(() => controller.abort(), ANSWER_WITHIN_MS);
  try {
    const response = await fetch(`/dashboard?minutes=${view.minutes}`, {
      cache: "no-store", signal: controller.signal, headers: { Accept: "application/json" },
    });
    if (!response.ok) throw new Error(await problemText(response));
    return await response.json();
  } catch (error) {
    if (error.name === "AbortError") throw new Error(`no answer within ${ANSWER_WITHIN_MS / 1000} s`);
    if (error instanceof TypeError) throw new Error(`the connection failed (${error.message})`);
    throw error;
  } finally {
    clearTimeout(timeout);
  }
}

async function poll() {
  view.timer = null;
  view.polls += 1;
  document.body.dataset.polls = String(view.polls); // read by the browser test
  view.inFlight = true;
  try {
    const doc = await fetchDocument();
    view.lastDocument = doc;
    view.lastRefreshed = new Date();
    view.failingSince = null;
    render(doc);
  } catch (error) {
    view.failingSince = view.failingSince || new Date();
    view.failure = error.message || "the request failed";
  } finally {
    view.inFlight = false;
    renderFreshness();
    schedule();
  }
}

function schedule() {
  if (document.hidden || view.timer !== null || view.inFlight) return;
  view.timer = setTimeout(poll, POLL_EVERY_MS);
}

function onVisibility() {
  if (document.hidden) {
    clearTimeout(view.timer);
    view.timer = null;
  } else if (!view.inFlight) {
    clearTimeout(view.timer);
    view.timer = null;
    poll();
  }
  renderFreshness();
}

function start() {
  const chosen = Number(new URLSearchParams(location.search).get("minutes"));
  if (Number.isInteger(chosen) && chosen >= 1 && chosen <= 180) view.minutes = chosen;
  const select = document.getElementById("minutes");
  if (![...select.options].some((option) => option.value === String(view.minutes))) {
    const unit = view.minutes === 1 ? "minute" : "minutes";
    select.append(el("option", { value: String(view.minutes), text: `${view.minutes} ${unit}` }));
  }
  select.value = String(view.minutes);
  select.addEventListener("change", () => {
    view.minutes = Number(select.value);
    if (view.lastDocument && !view.inFlight) { clearTimeout(view.timer); view.timer = null; poll(); }
  });
  document.getElementById("unlock").addEventListener("submit", unlock);
  document.getElementById("lock").addEventListener("click", () => {
    lock();
    document.getElementById("operator-message").hidden = true;
  });
  document.getElementById("jobs").addEventListener("click", onVerb);
  renderOperator();
  document.addEventListener("visibilitychange", onVisibility);
  window.addEventListener("resize", () => view.lastDocument && renderTimeline(view.lastDocument));
  // The freshness line ticks even while no answer comes (a hung node), so it never freezes.
  setInterval(renderFreshness, 1000);
  poll();
}

start();
