// nbqueue dashboard: renders the JSON the server embeds and then streams (server-sent events).
// Plain JS, no build step, no third-party code.
"use strict";

const STATES = ["PENDING", "RECEIVED", "STARTED", "RETRY", "SUCCESS", "FAILURE", "REVOKED"];
const FINAL = new Set(["SUCCESS", "FAILURE", "REVOKED"]);
let current = JSON.parse(document.getElementById("initial").textContent);
let source = null;

// -- small helpers ----------------------------------------------------------------------------
function esc(value) {
  return String(value == null ? "" : value).replace(/[&<>"']/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
}
function when(t) { return t ? new Date(t * 1000).toLocaleString() : "—"; }
function secs(s) {
  if (s == null) return "—";
  if (s < 1) return (s * 1000).toFixed(1) + " ms";
  if (s < 120) return s.toFixed(2) + " s";
  return (s / 60).toFixed(1) + " min";
}
function badge(state) { return `<span class="state ${esc(state)}">${esc(state || "?")}</span>`; }
function taskLink(id, text) { return `<a href="tasks/${encodeURIComponent(id)}">${esc(text || id.slice(0, 8))}</a>`; }
function flash(text, bad) {
  const el = document.getElementById("flash");
  el.textContent = text; el.className = bad ? "bad" : ""; el.hidden = false;
}
function confirmThen(text, action) {
  const dialog = document.getElementById("confirm");
  document.getElementById("confirm-text").textContent = text;
  dialog.onclose = () => { if (dialog.returnValue === "yes") action(); };
  dialog.returnValue = "";
  dialog.showModal();
}
async function act(url, doneText) {
  try {
    const response = await fetch(url, {method: "POST", headers: {"X-Nbqueue-Action": "1"}, credentials: "same-origin"});
    const body = await response.json();
    if (!response.ok) { flash(body.error || `failed (${response.status})`, true); return; }
    flash(body.message || doneText, !body.ok);
    if (body.ok && body.id) {        // a task sent again: link to it
      document.getElementById("flash").insertAdjacentHTML("beforeend", ` — <a id="new-task" href="tasks/${encodeURIComponent(body.id)}">open it</a>`);
    }
    refresh();
  } catch (err) { flash(String(err), true); }
}

// -- the views ----------------------------------------------------------------------------------
function queuesTable(queues) {
  if (!queues.length) return `<p class="muted">no queues yet</p>`;
  return `<table id="queues"><thead><tr><th>queue</th><th class="num">ready</th><th class="num">delayed</th><th class="num">in flight</th>
    <th class="num">dead letters</th></tr></thead><tbody>${queues.map(q => `<tr data-queue="${esc(q.queue)}">
    <td><a href="queues/${encodeURIComponent(q.queue)}">${esc(q.queue)}</a></td><td class="num">${q.ready}</td><td class="num">${q.delayed}</td>
    <td class="num">${q.in_flight}</td><td class="num">${q.dead}</td></tr>`).join("")}</tbody></table>`;
}

function workersTable(workers) {
  if (!workers.length) return `<p class="muted">no live workers</p>`;
  return `<table id="workers"><thead><tr><th>worker</th><th>host</th><th class="num">pid</th><th>pool</th><th class="num">concurrency</th>
    <th class="num">running</th><th class="num">done</th><th>last heartbeat</th><th>queues</th><th>tasks</th></tr></thead><tbody>${workers.map(w => `<tr>
    <td>${esc(w.id)}</td><td>${esc(w.host)}</td><td class="num">${esc(w.pid)}</td><td>${esc(w.pool)}</td><td class="num">${esc(w.concurrency)}</td>
    <td class="num">${esc(w.running)}</td><td class="num">${esc(w.processed)}</td><td>${secs(w.age)} ago</td><td>${esc((w.queues || []).join(", "))}</td>
    <td class="muted">${esc((w.tasks || []).join(", "))}</td></tr>`).join("")}</tbody></table>`;
}

function tasksTable(page) {
  const chips = STATES.filter(s => page.by_state[s]).map(s =>
    `<span class="state ${s}" data-state="${s}" title="show only ${s}">${s} ${page.by_state[s]}</span>`).join("");
  const rows = page.tasks.map(t => `<tr data-id="${esc(t.id)}" data-state="${esc(t.state)}"><td>${taskLink(t.id)}</td><td>${esc(t.name)}</td>
    <td>${badge(t.state)}</td><td>${esc(t.queue)}</td><td class="call" title="${esc(t.call)}">${esc(t.call)}</td><td>${when(t.created_at)}</td>
    <td class="num">${secs(t.runtime)}</td><td class="num">${t.retries}</td><td class="err" title="${esc(t.error)}">${esc(t.error || "")}</td></tr>`).join("");
  const counted = page.total != null;
  const pages = counted ? Math.max(1, Math.ceil(page.total / page.per_page)) : null;
  const info = counted ? `page ${page.page} of ${pages} · ${page.total} task(s)` : `page ${page.page} · counting…`;
  return `<div class="chips">${chips || ""}</div>
    <table id="tasks"><thead><tr><th>id</th><th>name</th><th>state</th><th>queue</th><th>arguments</th><th>sent</th><th class="num">run time</th>
    <th class="num">retries</th><th>error</th></tr></thead><tbody>${rows || `<tr><td colspan="9" class="muted">no tasks match</td></tr>`}</tbody></table>
    <div class="pager"><button id="prev" ${page.page <= 1 ? "disabled" : ""}>‹ newer</button>
    <span id="page-info">${info}</span>
    <button id="next" ${page.more ? "" : "disabled"}>older ›</button></div>`;
}

function filterForm() {
  const p = new URLSearchParams(location.search);
  const local = v => v ? new Date(parseFloat(v) * 1000 - new Date().getTimezoneOffset() * 60000).toISOString().slice(0, 16) : "";
  return `<form class="filters" id="filters">
    <label>state<select name="state"><option value="">any</option>${STATES.map(s => `<option ${p.get("state") === s ? "selected" : ""}>${s}</option>`).join("")}</select></label>
    <label>name<input name="name" value="${esc(p.get("name") || "")}" placeholder="task name"></label>
    ${current.view === "queue" ? "" : `<label>queue<input name="queue" value="${esc(p.get("queue") || "")}" placeholder="queue"></label>`}
    <label>sent after<input type="datetime-local" name="since" value="${local(p.get("since"))}"></label>
    <label>sent before<input type="datetime-local" name="until" value="${local(p.get("until"))}"></label>
    <label>search arguments and errors<input name="q" value="${esc(p.get("q") || "")}" placeholder="text" size="24"></label>
    <button type="submit">filter</button> <button type="button" id="clear">clear</button></form>`;
}

function renderList(data) {
  const main = document.getElementById("main");
  if (!document.getElementById("filters")) {
    const head = data.view === "queue"
      ? `<h1>queue ${esc(data.queue.queue.queue)}</h1><div id="queue-box"></div>
         <div class="actions"><button id="redrive">re-drive dead letters</button><button id="purge" class="danger">purge queue</button></div>
         <h2>dead letters</h2><div id="dead"></div>`
      : `<div class="stack"><section><h2>queues</h2><div id="queues-box"></div></section><section><h2>workers</h2><div id="workers-box"></div></section></div>`;
    main.innerHTML = `${head}<h2>tasks</h2>${filterForm()}<div id="tasks-box"></div>`;
    bindList();
  }
  if (data.view === "queue") {
    const q = data.queue.queue;
    document.getElementById("queue-box").innerHTML = queuesTable([q]);
    document.getElementById("dead").innerHTML = data.queue.dead_letters.length
      ? `<table id="dead-letters"><thead><tr><th>message</th><th>task</th><th>arguments</th><th>reason</th></tr></thead><tbody>${data.queue.dead_letters.map(d =>
        `<tr><td>${esc(d.id)}</td><td>${esc(d.name)}</td><td class="call">${esc(d.call)}</td><td>${esc(d.reason)}</td></tr>`).join("")}</tbody></table>`
      : `<p class="muted">no dead letters</p>`;
  } else {
    document.getElementById("queues-box").innerHTML = queuesTable(data.overview.queues);
    document.getElementById("workers-box").innerHTML = workersTable(data.overview.workers);
  }
  const note = data.tasks.unsupported ? `<p class="muted" id="unlisted">${esc(data.tasks.unsupported)}</p>`
    : (data.overview && data.overview.lists === "recent" ? `<p class="muted">this result backend lists its most recent tasks</p>` : "");
  document.getElementById("tasks-box").innerHTML = note + tasksTable(data.tasks);
  document.querySelectorAll(".chips .state").forEach(chip => chip.onclick = () => setFilters({state: chip.dataset.state, page: ""}));
  document.getElementById("prev").onclick = () => setFilters({page: String(data.tasks.page - 1)});
  document.getElementById("next").onclick = () => setFilters({page: String(data.tasks.page + 1)});
}

function bindList() {
  const form = document.getElementById("filters");
  form.onsubmit = ev => {
    ev.preventDefault();
    const values = {page: ""};
    for (const [k, v] of new FormData(form).entries()) {
      values[k] = (k === "since" || k === "until") && v ? String(new Date(v).getTime() / 1000) : v;
    }
    setFilters(values);
  };
  document.getElementById("clear").onclick = () => { history.replaceState(null, "", location.pathname); form.reset();
    form.querySelectorAll("input").forEach(i => i.value = ""); refresh(true); };
  const redrive = document.getElementById("redrive");
  if (redrive) {
    const queue = current.queue.queue.queue;
    redrive.onclick = () => confirmThen(`Send the dead letters of ${queue} again, as new tasks?`,
      () => act(`api/queues/${encodeURIComponent(queue)}/redrive`, "re-driven"));
    document.getElementById("purge").onclick = () => confirmThen(`Delete every waiting message of ${queue}? This cannot be undone.`,
      () => act(`api/queues/${encodeURIComponent(queue)}/purge`, "purged"));
  }
}

function setFilters(values) {
  const p = new URLSearchParams(location.search);
  for (const [k, v] of Object.entries(values)) { if (v) p.set(k, v); else p.delete(k); }
  const qs = p.toString();
  history.replaceState(null, "", location.pathname + (qs ? "?" + qs : ""));
  if (values.state !== undefined) { const sel = document.querySelector("#filters select[name=state]"); if (sel) sel.value = values.state; }
  refresh(true);
}

function graphNode(node, here) {
  if (node.kind === "task") {
    return `<a class="g-task ${esc(node.state)} ${node.id === here ? "here" : ""}" href="tasks/${encodeURIComponent(node.id)}" data-id="${esc(node.id)}"
      title="${esc(node.state)} ${esc(node.id)}">${esc(node.name || node.id.slice(0, 8))}</a>`;
  }
  if (node.kind === "chain") {
    return `<div class="g-chain">${node.steps.map(s => graphNode(s, here)).join(`<span class="g-arrow">→</span>`)}</div>`;
  }
  return `<div class="g-group" data-id="${esc(node.id)}"><span class="g-label">group ${badge(node.state)}</span>${node.members.map(m => graphNode(m, here)).join("")}
    ${node.more ? `<span class="muted">and ${node.more} more</span>` : ""}</div>`;
}

function valueBlock(v) {
  if (!v) return `<span class="muted">—</span>`;
  if (v.kind === "frame") {
    const label = v.summary ? `${esc(v.summary)}, stored out of band: its first rows` : `DataFrame ${v.shape.join(" × ")}`;
    return `<div class="muted">${label}</div>${v.html}`;
  }
  return `<pre>${esc(v.text)}</pre>`;
}

function renderTask(data) {
  const t = data.task;
  const args = t.arguments.args.map((a, i) => `<dt>${i + 1}</dt><dd>${valueBlock(a)}</dd>`).join("")
    + Object.entries(t.arguments.kwargs).map(([k, v]) => `<dt>${esc(k)}</dt><dd>${valueBlock(v)}</dd>`).join("");
  const progress = t.progress != null ? (typeof t.progress === "number"
    ? `<div class="progress"><div style="width:${Math.round(Math.min(1, t.progress) * 100)}%"></div></div>` : `<pre>${esc(JSON.stringify(t.progress))}</pre>`) : "";
  document.getElementById("main").innerHTML = `
    <h1>${esc(t.name)} ${badge(t.state)}</h1><div class="muted" id="task-id">${esc(t.id)}</div>
    <div class="actions">
      <button id="cancel" class="danger" ${t.final ? "disabled" : ""}>cancel</button>
      ${t.workflow ? `<button id="cancel-workflow" class="danger">cancel workflow</button>` : ""}
      <button id="retry" ${t.state === "FAILURE" || t.state === "REVOKED" ? "" : "disabled"}>retry</button>
    </div>
    ${t.workflow ? `<h2>workflow</h2><div class="graph" id="graph">${graphNode(t.workflow, t.id)}</div>` : ""}
    <div class="cards"><section><h2>timings</h2><dl class="kv">
      <dt>sent</dt><dd>${when(t.created_at)}</dd><dt>started</dt><dd>${when(t.started_at)}</dd><dt>finished</dt><dd>${when(t.finished_at)}</dd>
      <dt>queue wait</dt><dd>${secs(t.queue_wait)}</dd><dt>run time</dt><dd>${secs(t.runtime)}</dd></dl></section>
    <section><h2>attempts</h2><dl class="kv"><dt>retries</dt><dd>${t.retries}</dd><dt>attempts begun</dt><dd>${esc(t.token)}</dd>
      <dt>queue</dt><dd>${esc(t.queue)}</dd><dt>worker</dt><dd>${esc(t.worker || "—")}</dd>
      ${t.parent_id ? `<dt>parent</dt><dd>${taskLink(t.parent_id, t.parent_id)}</dd>` : ""}
      ${t.meta && t.meta.retry_of ? `<dt>retry of</dt><dd>${taskLink(t.meta.retry_of, t.meta.retry_of)}</dd>` : ""}</dl></section></div>
    ${progress ? `<h2>progress</h2>${progress}` : ""}
    <h2>arguments</h2>${args ? `<dl class="kv" id="arguments">${args}</dl>` : `<p class="muted">none</p>`}
    ${t.result ? `<h2>result</h2><div id="result">${valueBlock(t.result)}</div>` : ""}
    ${t.error ? `<h2>error</h2><pre class="tb" id="error">${esc(t.error)}</pre>` : ""}
    ${t.traceback ? `<h2>traceback</h2><pre class="tb" id="traceback">${esc(t.traceback)}</pre>` : ""}
    ${t.output ? `<h2>output</h2><pre id="output">${esc(t.output)}</pre>` : ""}`;
  document.getElementById("cancel").onclick = () => confirmThen(`Cancel task ${t.name} (${t.id})?`, () => act(`api/tasks/${encodeURIComponent(t.id)}/cancel`, "cancelled"));
  const whole = document.getElementById("cancel-workflow");
  if (whole) whole.onclick = () => confirmThen(`Cancel every unfinished task of this workflow?`,
    () => act(`api/tasks/${encodeURIComponent(t.id)}/cancel-workflow`, "workflow cancelled"));
  document.getElementById("retry").onclick = () => confirmThen(`Send task ${t.name} again as a new task?`, () => act(`api/tasks/${encodeURIComponent(t.id)}/retry`, "sent again"));
}

function render(data) {
  if (data.error) { flash(data.error, true); return; }
  current = data;
  if (data.view === "task") renderTask(data); else renderList(data);
}

// -- live updates -----------------------------------------------------------------------------
function streamParams() {
  const p = new URLSearchParams(location.search);
  p.delete("token");
  p.set("view", current.view);
  if (current.view === "task") p.set("id", current.task.id);
  if (current.view === "queue") p.set("id", current.queue.queue.queue);
  return p;
}

function follow() {
  if (source) source.close();
  const live = document.getElementById("live");
  source = new EventSource("api/events?" + streamParams().toString());
  source.onopen = () => { live.textContent = "live"; live.className = "live on"; };
  source.onerror = () => { live.textContent = "reconnecting…"; live.className = "live off"; };
  source.onmessage = ev => render(JSON.parse(ev.data));
  source.addEventListener("gone", ev => { flash(JSON.parse(ev.data).error, true); source.close(); });
}

async function refresh(restream) {
  const p = streamParams();
  let url;
  if (current.view === "task") url = `api/tasks/${encodeURIComponent(current.task.id)}`;
  else { url = "api/tasks?" + new URLSearchParams([...p].filter(([k]) => k !== "view" && k !== "id")).toString();
    if (current.view === "queue") url += "&queue=" + encodeURIComponent(current.queue.queue.queue); }
  try {
    const response = await fetch(url, {credentials: "same-origin"});
    const body = await response.json();
    if (!response.ok) { flash(body.error, true); }
    else if (current.view === "task") render({view: "task", task: body});
    else render({...current, tasks: body});
  } catch (err) { flash(String(err), true); }
  if (restream) follow();
}

render(current);
follow();
