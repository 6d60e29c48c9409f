// imagegw console: plain JavaScript against the gateway's own admin API (no build step, no CDN, works offline).
"use strict";

const KEY = "imagegw.adminKey";
const REFRESH_MS = 5000;
let timer = null;

// --- small helpers --------------------------------------------------------------------------------------------
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}
function put(el, ...kids) {  // replaceChildren, minus the nulls of optional parts
  el.replaceChildren(...kids.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false));
}
const fmt = {
  usd: (v) => (v === null || v === undefined ? "–" : "$" + Number(v).toFixed(v < 0.01 ? 5 : 4)),
  ms: (v) => (v === null || v === undefined ? "–" : Math.round(v).toLocaleString() + " ms"),
  pct: (v) => (v === null || v === undefined ? "–" : (100 * v).toFixed(1) + "%"),
  when: (ts) => new Date(ts * 1000).toLocaleString(),
};
function table(headers, rows, caption) {
  return h("table", {},
    caption ? h("caption", { class: "muted" }, caption) : null,
    h("thead", {}, h("tr", {}, headers.map((x) => h("th", { scope: "col", class: x.num ? "num" : null }, x.label || x)))),
    h("tbody", {}, rows.map((r) => h("tr", {}, r.map((c, i) => h("td", { class: headers[i].num ? "num" : null }, c))))));
}

async function api(method, path, body, { raw = false } = {}) {
  const headers = { authorization: "Bearer " + sessionStorage.getItem(KEY) };
  if (body !== undefined) headers["content-type"] = raw ? "application/yaml" : "application/json";
  const r = await fetch(path, { method, headers, body: body === undefined ? undefined : raw ? body : JSON.stringify(body) });
  const text = await r.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = { text }; }
  if (r.status === 401 || r.status === 403) { signOut("That key was refused: " + ((data && data.error && data.error.message) || r.status)); throw new Error("unauthorized"); }
  if (!r.ok) { const e = new Error((data && data.error && data.error.message) || ("HTTP " + r.status)); e.status = r.status; e.data = data; throw e; }
  return data;
}

// --- sign-in and routing --------------------------------------------------------------------------------------
function signOut(message) {
  sessionStorage.removeItem(KEY);
  clearInterval(timer);
  document.getElementById("nav").hidden = true;
  put(document.getElementById("page"), );
  document.getElementById("signin").hidden = false;
  document.getElementById("signin-error").textContent = message || "";
  document.getElementById("key").focus();
}

async function signIn(event) {
  event.preventDefault();
  sessionStorage.setItem(KEY, document.getElementById("key").value.trim());
  try {
    await api("GET", "/admin/policy/history");
  } catch (e) {
    if (e.message !== "unauthorized") signOut("The gateway did not answer: " + e.message);
    return;
  }
  document.getElementById("key").value = "";
  show();
}

const PAGES = { overview, decisions, decision, spend, policy };

function show() {
  if (!sessionStorage.getItem(KEY)) return signOut();
  document.getElementById("signin").hidden = true;
  document.getElementById("nav").hidden = false;
  clearInterval(timer);
  const [, name = "overview", arg] = location.hash.split("/");
  for (const a of document.querySelectorAll("nav a")) {
    if (a.dataset.page === (name === "decision" ? "decisions" : name)) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  const page = document.getElementById("page");
  put(page, h("p", { class: "muted" }, "Loading…"));
  (PAGES[name] || overview)(page, arg && decodeURIComponent(arg)).catch((e) => {
    if (e.message !== "unauthorized") put(page, h("p", { class: "error", role: "alert" }, "Could not load: " + e.message));
  });
}

// --- overview ---------------------------------------------------------------------------------------------------
const HEALTH = { ok: "ok", warming: "warming", degraded: "warming" };

async function overview(page) {
  const paused = { value: false };
  const updated = h("span", { class: "muted", "aria-live": "off" });
  const pause = h("button", { type: "button", class: "secondary", onclick: () => {
    paused.value = !paused.value; pause.textContent = paused.value ? "Resume live updates" : "Pause live updates"; } },
    "Pause live updates");
  const body = h("div", {});
  put(page, h("h2", {}, "Overview"), h("div", { class: "toolbar" }, pause, updated), body);
  const draw = async () => {
    if (paused.value) return;
    const since = Date.now() / 1000 - 3600;
    const [backends, stats, records] = await Promise.all([
      api("GET", "/v1/backends"), api("GET", "/admin/stats?window_s=3600"), recentRecords(since, 5000)]);
    put(body, backendTable(backends), statsTable(stats), charts(records, since));
    updated.textContent = "Updated " + new Date().toLocaleTimeString() + " · refreshes every " + REFRESH_MS / 1000 + " s";
  };
  await draw();
  timer = setInterval(() => draw().catch(() => {}), REFRESH_MS);
}

function backendTable(backends) {
  const rows = backends.data.map((b) => {
    const ej = b.ejection || {}, pacing = ej.pacing || {};
    const state = [ej.state && ej.state !== "serving" ? h("span", { class: "bad" }, ej.state + (ej.reason ? ": " + ej.reason : ""))
      : h("span", { class: "ok" }, "in service" + (ej.share !== undefined && ej.share < 1 ? ` (${fmt.pct(ej.share)} of traffic)` : "")),
      pacing.paced ? [h("br"), h("span", { class: "warming" }, "paced: " + (pacing.reason || ""))] : null,
      pacing.requests_per_minute ? [h("br"), h("span", { class: "muted" }, pacing.requests_per_minute + " requests/min allowed")] : null];
    const pool = b.pool ? [
      `GPU use: ${b.pool.busy_workers} of ${b.pool.workers} worker(s) busy`, h("br"),
      "queue " + b.pool.work_ahead_s + " s of work ahead", h("br"), "batches of " + b.pool.typical_batch + " on average",
      h("br"), (b.pool.has_headroom ? "idle capacity now" : "busy"), h("br"),
      "amortized " + fmt.usd(b.pool.cost_per_image_usd.amortized) + " · marginal " + fmt.usd(b.pool.cost_per_image_usd.marginal),
    ] : "–";
    return [h("strong", {}, b.name), b.kind, h("span", { class: HEALTH[b.health] || "bad" }, b.health), b.detail || "",
      state, fmt.ms(b.predicted_latency_ms.p50) + " / " + fmt.ms(b.predicted_latency_ms.p95), fmt.usd(b.cost_per_image_usd), h("span", {}, pool)];
  });
  return h("section", { "aria-labelledby": "backends-title" }, h("h3", { id: "backends-title" }, `Backends (${backends.data.length})`),
    table(["Backend", "Kind", "Health", "Detail", "Breaker / pacing", { label: "Predicted p50 / p95", num: true },
      { label: "Live cost per image", num: true }, "Pool"], rows, "Predictions and prices for a 1024x1024 image, policy version " + backends.policy_version));
}

function statsTable(stats) {
  const rows = stats.backends.map((s) => [s.backend, s.requests, s.ok, s.images, fmt.usd(s.cost_per_image_usd),
    fmt.ms(s.latency_ms.p50) + " / " + fmt.ms(s.latency_ms.p95), fmt.pct(s.sla_attainment), s.fallbacks]);
  return h("section", {}, h("h3", {}, "Last hour, by backend"),
    rows.length ? table(["Backend", { label: "Requests", num: true }, { label: "OK", num: true }, { label: "Images", num: true },
      { label: "Cost per image", num: true }, { label: "p50 / p95", num: true }, { label: "SLA met", num: true }, { label: "Fallbacks", num: true }], rows)
      : h("p", { class: "muted" }, "No requests in the last hour."));
}

async function recentRecords(since, max) {
  let out = [], cursor = null;
  while (out.length < max) {
    const q = new URLSearchParams({ since: String(since), limit: "1000" });
    if (cursor) q.set("cursor", cursor);
    const page = await api("GET", "/admin/audit?" + q);
    out = out.concat(page.data);
    cursor = page.next_cursor;
    if (!cursor) break;
  }
  return out;
}

const COLORS = ["#0b57a4", "#c2410c", "#15803d", "#7e22ce", "#b91c1c", "#0f766e", "#a16207", "#475569"];

function charts(records, since) {
  const buckets = 12, width = 300;
  const series = (keyOf, valueOf) => {
    const groups = {};
    for (const r of records) {
      const k = keyOf(r) || "none", i = Math.min(buckets - 1, Math.floor((r.ts - since) / width));
      if (i < 0) continue;
      (groups[k] = groups[k] || Array.from({ length: buckets }, () => []))[i].push(r);
    }
    return Object.fromEntries(Object.entries(groups).map(([k, bs]) => [k, bs.map(valueOf)]));
  };
  const rate = (rs) => rs.length / width;
  const sla = (rs) => { const j = rs.filter((r) => r.sla_met !== null && r.sla_met !== undefined); return j.length ? j.filter((r) => r.sla_met).length / j.length : null; };
  const cpi = (rs) => { const imgs = rs.reduce((a, r) => a + (r.images || 0), 0); return imgs ? rs.reduce((a, r) => a + (r.cost_usd || 0), 0) / imgs : null; };
  const byBackend = (r) => r.backend, byTier = (r) => (r.decision && r.decision.tier) || (r.request && r.request.tier);
  return h("section", {}, h("h3", {}, "Last hour, in 5-minute steps"), h("div", { class: "grid" },
    chart("Requests/s by backend", series(byBackend, rate), (v) => v.toFixed(2)),
    chart("SLA attainment by backend", series(byBackend, sla), fmt.pct),
    chart("Cost per image by backend", series(byBackend, cpi), fmt.usd),
    chart("Requests/s by tier", series(byTier, rate), (v) => v.toFixed(2)),
    chart("SLA attainment by tier", series(byTier, sla), fmt.pct),
    chart("Cost per image by tier", series(byTier, cpi), fmt.usd)));
}

function chart(title, data, label) {
  const W = 360, H = 140, pad = 30, names = Object.keys(data);
  const values = names.flatMap((n) => data[n]).filter((v) => v !== null);
  const max = Math.max(1e-9, ...values);
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`); svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", title + ": " + (names.length ? names.map((n) => n + " latest " + label(data[n].filter((v) => v !== null).slice(-1)[0] ?? 0)).join(", ") : "no data"));
  const add = (tag, attrs, text) => { const el = document.createElementNS(ns, tag); for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v); if (text) el.textContent = text; svg.append(el); };
  add("line", { x1: pad, y1: H - 20, x2: W - 5, y2: H - 20, stroke: "#c9d1da" });
  add("text", { x: 2, y: 12 }, label(max)); add("text", { x: 2, y: H - 22 }, label(0));
  add("text", { x: pad, y: H - 5 }, "-60 min"); add("text", { x: W - 30, y: H - 5 }, "now");
  names.forEach((n, s) => {
    const pts = data[n].map((v, i) => (v === null ? null : [pad + i * (W - pad - 5) / 11, H - 20 - (v / max) * (H - 40)])).filter(Boolean);
    if (pts.length > 1) add("polyline", { points: pts.map((p) => p.join(",")).join(" "), fill: "none", stroke: COLORS[s % COLORS.length], "stroke-width": 2 });
    for (const [x, y] of pts) add("circle", { cx: x, cy: y, r: 2.5, fill: COLORS[s % COLORS.length] });
  });
  return h("div", { class: "panel" }, h("h3", {}, title), svg,
    h("div", { class: "legend" }, names.length ? names.map((n, s) => h("span", {}, h("span", { class: "swatch", style: "background:" + COLORS[s % COLORS.length] }), n)) : h("span", { class: "muted" }, "no data")));
}

// --- decisions ----------------------------------------------------------------------------------------------------
async function decisions(page) {
  const field = (name, label, attrs = {}) => h("div", {}, h("label", { for: "f-" + name }, label), h("input", { id: "f-" + name, name, ...attrs }));
  const form = h("form", { class: "filters", "aria-label": "Filter decisions" },
    field("since_min", "Last (minutes)", { type: "number", min: "1", value: "60" }),
    field("tenant", "Tenant"), field("backend", "Backend"),
    h("div", {}, h("label", { for: "f-outcome" }, "Outcome"), h("select", { id: "f-outcome", name: "outcome" },
      h("option", { value: "" }, "any"), h("option", { value: "ok" }, "ok"), h("option", { value: "error" }, "error"))),
    h("div", {}, h("label", { for: "f-sla" }, "SLA"), h("select", { id: "f-sla", name: "sla_missed" },
      h("option", { value: "" }, "any"), h("option", { value: "true" }, "missed"), h("option", { value: "false" }, "met"))),
    field("policy_version", "Policy version", { type: "number", min: "1" }),
    h("button", { type: "submit" }, "Show"));
  const results = h("div", {});
  put(page, h("h2", {}, "Decisions"), form, results);
  const load = async (cursor) => {
    const f = new FormData(form), q = new URLSearchParams({ limit: "50" });
    q.set("since", String(Date.now() / 1000 - 60 * Number(f.get("since_min") || 60)));
    for (const k of ["tenant", "backend", "outcome", "sla_missed", "policy_version"]) if (f.get(k)) q.set(k, f.get(k));
    if (cursor) q.set("cursor", cursor);
    const data = await api("GET", "/admin/audit?" + q);
    const rows = data.data.map((r) => [h("a", { href: "#/decision/" + encodeURIComponent(r.id) }, fmt.when(r.ts)), r.tenant || "–",
      r.backend || "–", h("span", { class: r.outcome === "ok" ? "ok" : "bad" }, r.outcome + " " + r.status),
      fmt.ms(r.latency_ms), r.sla_met === null || r.sla_met === undefined ? "–" : r.sla_met ? "met" : h("span", { class: "bad" }, "missed"),
      fmt.usd(r.cost_usd), "v" + r.policy_version, (r.decision && r.decision.reason) || (r.error && r.error.message) || ""]);
    put(results, rows.length ? table(["When (open)", "Tenant", "Backend", "Outcome", { label: "Latency", num: true }, "SLA",
      { label: "Cost", num: true }, "Policy", "Why"], rows) : h("p", { class: "muted" }, "No decisions match."),
      data.next_cursor ? h("button", { type: "button", class: "secondary", onclick: () => load(data.next_cursor) }, "Older") : null);
  };
  form.addEventListener("submit", (e) => { e.preventDefault(); load().catch((err) => put(results, h("p", { class: "error" }, err.message))); });
  await load();
}

const REASONS = {
  sla_miss: "would probably finish after the deadline", cost_ceiling: "would cost more than the request allows",
  quality_below_tier: "is below the quality this tier needs", rule_deny: "is excluded by a policy rule",
  size_unsupported: "cannot make this size", n_unsupported: "cannot make this many images at once",
  unconfigured: "is not configured or not running", unhealthy: "is unhealthy right now (failing, or taken out of service)",
  not_ready: "is still starting up", disabled: "is turned off in the policy",
  not_requested_model: "is not the backend or model the request named", model_unavailable: "does not offer the model asked for",
  not_in_policy: "is not in the policy",
  reserved: "is keeping its room for requests only it can serve, and another backend can serve this one in time",
};

async function decision(page, id) {
  const r = await api("GET", "/admin/audit/" + encodeURIComponent(id));
  const d = r.decision || {};
  const story = r.outcome === "replayed"
    ? `This request (tenant ${r.tenant}) repeated an earlier one with the same Idempotency-Key: the first answer` +
      ` (decision ${r.replay_of || "?"}) was sent again; nothing ran and nothing was charged.`
    : r.outcome === "ok"
    ? `This request (tenant ${r.tenant}) was served by ${r.backend} in ${fmt.ms(r.latency_ms)} for ${fmt.usd(r.cost_usd)}` +
      (d.sla_ms ? `, against a deadline of ${fmt.ms(d.sla_ms)}: the SLA was ${r.sla_met ? "met" : "missed"}.` : ".") +
      (d.chosen && d.chosen !== r.backend ? ` The first choice, ${d.chosen}, failed, so the gateway fell back.` : "") +
      (d.reason ? ` Why ${d.chosen}: ${d.reason}.` : "")
    : `This request (tenant ${r.tenant}) failed with ${r.status}: ${(r.error && r.error.message) || r.outcome}.` +
      (d.reason ? ` The routing said: ${d.reason}.` : "");
  const cands = (d.candidates || []).map((c, i) => [h("strong", {}, c.backend), c.backend === d.chosen ? h("span", { class: "ok" }, "chosen") : (i === 0 ? "first choice" : "fallback #" + i),
    fmt.ms(c.predicted_latency_ms), fmt.usd(c.predicted_cost_usd), c.quality, c.probe ? "a probe: its shape had never been measured" : c.preempts ? "goes ahead of the pool's flexible work" : ""]);
  const rejected = (d.rejected || []).map((x) => [h("strong", {}, x.backend), "not considered: it " + (REASONS[x.reason] || x.reason), x.detail || ""]);
  const attempts = (r.attempts || []).map((a, i) => [String(i + 1), a.backend + (a.hedge ? " (hedge)" : ""), a.outcome, [a.error_class || "", a.error ? h("br") : null, a.error || ""], fmt.ms(a.latency_ms)]);
  put(page, h("p", {}, h("a", { href: "#/decisions" }, "← Decisions")), h("h2", {}, "Decision " + r.id),
    h("p", { class: "story", id: "story" }, story),
    h("h3", {}, "Candidates, best first"), cands.length ? table(["Backend", "Role", { label: "Predicted latency", num: true }, { label: "Predicted cost", num: true }, { label: "Quality", num: true }, "Note"], cands) : h("p", { class: "muted" }, "None: nothing could serve it."),
    h("h3", {}, "Rejected"), rejected.length ? table(["Backend", "Why", "Detail"], rejected) : h("p", { class: "muted" }, "No backend was rejected."),
    h("h3", {}, "Attempts"), attempts.length ? table(["#", "Backend", "Outcome", "Error", { label: "Took", num: true }], attempts) : h("p", { class: "muted" }, "No attempt was made."),
    h("details", {}, h("summary", {}, "The whole record (JSON)"), h("pre", {}, JSON.stringify(r, null, 2))));
}

// --- spend ----------------------------------------------------------------------------------------------------------
async function spend(page) {
  const data = await api("GET", "/admin/spend");
  const bar = (used, limit) => limit ? h("div", { class: "bar", role: "img", "aria-label": fmt.pct(used / limit) + " of the limit" },
    h("span", { class: used > limit ? "over" : null, style: "width:" + Math.min(100, 100 * used / limit) + "%" })) : h("span", { class: "muted" }, "no limit");
  const rows = data.data.map((t) => [t.tenant, fmt.usd(t.day_usd), t.daily_limit_usd ? fmt.usd(t.daily_limit_usd) : "–", bar(t.day_usd, t.daily_limit_usd),
    fmt.usd(t.month_usd), t.monthly_limit_usd ? fmt.usd(t.monthly_limit_usd) : "–", bar(t.month_usd, t.monthly_limit_usd)]);
  put(page, h("h2", {}, "Spend"), h("p", { class: "muted" }, data.shared ? "Totals shared by every replica (Redis)." : "This replica's totals."),
    rows.length ? table(["Tenant", { label: "Today", num: true }, { label: "Daily limit", num: true }, "", { label: "This month", num: true }, { label: "Monthly limit", num: true }, ""], rows)
      : h("p", { class: "muted" }, "Nothing spent yet."));
}

// --- policy ---------------------------------------------------------------------------------------------------------
function lineDiff(a, b) {
  const x = a.split("\n"), y = b.split("\n"), n = x.length, m = y.length;
  const L = Array.from({ length: n + 1 }, () => new Uint16Array(m + 1));
  for (let i = n - 1; i >= 0; i--) for (let j = m - 1; j >= 0; j--) L[i][j] = x[i] === y[j] ? L[i + 1][j + 1] + 1 : Math.max(L[i + 1][j], L[i][j + 1]);
  const out = []; let i = 0, j = 0;
  while (i < n && j < m) { if (x[i] === y[j]) { i++; j++; } else if (L[i + 1][j] >= L[i][j + 1]) out.push(["del", x[i++]]); else out.push(["add", y[j++]]); }
  while (i < n) out.push(["del", x[i++]]); while (j < m) out.push(["add", y[j++]]);
  return out;
}

async function policy(page) {
  const [current, history] = await Promise.all([api("GET", "/admin/policy"), api("GET", "/admin/policy/history")]);
  const text = h("textarea", { id: "policy-text", spellcheck: "false", "aria-describedby": "policy-status" }, current.yaml);
  const status = h("div", { id: "policy-status", "aria-live": "polite" });
  const diff = h("pre", { class: "diff", id: "policy-diff", "aria-label": "Changes against the running policy" });
  const sim = h("div", { id: "sim-result" });
  const note = h("input", { id: "apply-note", placeholder: "why (kept in the history)" });
  const window_ = h("select", { id: "sim-window" }, h("option", { value: "3600" }, "the last hour of audited traffic"),
    h("option", { value: "86400" }, "the last day of audited traffic"), h("option", { value: "synthetic" }, "a synthetic diurnal trace (10 min)"));
  const applyBtn = h("button", { type: "button", id: "apply", disabled: true }, "Apply");
  let valid = false, seq = 0;
  const validate = async () => {
    const mine = ++seq;
    try {
      const v = await api("POST", "/admin/policy/validate", text.value, { raw: true });
      if (mine !== seq) return;
      valid = v.valid;
      put(status, v.valid ? h("p", { class: "ok" }, "Valid" + (v.fingerprint === current.fingerprint ? " (same as the running policy)" : "")) : h("p", { class: "bad" }, "Invalid:"),
        issues(v.errors, "error"), issues(v.warnings, "warning"));
    } catch (e) {
      if (mine !== seq) return;
      valid = false;
      put(status, h("p", { class: "bad" }, "Invalid: " + e.message));
    }
    applyBtn.disabled = !valid || text.value === current.yaml;
    put(diff, ...lineDiff(current.yaml, text.value).map(([k, l]) => h("span", { class: k }, (k === "add" ? "+ " : "- ") + l + "\n")));
    if (!diff.childNodes.length) diff.textContent = "No changes.";
  };
  let debounce = null;
  text.addEventListener("input", () => { clearTimeout(debounce); debounce = setTimeout(validate, 300); });
  const simulate = async () => {
    put(sim, h("p", { class: "muted" }, "Simulating…"));
    const trace = window_.value === "synthetic" ? { synthetic: "diurnal", duration_s: 600 } : { audit: { since: Date.now() / 1000 - Number(window_.value) } };
    try {
      const r = await api("POST", "/admin/policy/simulate", { policy: text.value, trace });
      put(sim, simTable(r));
    } catch (e) { put(sim, h("p", { class: "error", role: "alert" }, "Simulation failed: " + e.message + (window_.value !== "synthetic" ? " (no audited traffic in that window? try the synthetic trace)" : ""))); }
  };
  applyBtn.addEventListener("click", async () => {
    try {
      const r = await api("PUT", "/admin/policy?note=" + encodeURIComponent(note.value || "console"), text.value, { raw: true });
      put(status, h("p", { class: "ok", role: "status" }, `Applied as version ${r.version}.`));
      await policy(page);
    } catch (e) { put(status, h("p", { class: "bad", role: "alert" }, "Not applied: " + e.message), issues(e.data && e.data.error && e.data.error.errors, "error")); }
  });
  const rows = history.versions.map((v) => ["v" + v.version + (v.version === history.current ? " (running)" : ""), fmt.when(v.at), v.author, v.note || "", v.fingerprint,
    v.version === history.current ? "" : h("button", { type: "button", class: "secondary", "data-version": v.version, onclick: async () => {
      await api("POST", "/admin/policy/rollback/" + v.version); await policy(page); } }, "Roll back to v" + v.version)]);
  const schema = h("details", {}, h("summary", {}, "The policy's JSON Schema"), h("pre", { id: "schema" }, "…"));
  schema.addEventListener("toggle", async () => { if (schema.open) schema.querySelector("pre").textContent = JSON.stringify(await api("GET", "/admin/policy/schema"), null, 2); }, { once: true });
  put(page, h("h2", {}, "Policy"), h("p", { class: "muted" }, `Running version ${current.version} (${current.fingerprint}), by ${current.author}.` + (current.file_reload_error ? " The policy file has an error: " + current.file_reload_error : "")),
    h("label", { for: "policy-text" }, "Policy (YAML) — checked as you type"), text, status,
    h("h3", {}, "Changes"), diff,
    h("h3", {}, "Simulate before applying"), h("div", { class: "toolbar" }, h("label", { for: "sim-window" }, "Replay"), window_, h("button", { type: "button", id: "simulate", onclick: simulate }, "Simulate")), sim,
    h("h3", {}, "Apply"), h("div", { class: "toolbar" }, h("label", { for: "apply-note" }, "Note"), note, applyBtn),
    h("h3", {}, "History"), table(["Version", "When", "By", "Note", "Fingerprint", ""], rows), schema);
  await validate();
}

function issues(list, kind) {
  if (!list || !list.length) return null;
  return h("ul", { class: "issues" }, list.map((msg) => {
    const m = /^([^:]+):\s*(.*)$/.exec(msg);
    return h("li", { class: kind === "error" ? "bad" : "warming" }, kind + ": ", m ? [h("code", { class: "path" }, m[1]), " " + m[2]] : msg);
  }));
}

function simTable(r) {
  const c = r.current, n = r.candidate;
  const tiers = [...new Set([...Object.keys(c.sla_by_tier), ...Object.keys(n.sla_by_tier)])];
  const backends = [...new Set([...Object.keys(c.backend_mix), ...Object.keys(n.backend_mix)])];
  const rows = [["Total cost", fmt.usd(c.total_cost_usd), fmt.usd(n.total_cost_usd)],
    ["Cost per image", fmt.usd(c.cost_per_image_usd), fmt.usd(n.cost_per_image_usd)],
    ["SLA attainment", fmt.pct(c.sla_attainment), fmt.pct(n.sla_attainment)],
    ...tiers.map((t) => ["SLA, tier " + t, fmt.pct(c.sla_by_tier[t]), fmt.pct(n.sla_by_tier[t])]),
    ["Refused or failed", c.refused_or_failed, n.refused_or_failed],
    ...backends.map((b) => ["Requests to " + b, c.backend_mix[b] || 0, n.backend_mix[b] || 0]),
    ["Latency p95", (c.latency_s.p95 ?? "–") + " s", (n.latency_s.p95 ?? "–") + " s"]];
  return table(["", { label: "Running policy", num: true }, { label: "Candidate", num: true }], rows, `${r.requests} requests replayed under both`);
}

document.getElementById("signin-form").addEventListener("submit", signIn);
document.getElementById("signout").addEventListener("click", () => signOut("Signed out."));
window.addEventListener("hashchange", show);
if (sessionStorage.getItem(KEY)) show(); else signOut();
