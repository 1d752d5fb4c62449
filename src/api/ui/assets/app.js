import { startTalk, stopTalk } from "./talk.js";
// voicectl dashboard: fills the server-rendered frame from /api/v1 with the session cookie.
// Plain ES module, no dependencies, no build step. Data only ever reaches the page through
// textContent/attributes (h() below), never as markup.

const main = document.getElementById("main");
const isAdmin = document.body.dataset.role === "admin";

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") el.className = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

// The "Talk" button: a browser call to the logged-in tenant's agent.
function talkSection() {
  const status = h("p", { id: "talk-status" });
  const audio = h("audio", { id: "talk-audio", autoplay: true });
  if (isAdmin) {
    status.textContent = "Browser calls belong to a tenant: log in as one (voicectl open --tenant NAME) to talk.";
    return h("section", { id: "talk" }, h("h2", {}, "Talk in the browser"), status);
  }
  let live = null;
  const start = h("button", { type: "button", id: "talk-start" }, "Talk");
  const stop = h("button", { type: "button", id: "talk-stop", class: "danger", hidden: true }, "Hang up");
  start.addEventListener("click", async () => {
    start.disabled = true;
    status.textContent = "Connecting…";
    try {
      live = await startTalk(audio, "/api/v1/web-calls");
      status.replaceChildren("Connected: ", h("a", { href: `/ui/calls/${encodeURIComponent(live.id)}` }, live.id));
      start.hidden = true;
      stop.hidden = false;
    } catch (e) {
      status.textContent = `Could not start the call: ${e.message}`;
      start.disabled = false;
    }
  });
  stop.addEventListener("click", async () => {
    stop.disabled = true;
    if (live) await stopTalk(live);
    live = null;
    status.textContent = "Call ended.";
    stop.hidden = true;
    stop.disabled = false;
    start.hidden = false;
    start.disabled = false;
  });
  return h("section", { id: "talk" }, h("h2", {}, "Talk in the browser"), h("p", { class: "actions" }, start, stop), status, audio);
}

async function api(method, path, body) {
  const opts = { method, headers: { Accept: "application/json" }, credentials: "same-origin" };
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const r = await fetch(path.startsWith("/ui/") ? path : "/api/v1" + path, opts);
  if (r.status === 401) {
    location.href = "/ui/login";
    throw new Error("your session has ended");
  }
  const text = await r.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!r.ok) {
    const e = new Error((data && data.error && data.error.message) || `HTTP ${r.status}`);
    e.status = r.status;
    e.code = data && data.error && data.error.code;
    throw e;
  }
  return data;
}

const TERMINAL = new Set(["completed", "busy", "no_answer", "failed", "canceled"]);
const STATUSES = ["queued", "initiating", "ringing", "in_progress", "completed", "busy", "no_answer", "failed", "canceled"];

function badge(status) {
  return h("span", { class: `badge s-${status}`, "data-status": status }, status.replace("_", " "));
}

function when(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  if (isNaN(d)) return iso;
  // Today's times without the date: tables stay narrow enough for a phone.
  return d.toDateString() === new Date().toDateString() ? d.toLocaleTimeString() : d.toLocaleString();
}

function duration(s) {
  if (s === null || s === undefined) return "";
  const m = Math.floor(s / 60);
  return m ? `${m}m ${s % 60}s` : `${s}s`;
}

function errorBox(e) {
  return h("p", { class: "error", role: "alert" }, e.message || String(e));
}

function scroll(table) {
  return h("div", { class: "scroll" }, table);
}

function callRow(c) {
  return h(
    "tr",
    { "data-id": c.id },
    h("td", {}, h("a", { href: `/ui/calls/${encodeURIComponent(c.id)}` }, c.id)),
    isAdmin ? h("td", {}, c.tenant) : null,
    h("td", {}, c.direction),
    h("td", {}, c.to),
    h("td", {}, c.from),
    h("td", { class: "status" }, badge(c.status)),
    h("td", {}, when(c.created_at)),
    h("td", {}, duration(c.duration_seconds)),
  );
}

function callTable(calls) {
  return h(
    "table",
    { class: "calls" },
    h(
      "thead",
      {},
      h("tr", {}, ["Call", isAdmin ? "Tenant" : null, "Dir", "To", "From", "Status", "Created", "Duration"].filter(Boolean).map((t) => h("th", {}, t))),
    ),
    h("tbody", {}, calls.map(callRow)),
  );
}

// Follows one call's events (SSE). `on(name, data)` per event; returns the EventSource.
function follow(id, on) {
  const es = new EventSource(`/api/v1/calls/${encodeURIComponent(id)}/events`);
  for (const name of ["status", "transcript"]) {
    es.addEventListener(name, (ev) => {
      try {
        on(name, JSON.parse(ev.data));
      } catch {
        /* a malformed event is skipped */
      }
    });
  }
  // The server closes the stream when the call ends; do not reconnect to replay it.
  es.onerror = () => es.close();
  return es;
}

const PAGES = {
  // Live calls: the list refreshes every 2 s; each live call's status changes arrive at once
  // over its event stream (a few at a time: browsers allow ~6 connections per host).
  async live() {
    const summary = h("p", { class: "summary" });
    const tbody = h("tbody");
    const empty = h("p", { class: "empty" }, "No live calls right now.");
    const table = callTable([]);
    table.querySelector("tbody").replaceWith(tbody);
    main.append(summary, scroll(table), empty);
    const streams = new Map();
    const MAX_STREAMS = 4;
    async function refresh() {
      let calls;
      try {
        calls = (await api("GET", "/calls/active")).calls;
      } catch (e) {
        summary.replaceChildren(errorBox(e));
        return;
      }
      const ids = new Set(calls.map((c) => c.id));
      for (const row of [...tbody.children]) {
        if (!ids.has(row.dataset.id) && !row.dataset.ended) row.remove();
      }
      for (const c of calls) {
        const old = tbody.querySelector(`tr[data-id="${CSS.escape(c.id)}"]`);
        const row = callRow(c);
        if (old) old.replaceWith(row);
        else tbody.prepend(row);
        if (!streams.has(c.id) && streams.size < MAX_STREAMS) {
          streams.set(
            c.id,
            follow(c.id, (name, ev) => {
              if (name !== "status") return;
              const r = tbody.querySelector(`tr[data-id="${CSS.escape(c.id)}"]`);
              if (r) r.querySelector(".status").replaceChildren(badge(ev.status));
              if (TERMINAL.has(ev.status)) {
                streams.get(c.id)?.close();
                streams.delete(c.id);
                if (r) {
                  r.dataset.ended = "1";
                  setTimeout(() => r.remove(), 5000);
                }
              }
            }),
          );
        }
      }
      for (const [id, es] of streams) {
        if (!ids.has(id)) {
          es.close();
          streams.delete(id);
        }
      }
      empty.hidden = tbody.children.length > 0;
      summary.replaceChildren(`${calls.length} live · updated ${new Date().toLocaleTimeString()}`);
    }
    await refresh();
    setInterval(refresh, 2000);
    try {
      const a = await api("GET", "/calls/analytics?since=24h");
      main.append(
        h("h2", {}, "Last 24 hours"),
        h(
          "dl",
          { class: "kv" },
          h("dt", {}, "Calls"), h("dd", {}, a.total),
          h("dt", {}, "Success rate"), h("dd", {}, a.success_rate === null ? "–" : `${Math.round(a.success_rate * 100)}%`),
          h("dt", {}, "Average duration"), h("dd", {}, a.average_duration_seconds === null ? "–" : `${Math.round(a.average_duration_seconds)} s`),
        ),
      );
    } catch {
      /* analytics are a nicety */
    }
  },

  // History: filters and cursor paging live in the URL, so Back and bookmarks work.
  async history() {
    const q = new URLSearchParams(location.search);
    const form = h(
      "form",
      { class: "filters", method: "get", action: "/ui/calls" },
      h("label", {}, "Status ", h("select", { name: "status" }, h("option", { value: "" }, "any"), STATUSES.map((s) => h("option", { value: s, selected: q.get("status") === s }, s)))),
      isAdmin ? h("label", {}, "Tenant ", h("input", { name: "tenant", value: q.get("tenant") || "", size: 12 })) : null,
      h("label", {}, "Per page ", h("select", { name: "limit" }, ["25", "50", "100"].map((n) => h("option", { value: n, selected: (q.get("limit") || "25") === n }, n)))),
      h("button", { type: "submit" }, "Filter"),
    );
    main.append(form);
    const params = new URLSearchParams();
    for (const k of ["status", "tenant", "cursor"]) if (q.get(k)) params.set(k, q.get(k));
    params.set("limit", q.get("limit") || "25");
    try {
      const page = await api("GET", `/calls?${params}`);
      main.append(scroll(callTable(page.calls)));
      if (!page.calls.length) main.append(h("p", { class: "empty" }, "No calls match."));
      const pager = h("p", { class: "pager" });
      if (q.get("cursor")) {
        const first = new URLSearchParams(q);
        first.delete("cursor");
        pager.append(h("a", { href: `/ui/calls?${first}` }, "« Newest"), " ");
      }
      if (page.next_cursor) {
        const next = new URLSearchParams(q);
        next.set("cursor", page.next_cursor);
        pager.append(h("a", { href: `/ui/calls?${next}`, rel: "next" }, "Older »"));
      }
      main.append(pager);
    } catch (e) {
      main.append(errorBox(e));
    }
  },

  // One call: details, status events with times, per-turn latency, transcript; live calls
  // stream their transcript and status as they happen.
  async call() {
    const id = main.dataset.arg;
    let t;
    try {
      t = await api("GET", `/ui/api/calls/${encodeURIComponent(id)}/timeline`);
    } catch (e) {
      main.append(errorBox(e.status === 404 ? new Error("No such call.") : e));
      return;
    }
    main.querySelector("h1").textContent = `Call ${id}`;
    const details = h("dl", { class: "kv", id: "details" });
    const events = h("ol", { class: "events", id: "events" });
    const transcript = h("ol", { class: "transcript", id: "transcript" });
    const actions = h("p", { class: "actions" });
    function showCall(c) {
      details.replaceChildren(
        ...[
          ["Status", badge(c.status)],
          isAdmin ? ["Tenant", c.tenant] : null,
          ["Direction", c.direction],
          ["To", c.to],
          ["From", c.from],
          ["Engine", c.engine],
          ["Created", when(c.created_at)],
          ["Answered", when(c.started_at)],
          ["Ended", when(c.ended_at)],
          ["Duration", duration(c.duration_seconds)],
          ["End reason", c.end_reason || ""],
          c.error ? ["Error", c.error] : null,
          c.answered_by ? ["Answered by", c.answered_by] : null,
          c.twilio_call_sid ? ["Twilio SID", c.twilio_call_sid] : null,
          c.metadata && Object.keys(c.metadata).length ? ["Metadata", JSON.stringify(c.metadata)] : null,
        ]
          .filter(Boolean)
          .flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]),
      );
      // Rebuilt only when the status changes, so a button is not swapped under a click.
      if (actions.dataset.status === c.status) return;
      actions.dataset.status = c.status;
      actions.replaceChildren();
      if (!TERMINAL.has(c.status)) {
        actions.append(
          h(
            "button",
            {
              type: "button",
              class: "danger",
              onclick: async (ev) => {
                ev.target.disabled = true;
                try {
                  showCall(await api("POST", `/calls/${encodeURIComponent(id)}/end`));
                } catch (e) {
                  actions.append(errorBox(e));
                }
              },
            },
            c.status === "queued" ? "Cancel call" : "Hang up",
          ),
        );
      }
    }
    function showEvents(list) {
      events.replaceChildren(
        ...list.map((e) =>
          h(
            "li",
            {},
            h("time", {}, when(e.at)),
            " ",
            e.kind === "status" && e.data.status ? badge(e.data.status) : h("span", { class: "kind" }, e.kind),
            e.data.end_reason ? ` (${e.data.end_reason})` : "",
          ),
        ),
      );
    }
    function line(e) {
      return h("li", { class: `say ${e.speaker}` }, h("span", { class: "speaker" }, e.speaker), h("span", { class: "at" }, `${(e.at_ms / 1000).toFixed(1)} s`), h("span", { class: "text" }, e.text));
    }
    showCall(t.call);
    showEvents(t.events);
    const side = h("div", { class: "side" }, h("section", {}, h("h2", {}, "Details"), details), h("section", {}, h("h2", {}, "Timeline"), events));
    const talk = h("div", { class: "talk" });
    main.append(actions, h("div", { class: "call-grid" }, talk, side));
    const lat = t.call.latency;
    if (lat && (lat.greeting_ms !== null || (lat.turn_ms && lat.turn_ms.length))) {
      const turns = lat.turn_ms || [];
      side.append(
        h(
          "section",
          { id: "latency" },
          h("h2", {}, "Latency"),
          h(
            "dl",
            { class: "kv" },
            lat.greeting_ms !== null && lat.greeting_ms !== undefined ? [h("dt", {}, "Greeting"), h("dd", {}, `${Math.round(lat.greeting_ms)} ms`)] : [],
            turns.map((ms, i) => [h("dt", {}, `Turn ${i + 1}`), h("dd", {}, `${Math.round(ms)} ms`)]),
            (lat.barge_in_ms || []).map((ms, i) => [h("dt", {}, `Barge-in ${i + 1}`), h("dd", {}, `${Math.round(ms)} ms`)]),
          ),
        ),
      );
    }
    const a = t.call.analysis;
    if (a) {
      talk.append(
        h(
          "section",
          { id: "analysis" },
          h("h2", {}, "Analysis"),
          h(
            "dl",
            { class: "kv" },
            a.summary ? [h("dt", {}, "Summary"), h("dd", {}, a.summary)] : [],
            a.success !== undefined ? [h("dt", {}, "Success"), h("dd", {}, a.success ? "yes" : "no")] : [],
            a.data !== undefined ? [h("dt", {}, "Data"), h("dd", {}, h("pre", {}, JSON.stringify(a.data, null, 2)))] : [],
            a.error ? [h("dt", {}, "Error"), h("dd", {}, a.error)] : [],
          ),
        ),
      );
    }
    if (t.call.recording && t.call.recording.status === "recorded") {
      talk.append(
        h(
          "section",
          { id: "recording" },
          h("h2", {}, "Recording"),
          h("audio", { controls: "", preload: "none", src: `/api/v1/calls/${encodeURIComponent(id)}/recording` }),
        ),
      );
    }
    // Tool calls are transcript lines of their own (speaker "tool").
    talk.append(h("section", {}, h("h2", {}, "Transcript"), transcript));
    if (TERMINAL.has(t.call.status)) {
      transcript.replaceChildren(...t.transcript.map(line));
      if (!t.transcript.length) transcript.append(h("li", { class: "empty" }, "No transcript."));
      return;
    }
    // Live: the event stream replays the transcript so far, then follows it.
    follow(id, async (name, ev) => {
      if (name === "transcript") {
        transcript.append(line(ev));
      } else {
        try {
          const fresh = await api("GET", `/ui/api/calls/${encodeURIComponent(id)}/timeline`);
          showCall(fresh.call);
          showEvents(fresh.events);
          // The stream closes at the end of the call, possibly before the last batch of lines
          // reached it: the stored transcript is the complete one.
          if (TERMINAL.has(fresh.call.status)) transcript.replaceChildren(...fresh.transcript.map(line));
        } catch {
          /* keep what we show */
        }
      }
    });
  },

  // A test call from the dashboard: POST /api/v1/calls, then its page.
  async new_call() {
    const out = h("div");
    const field = (name, label, attrs = {}) => h("label", {}, label, h("input", { name, ...attrs }));
    const form = h(
      "form",
      { class: "stack", id: "new-call" },
      field("to", "To (E.164)", { required: true, placeholder: "+14155550123", inputmode: "tel", pattern: "\\+[1-9][0-9]{6,14}" }),
      field("from", "From (optional)", { placeholder: "caller ID" }),
      isAdmin ? field("tenant", "Tenant", { required: true }) : null,
      h("label", {}, "Engine", h("select", { name: "engine" }, ["", "scripted", "openai-realtime", "ultravox"].map((e) => h("option", { value: e }, e || "default")))),
      field("greeting", "Greeting (optional)"),
      h("label", {}, "System prompt (optional)", h("textarea", { name: "system_prompt", rows: 3 })),
      h("button", { type: "submit" }, "Call"),
    );
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const body = {};
      for (const [k, v] of new FormData(form)) if (v) body[k] = v;
      form.querySelector("button").disabled = true;
      try {
        const call = await api("POST", "/calls", body);
        location.href = `/ui/calls/${encodeURIComponent(call.id)}`;
      } catch (e) {
        out.replaceChildren(errorBox(e));
        form.querySelector("button").disabled = false;
      }
    });
    main.append(talkSection(), form, out);
  },

  // Campaigns (SPEC §7): create with a CSV upload (with progress), live progress,
  // pause/resume/cancel, results download. The list refreshes every 2 s.
  async campaigns() {
    const msg = h("div", { id: "campaign-msg" });
    const list = h("div", { id: "campaign-list" });
    const bar = h("progress", { id: "upload-progress", max: 100, value: 0, hidden: true });
    const field = (name, label, attrs = {}) => h("label", {}, label, h("input", { name, ...attrs }));
    const form = h(
      "form",
      { class: "stack", id: "new-campaign" },
      field("name", "Name", { required: true }),
      isAdmin ? field("tenant", "Tenant", { required: true }) : null,
      field("greeting", "Greeting (optional; {{column}} fills in a recipient's value)"),
      h("label", {}, "System prompt (optional)", h("textarea", { name: "system_prompt", rows: 2 })),
      field("start", "Calling hours from (recipient's local time)", { type: "time", value: "08:00" }),
      field("end", "to", { type: "time", value: "21:00" }),
      h("label", {}, "Recipients (CSV with a `to` column)", h("input", { name: "csv", type: "file", accept: ".csv,text/csv", required: true })),
      h("button", { type: "submit" }, "Create and upload"),
      bar,
    );
    // XMLHttpRequest rather than fetch: only it reports upload progress.
    function upload(id, file) {
      return new Promise((resolve, reject) => {
        const x = new XMLHttpRequest();
        x.open("POST", `/api/v1/campaigns/${encodeURIComponent(id)}/recipients`);
        x.setRequestHeader("Content-Type", "text/csv");
        x.setRequestHeader("Accept", "application/json");
        x.upload.onprogress = (e) => {
          if (e.lengthComputable) bar.value = Math.round((100 * e.loaded) / e.total);
        };
        x.onload = () => {
          let data = null;
          try {
            data = JSON.parse(x.responseText);
          } catch {
            data = null;
          }
          if (x.status >= 200 && x.status < 300) resolve(data);
          else reject(new Error((data && data.error && data.error.message) || `HTTP ${x.status}`));
        };
        x.onerror = () => reject(new Error("the upload failed"));
        x.send(file);
      });
    }
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const fd = new FormData(form);
      const file = fd.get("csv");
      const body = { name: fd.get("name"), paused: true, calling_hours: { start: fd.get("start"), end: fd.get("end") } };
      for (const k of ["tenant", "greeting", "system_prompt"]) if (fd.get(k)) body[k] = fd.get(k);
      form.querySelector("button").disabled = true;
      bar.hidden = false;
      bar.value = 0;
      try {
        // Created paused so no one is dialed before the whole list is in; resumed after.
        const c = await api("POST", "/campaigns", body);
        const r = await upload(c.id, file);
        await api("POST", `/campaigns/${encodeURIComponent(c.id)}/resume`);
        const rejected = (r.rejected || []).map((x) => h("li", {}, `row ${x.row}: ${x.to || ""} ${x.error}`));
        msg.replaceChildren(
          h("p", { class: "notice" }, `Campaign ${c.name}: ${r.accepted} accepted, ${r.duplicates} duplicates, ${r.suppressed} on the do-not-call list, ${rejected.length} rejected.`),
          rejected.length ? h("ul", { class: "rejected" }, rejected) : [],
        );
        form.reset();
        await load();
      } catch (e) {
        msg.replaceChildren(errorBox(e));
      } finally {
        form.querySelector("button").disabled = false;
        bar.hidden = true;
      }
    });
    const act = (c, what) =>
      h(
        "button",
        {
          type: "button",
          class: what === "cancel" ? "danger small" : "small",
          "data-action": what,
          onclick: async () => {
            if (what === "cancel" && !confirm(`Cancel campaign ${c.name}? Recipients not yet called are dropped.`)) return;
            try {
              await api("POST", `/campaigns/${encodeURIComponent(c.id)}/${what}`);
              await load();
            } catch (e) {
              msg.replaceChildren(errorBox(e));
            }
          },
        },
        what,
      );
    function row(c) {
      const p = c.progress;
      const final = p.done + p.failed + p.suppressed + p.canceled;
      const open = c.status === "running" || c.status === "paused";
      return h(
        "tr",
        { "data-id": c.id },
        h("td", {}, c.name),
        isAdmin ? h("td", {}, c.tenant) : null,
        h("td", { class: "status" }, h("span", { class: `badge k-${c.status}` }, c.status)),
        h("td", {}, h("progress", { max: Math.max(p.total, 1), value: final }), ` ${final} / ${p.total}`),
        h("td", { class: "counts" }, `${p.pending + p.scheduled} waiting · ${p.dialing + p.in_call} calling · ${p.done} done · ${p.failed} failed`),
        h("td", {}, `${p.calls_placed} placed · ${p.answered} answered · ${p.voicemail} voicemail`),
        h("td", {}, p.eta ? when(p.eta) : "–"),
        h(
          "td",
          { class: "actions" },
          c.status === "running" ? act(c, "pause") : null,
          c.status === "paused" ? act(c, "resume") : null,
          open ? act(c, "cancel") : null,
          h("a", { href: `/api/v1/campaigns/${encodeURIComponent(c.id)}/results.csv`, download: `${c.name}.csv` }, "results.csv"),
        ),
      );
    }
    async function load() {
      try {
        const { campaigns } = await api("GET", "/campaigns");
        const head = ["Name", isAdmin ? "Tenant" : null, "Status", "Progress", "Recipients", "Calls", "ETA", ""].filter((x) => x !== null);
        list.replaceChildren(
          campaigns.length
            ? scroll(h("table", {}, h("thead", {}, h("tr", {}, head.map((x) => h("th", {}, x)))), h("tbody", {}, campaigns.map(row))))
            : h("p", { class: "empty" }, "No campaigns yet."),
        );
      } catch (e) {
        list.replaceChildren(errorBox(e));
      }
    }
    main.append(msg, list, h("h2", {}, "New campaign"), form);
    await load();
    setInterval(load, 2000);
  },

  // Tenants and their keys (admin).
  async tenants() {
    const list = h("div");
    const msg = h("div");
    const add = h(
      "form",
      { class: "inline" },
      h("input", { name: "name", placeholder: "new tenant name", required: true, pattern: "[a-z0-9][a-z0-9-]*" }),
      h("input", { name: "company", placeholder: "company" }),
      h("button", { type: "submit" }, "Add tenant"),
    );
    add.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const body = {};
      for (const [k, v] of new FormData(add)) if (v) body[k] = v;
      try {
        await api("POST", "/tenants", body);
        add.reset();
        await load();
      } catch (e) {
        msg.replaceChildren(errorBox(e));
      }
    });
    main.append(msg, add, list);
    async function showKeys(name, cell) {
      const { keys } = await api("GET", `/tenants/${encodeURIComponent(name)}/api-keys`);
      const make = h("button", { type: "button" }, "New key");
      make.addEventListener("click", async () => {
        try {
          const k = await api("POST", `/tenants/${encodeURIComponent(name)}/api-keys`, { name: "dashboard" });
          msg.replaceChildren(h("p", { class: "notice" }, `New key for ${name} (shown once): `, h("code", {}, k.key)));
          await showKeys(name, cell);
        } catch (e) {
          msg.replaceChildren(errorBox(e));
        }
      });
      cell.replaceChildren(
        h(
          "ul",
          { class: "keys" },
          keys.map((k) =>
            h(
              "li",
              {},
              h("code", {}, k.id),
              ` ${k.name || ""} · ${k.status}`,
              k.status === "active"
                ? h(
                    "button",
                    {
                      type: "button",
                      class: "danger small",
                      onclick: async () => {
                        if (!confirm(`Revoke key ${k.id}?`)) return;
                        try {
                          await api("DELETE", `/api-keys/${encodeURIComponent(k.id)}`);
                          await showKeys(name, cell);
                        } catch (e) {
                          msg.replaceChildren(errorBox(e));
                        }
                      },
                    },
                    "Revoke",
                  )
                : null,
            ),
          ),
        ),
        make,
      );
    }
    async function load() {
      try {
        const { tenants } = await api("GET", "/tenants");
        const rows = tenants.map((t) => {
          const cell = h("td", { class: "keys-cell" }, h("button", { type: "button", onclick: () => showKeys(t.name, cell).catch((e) => msg.replaceChildren(errorBox(e))) }, "Show keys"));
          return h("tr", {}, h("td", {}, t.name), h("td", {}, t.company), h("td", {}, (t.numbers || []).join(", ")), h("td", {}, t.engine || "default"), h("td", {}, t.max_concurrent_calls ?? "–"), cell);
        });
        list.replaceChildren(
          scroll(h("table", {}, h("thead", {}, h("tr", {}, ["Name", "Company", "Numbers", "Engine", "Max calls", "Keys"].map((x) => h("th", {}, x)))), h("tbody", {}, rows))),
        );
        if (!tenants.length) list.append(h("p", { class: "empty" }, "No tenants yet."));
      } catch (e) {
        list.replaceChildren(errorBox(e));
      }
    }
    await load();
  },

  async certs() {
    try {
      const s = await api("GET", "/tls/status");
      const c = s.certificate;
      const unix = (t) => (t ? new Date(t * 1000).toLocaleString() : "–");
      main.append(
        h(
          "dl",
          { class: "kv" },
          h("dt", {}, "Mode"), h("dd", {}, s.mode),
          h("dt", {}, "Domains"), h("dd", {}, (s.domains || []).join(", ")),
          h("dt", {}, "Serving"), h("dd", {}, s.serving_fallback ? "self-signed fallback" : "issued certificate"),
          c ? [h("dt", {}, "Certificate"), h("dd", {}, JSON.stringify(c))] : [],
          h("dt", {}, "Renewal due"), h("dd", {}, unix(s.renew_at)),
          h("dt", {}, "Last success"), h("dd", {}, unix(s.last_success)),
          h("dt", {}, "Last error"), h("dd", {}, s.last_error || "none"),
        ),
      );
    } catch (e) {
      main.append(e.code === "tls_off" ? h("p", { class: "empty" }, "TLS is off on this server (tls.mode = \"off\").") : errorBox(e));
    }
  },

  async system() {
    try {
      const s = await api("GET", "/status");
      main.append(
        h(
          "dl",
          { class: "kv" },
          h("dt", {}, "Version"), h("dd", { id: "version" }, s.version),
          h("dt", {}, "State"), h("dd", {}, s.state),
          h("dt", {}, "Up since"), h("dd", {}, `${when(s.started_at)} (${duration(s.uptime_seconds)})`),
          h("dt", {}, "Live calls"), h("dd", {}, s.calls.active),
          h("dt", {}, "Queued calls"), h("dd", {}, s.calls.queued),
          h("dt", {}, "Media sockets"), h("dd", {}, s.websockets),
        ),
        h("h2", {}, "Engine circuits"),
        s.engines.length
          ? scroll(h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "Engine"), h("th", {}, "Circuit"))), h("tbody", {}, s.engines.map((e) => h("tr", {}, h("td", {}, e.engine), h("td", {}, h("span", { class: `badge c-${e.circuit}` }, e.circuit)))))))
          : h("p", { class: "empty" }, "No engine used yet."),
        h("h2", {}, "Certificates"),
        s.certificates.length
          ? h("ul", {}, s.certificates.map((c) => h("li", {}, `${c.domain}: ${c.days_left} days left (${when(c.not_after)})`)))
          : h("p", { class: "empty" }, "None."),
      );
    } catch (e) {
      main.append(errorBox(e));
    }
  },
};

const render = PAGES[main.dataset.page];
if (render) {
  render().catch((e) => main.append(errorBox(e)));
}
