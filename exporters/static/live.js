// wantel live page: one WebSocket to ws/progress (protocol: docs/websocket.md), no build step.
// It keeps the last position it saw and, after a drop, reconnects with ?since=POSITION, so the
// server replays what was missed, sends a fresh snapshot, then `caught_up`.
// Rows are keyed by job and updated in place (never rebuilt), so a user's text selection and the
// job they picked survive every update; the picked job's details (expert, worker, trace link,
// failure) show below the tables and in the URL (#job=ID).
"use strict";
(function () {
  const params = new URLSearchParams(location.search);
  const token = params.get("token");
  const onlyJob = params.get("job");
  const traceMeta = document.querySelector('meta[name="wantel-trace-url"]');
  const traceUrl = traceMeta ? traceMeta.content : "";
  const running = new Map(); // job -> {view, at}: `at` = performance.now() when the ETA arrived
  const finished = new Map(); // job -> view, newest first by ended_ts
  const shownProgress = new Map(); // job -> the highest percentage shown: it never goes back
  let selected = new URLSearchParams(location.hash.slice(1)).get("job");
  let position = null; // the last log position seen (frames, snapshots, caught_up)
  let retry = 500;
  const MAX_FINISHED = 20;
  const $ = (id) => document.getElementById(id);

  function wsUrl() {
    const url = new URL("ws/progress", location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    url.search = "";
    url.hash = "";
    if (position !== null) url.searchParams.set("since", String(position));
    if (onlyJob) url.searchParams.set("job", onlyJob);
    if (token) url.searchParams.set("token", token);
    return url.toString();
  }

  function setConn(state, text) {
    const el = $("conn");
    el.className = "conn conn-" + state;
    el.textContent = text;
  }

  function connect() {
    setConn("connecting", position === null ? "connecting…" : "reconnecting…");
    const ws = new WebSocket(wsUrl());
    let pinger = null;
    ws.onopen = () => {
      retry = 500;
      pinger = setInterval(() => ws.send(JSON.stringify({ type: "ping" })), 15000);
    };
    ws.onmessage = (msg) => handle(JSON.parse(msg.data));
    ws.onclose = () => {
      if (pinger) clearInterval(pinger);
      setConn("down", "disconnected — retrying");
      setTimeout(connect, retry);
      retry = Math.min(retry * 2, 5000);
    };
  }

  function handle(f) {
    if (typeof f.position === "number" && (position === null || f.position > position)) {
      position = f.position;
    }
    switch (f.type) {
      case "snapshot":
        running.clear();
        for (const v of f.data.running) running.set(v.job, entryOf(v, null));
        if (f.data.reason !== "overflow") finished.clear();
        for (const v of f.data.finished.slice().reverse()) addFinished(v);
        break;
      case "caught_up":
        setConn("live", "live");
        break;
      case "pong":
        return;
      case "error":
        console.warn("wantel:", f.data.error, f.data.detail);
        if (f.data.error === "bad_since") position = null; // start over with a snapshot
        return;
      default: {
        const v = f.data && f.data.view;
        if (!v) return; // replayed frames carry no view; the snapshot before caught_up does
        if (f.type === "job_completed" || f.type === "job_failed" || f.type === "job_cancelled"
            || f.type === "job_abandoned" || !["running", "queued"].includes(v.status)) {
          running.delete(v.job);
          addFinished(v);
        } else {
          running.set(v.job, entryOf(v, f.ts));
        }
      }
    }
    render();
  }

  // The stage, and how far through its pieces it is where it reports them (the decode).
  const stageText = (v) => (v.stage || "–")
    + (v.stage && v.stage_pieces ? ` ${v.stage_pieces[0]}/${v.stage_pieces[1]}` : "");

  function addFinished(v) {
    finished.delete(v.job);
    const entries = [[v.job, v], ...finished];
    finished.clear();
    for (const [k, x] of entries.slice(0, MAX_FINISHED)) finished.set(k, x);
  }

  const fmtS = (s) => (s == null ? "–" : s < 60 ? s.toFixed(1) + " s"
    : s < 3600 ? Math.floor(s / 60) + " m " + String(Math.round(s % 60)).padStart(2, "0") + " s"
      : Math.floor(s / 3600) + " h " + String(Math.floor((s % 3600) / 60)).padStart(2, "0")
        + " m");
  const fmtB = (b) => (b == null ? "–" : b >= 1 << 30 ? (b / (1 << 30)).toFixed(2) + " GiB"
    : (b / (1 << 20)).toFixed(0) + " MiB");
  const fmtRate = (r) => (r == null || r <= 0 ? "–" : r >= 1 ? r.toFixed(2) + " it/s"
    : (1 / r).toFixed(1) + " s/it");
  const size = (v) => (v.width ? `${v.width}×${v.height}×${v.num_frames}` : "–");
  const pct = (x) => (x == null ? "–" : (x >= 0 ? "+" : "") + (100 * x).toFixed(1) + " %");

  // -- rows, kept and updated in place -----------------------------------------------------

  function setText(el, text) {
    if (el.textContent !== text) el.textContent = text; // untouched text keeps its selection
  }

  function rowFor(tbody, job, columns) {
    let tr = tbody.querySelector(`tr[data-job="${CSS.escape(job)}"]`);
    if (!tr) {
      tr = document.createElement("tr");
      tr.dataset.job = job;
      tr.tabIndex = 0;
      for (const [cls, label] of columns) {
        const td = document.createElement("td");
        td.className = cls;
        td.dataset.label = label;
        tr.appendChild(td);
      }
      tr.addEventListener("click", () => select(job));
      tr.addEventListener("keydown", (e) => {
        if (e.key === "Enter" || e.key === " ") { e.preventDefault(); select(job); }
      });
    }
    return tr;
  }

  function place(tbody, rows) {
    // Drop rows no longer listed, then put the listed ones in order, moving only what moved.
    const keep = new Set(rows);
    for (const tr of [...tbody.children]) if (!keep.has(tr)) tr.remove();
    let at = tbody.firstElementChild;
    for (const tr of rows) {
      if (tr !== at) tbody.insertBefore(tr, at);
      else at = at.nextElementSibling;
    }
  }

  const RUNNING_COLUMNS = [["job", "job"], ["model", "model"], ["size", "size"],
    ["stage", "stage"], ["step", "step"], ["progress", "progress"], ["eta", "ETA"],
    ["rate", "speed"], ["mem", "peak mem"]];
  const FINISHED_COLUMNS = [["job", "job"], ["model", "model"], ["size", "size"],
    ["status", "status"], ["duration", "duration"], ["etaerr", "ETA error"],
    ["rate", "speed"], ["mem", "peak mem"]];

  function progressOf(v) {
    const p = v.status === "completed" ? 1 : Math.max(0, Math.min(1, v.progress || 0));
    const shown = Math.max(shownProgress.get(v.job) || 0, Math.round(100 * p));
    shownProgress.set(v.job, shown);
    return shown;
  }

  function progressCell(td, v) {
    let bar = td.firstElementChild;
    if (!bar) {
      bar = document.createElement("div");
      bar.className = "bar";
      bar.setAttribute("role", "progressbar");
      bar.setAttribute("aria-valuemin", "0");
      bar.setAttribute("aria-valuemax", "100");
      bar.setAttribute("aria-label", `progress of job ${v.job}`);
      bar.append(document.createElement("div"), document.createElement("span"));
      td.appendChild(bar);
    }
    const shown = progressOf(v);
    if (bar.getAttribute("aria-valuenow") !== String(shown)) {
      bar.setAttribute("aria-valuenow", String(shown));
      bar.setAttribute("aria-valuetext", `${shown} %, ${v.stage || v.status}`);
      bar.firstElementChild.style.width = shown + "%";
      bar.lastElementChild.textContent = shown + " %";
    }
  }

  // A view as it arrived. An ETA is as of its own issue (``eta.ts``), and a frame sent for a
  // later event of the job (a step between two issues) carries the same one: it has already
  // aged by the frame's event time less ``eta.ts`` (both the worker's clock, so this browser's
  // clock may differ), and from then on by this page's clock. A snapshot's views carry no
  // event time: they age from their arrival.
  function entryOf(v, ts) {
    const lag = v.eta && typeof ts === "number" ? Math.max(0, ts - v.eta.ts) : 0;
    return { view: v, at: performance.now(), lag };
  }

  function etaText(entry) {
    const v = entry.view;
    if (!v.eta || v.eta.estimating) return "estimating";
    const gone = entry.lag + (performance.now() - entry.at) / 1000;
    const left = (x) => Math.max(0, x - gone);
    return `${fmtS(left(v.eta.remaining_s))} (${fmtS(left(v.eta.p10_s))}–`
      + `${fmtS(left(v.eta.p90_s))})`;
  }

  // A waiting job: its place in its queue and, once predicted, when it should start
  // (unix seconds from the server, counted down on this clock).
  function queuedText(v) {
    let text = v.queue_position ? `queued #${v.queue_position}` : "queued";
    if (v.queue && v.queue !== "default") text += ` in ${v.queue}`;
    const start = v.predicted_start;
    if (start) text += ` · starts in ~${fmtS(Math.max(0, start.at - Date.now() / 1000))}`;
    return text;
  }

  function render() {
    const rb = document.querySelector("#running tbody");
    const rows = [];
    for (const [job, entry] of running) {
      const v = entry.view;
      const tr = rowFor(rb, job, RUNNING_COLUMNS);
      const td = tr.children;
      setText(td[0], job);
      setText(td[1], v.model || "–");
      setText(td[2], size(v));
      setText(td[3], v.status === "queued" ? queuedText(v)
        : stageText(v) + (v.expert ? ` · ${v.expert.replace("_", " ")}` : ""));
      setText(td[4], v.steps ? `${v.step}/${v.steps}` : "–");
      progressCell(td[5], v);
      const eta = etaText(entry);
      setText(td[6], eta);
      td[6].classList.toggle("estimating", eta === "estimating");
      setText(td[7], fmtRate(v.steps_per_second));
      setText(td[8], fmtB(v.peak_memory_bytes));
      tr.setAttribute("aria-selected", String(job === selected));
      rows.push(tr);
    }
    place(rb, rows);
    const fb = document.querySelector("#finished tbody");
    const done = [];
    for (const [job, v] of finished) {
      const tr = rowFor(fb, job, FINISHED_COLUMNS);
      const td = tr.children;
      setText(td[0], job);
      setText(td[1], v.model || "–");
      setText(td[2], size(v));
      setText(td[3], v.status);
      td[3].className = "status status-" + v.status;
      setText(td[4], fmtS(v.duration_s));
      const err = v.eta_error;
      setText(td[5], err && err.mean_abs != null ? "±" + (100 * err.mean_abs).toFixed(1) + " %"
        + (err.before_start != null ? ` (start ${pct(err.before_start)})` : "") : "–");
      setText(td[6], fmtRate(v.steps_per_second));
      setText(td[7], fmtB(v.peak_memory_bytes));
      tr.setAttribute("aria-selected", String(job === selected));
      done.push(tr);
    }
    place(fb, done);
    setText($("running-count"), String(running.size));
    setText($("finished-count"), String(finished.size));
    $("running-empty").hidden = running.size > 0;
    $("finished-empty").hidden = finished.size > 0;
    setText($("position"), position === null ? "–" : String(position));
    details();
  }

  // -- the selected job's details ----------------------------------------------------------

  function select(job) {
    selected = selected === job ? null : job;
    history.replaceState(null, "", selected ? "#job=" + encodeURIComponent(selected)
      : location.pathname + location.search);
    render();
  }

  function field(dl, name, value, link) {
    const dt = document.createElement("dt");
    dt.textContent = name;
    const dd = document.createElement("dd");
    if (link) {
      const a = document.createElement("a");
      a.href = link;
      a.target = "_blank";
      a.rel = "noopener";
      a.textContent = value;
      dd.appendChild(a);
    } else {
      dd.textContent = value;
    }
    dl.append(dt, dd);
  }

  let detailsKey = null;

  function details() {
    const box = $("details");
    const entry = selected && running.get(selected);
    const v = entry ? entry.view : selected && finished.get(selected);
    if (!v) {
      box.hidden = true;
      detailsKey = null;
      return;
    }
    const key = JSON.stringify(v);
    box.hidden = false;
    if (key === detailsKey) return; // unchanged: leave it (and any selection in it) alone
    detailsKey = key;
    setText($("details-job"), v.job);
    const dl = $("details-fields");
    dl.replaceChildren();
    field(dl, "status", v.status);
    field(dl, "model", [v.model, v.variant !== v.model ? v.variant : null, v.task]
      .filter(Boolean).join(" · ") || "–");
    field(dl, "worker", v.worker || "–");
    field(dl, "expert", v.expert ? v.expert.replace("_", " ") : "–");
    field(dl, "stage", stageText(v));
    if (v.trace_id) {
      field(dl, "trace", v.trace_id,
            traceUrl ? traceUrl.split("{trace_id}").join(encodeURIComponent(v.trace_id)) : null);
    }
    const e = v.error;
    if (e) {
      field(dl, "error", `${e.type}${e.oom ? " (out of memory)" : ""}`);
      if (e.category) field(dl, "category", e.category);
      field(dl, "failed at", [e.stage, e.step != null ? `step ${e.step}` : null]
        .filter(Boolean).join(", ") || "–");
      field(dl, "message", e.message || "–");
      for (const s of e.suggestions || []) field(dl, "suggestion", s);
    }
    if (v.cancel_reason) field(dl, "cancelled", v.cancel_reason);
    if (v.abandon_reason) field(dl, "abandoned", v.abandon_reason);
  }

  $("details-close").addEventListener("click", () => select(selected));
  setInterval(() => { if (running.size) render(); }, 500); // the ETA counts down between frames
  connect();
  render();
})();
