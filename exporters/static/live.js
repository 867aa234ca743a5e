// wantel live page: one WebSocket to ws/progress (protocol: docs/websocket.md), no build step.
// It keeps the last position it saw and, after a drop, reconnects with ?since=POSITION, so the
// server replays what was missed, sends a fresh snapshot, then `caught_up`.
"use strict";
(function () {
  const params = new URLSearchParams(location.search);
  const token = params.get("token");
  const onlyJob = params.get("job");
  const running = new Map(); // job -> {view, at}: `at` = performance.now() when the ETA arrived
  const finished = new Map(); // job -> view, newest first by ended_ts
  let position = null; // the last log position seen (frames, snapshots, caught_up)
  let retry = 500;
  const MAX_FINISHED = 20;
  const $ = (id) => document.getElementById(id);

  function wsUrl() {
    const url = new URL("ws/progress", location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    url.search = "";
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
        for (const v of f.data.running) running.set(v.job, { view: v, at: performance.now() });
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
            || !["running", "queued"].includes(v.status)) {
          running.delete(v.job);
          addFinished(v);
        } else {
          running.set(v.job, { view: v, at: performance.now() });
        }
      }
    }
    render();
  }

  function addFinished(v) {
    finished.delete(v.job);
    const entries = [[v.job, v], ...finished];
    finished.clear();
    for (const [k, x] of entries.slice(0, MAX_FINISHED)) finished.set(k, x);
  }

  const fmtS = (s) => (s == null ? "–" : s < 60 ? s.toFixed(1) + " s"
    : Math.floor(s / 60) + " m " + Math.round(s % 60) + " s");
  const fmtB = (b) => (b == null ? "–" : b >= 1 << 30 ? (b / (1 << 30)).toFixed(2) + " GiB"
    : (b / (1 << 20)).toFixed(0) + " MiB");
  const fmtRate = (r) => (r == null ? "–" : r.toFixed(r < 10 ? 2 : 1));
  const size = (v) => (v.width ? `${v.width}×${v.height}×${v.num_frames}` : "–");
  const pct = (x) => (x == null ? "–" : (x >= 0 ? "+" : "") + (100 * x).toFixed(1) + " %");

  function cell(tr, text, cls) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    tr.appendChild(td);
    return td;
  }

  function etaText(entry) {
    const v = entry.view;
    if (!v.eta || v.eta.estimating) return ["estimating", "estimating"];
    const gone = (performance.now() - entry.at) / 1000;
    const left = (x) => Math.max(0, x - gone);
    return [`${fmtS(left(v.eta.remaining_s))} (${fmtS(left(v.eta.p10_s))}–`
      + `${fmtS(left(v.eta.p90_s))})`, "eta"];
  }

  function render() {
    const rb = document.querySelector("#running tbody");
    rb.replaceChildren();
    for (const [job, entry] of running) {
      const v = entry.view;
      const tr = document.createElement("tr");
      tr.dataset.job = job;
      cell(tr, job, "job");
      cell(tr, v.model || "–");
      cell(tr, size(v));
      cell(tr, v.status === "queued" ? "queued" : v.stage || "–", "stage");
      cell(tr, v.steps ? `${v.step}/${v.steps}` : "–", "step");
      const td = cell(tr, "");
      const bar = document.createElement("div");
      bar.className = "bar";
      const fill = document.createElement("div");
      const p = Math.max(0, Math.min(1, v.progress || 0));
      fill.style.width = (100 * p).toFixed(1) + "%";
      const label = document.createElement("span");
      label.textContent = (100 * p).toFixed(0) + " %";
      bar.append(fill, label);
      td.appendChild(bar);
      const [text, cls] = etaText(entry);
      cell(tr, text, cls);
      cell(tr, fmtRate(v.steps_per_second));
      cell(tr, fmtB(v.peak_memory_bytes));
      rb.appendChild(tr);
    }
    const fb = document.querySelector("#finished tbody");
    fb.replaceChildren();
    for (const [job, v] of finished) {
      const tr = document.createElement("tr");
      tr.dataset.job = job;
      cell(tr, job, "job");
      cell(tr, v.model || "–");
      cell(tr, size(v));
      cell(tr, v.status, "status status-" + v.status);
      cell(tr, fmtS(v.duration_s));
      const err = v.eta_error;
      cell(tr, err && err.mean_abs != null ? "±" + (100 * err.mean_abs).toFixed(1) + " %"
        + (err.before_start != null ? ` (start ${pct(err.before_start)})` : "") : "–");
      cell(tr, fmtRate(v.steps_per_second));
      cell(tr, fmtB(v.peak_memory_bytes));
      fb.appendChild(tr);
    }
    $("running-count").textContent = String(running.size);
    $("finished-count").textContent = String(finished.size);
    $("running-empty").hidden = running.size > 0;
    $("finished-empty").hidden = finished.size > 0;
    $("position").textContent = position === null ? "–" : String(position);
  }

  setInterval(() => { if (running.size) render(); }, 500); // the ETA counts down between frames
  connect();
  render();
})();
