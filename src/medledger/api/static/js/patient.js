// The patient's view: records timeline, access log (+ chart), consents, share links.

import { api } from "./api.js";
import { renderAccessChart } from "./chart.js";
import { $, badge, clear, formatDate, formatDateTime, formatEpoch, h, say } from "./dom.js";
import { parseSearchset, patientName, TYPE_NAMES } from "./fhir.js";
import { RIGHTS_LOADERS, setupRights } from "./rights.js";
import { renderTimeline } from "./timeline.js";
import { setupTabs } from "./tabs.js";

const SUBTYPES = {
  read: "Opened a record", vread: "Opened an older version of a record",
  search: "Searched your records", everything: "Opened your full record",
  history: "Viewed a record's history", create: "Added a record", update: "Updated a record",
  register: "Registered you", transaction: "Imported records", consent: "Set a consent rule",
  "consent-revoke": "Revoked a consent rule", "share-create": "Created a share link",
  "share-revoke": "Revoked a share link", "share-access": "Opened a share link",
  "audit-read": "Viewed this access log", export: "Exported your sealed records",
  match: "Patient matching", erase: "Erased records", disclosures: "Viewed your disclosures",
  "activation-code": "Issued your activation code", activate: "Activated your account",
  "recovery-setup": "Set up key recovery", "recovery-request": "Asked to recover your key",
  "recovery-approve": "A guardian approved your key recovery",
  "recovery-complete": "Recovered your key", "recovery-cancel": "Cancelled a key recovery",
};
const PURPOSES = { TREAT: "treatment", ETREAT: "emergency treatment", PATRQT: "your request" };
const OUTCOMES = { 0: ["allowed", "ok"], 4: ["refused", "refused"], 8: ["failed", "refused"] };

let state = { me: null, vocab: null, records: [], tabs: null };

export function startPatientView(session, vocab) {
  state = { me: session.actor, vocab, records: [], tabs: state.tabs };
  buildConsentForm(vocab);
  buildShareCategories(vocab);
  setupRights(session.actor, vocab, () => state.records);
  if (!state.tabs) {
    state.tabs = setupTabs($("#patient-tabs"), (panel) => LOADERS[panel]());
    $("#consent-form").addEventListener("submit", submitConsent);
    $("#share-form").addEventListener("submit", submitShare);
  }
  state.tabs.select("tab-records");
}

const LOADERS = {
  "panel-records": loadRecords,
  "panel-access": loadAccessLog,
  "panel-consents": loadConsents,
  "panel-shares": () => { loadRecordTypes(); loadShares(); },
  ...RIGHTS_LOADERS,
  "panel-erase": async () => {
    try {
      await fetchRecords();
    } catch {
      // the records tab reports the error
    }
    await RIGHTS_LOADERS["panel-erase"]();
  },
};

// ------------------------------------------------------------------ records
async function fetchRecords() {
  const bundle = await api(`/fhir/Patient/${encodeURIComponent(state.me)}/$everything`);
  const parsed = parseSearchset(bundle);
  state.records = parsed.records;
  return parsed;
}

async function loadRecords() {
  const status = $("#records-status");
  say(status, "Loading your records…");
  try {
    const { records, withheld, patient } = await fetchRecords();
    const facts = patient ? [patientName(patient),
      patient.birthDate ? `born ${formatDate(patient.birthDate)}` : "", patient.gender,
      `id ${patient.id}`].filter(Boolean).join(" · ") : `id ${state.me}`;
    $("#patient-facts").textContent = facts;
    if (patient) $("#who-label").textContent = `Signed in: ${patientName(patient)}`;
    renderTimeline($("#records-timeline"), { records, withheld });
    say(status, `${records.filter((r) => r.resourceType !== "Patient").length} records.`);
  } catch (err) {
    say(status, `Could not load your records: ${err.message}`, "error");
  }
}

// ------------------------------------------------------------------ access log
const SEARCH_DETAIL = /^\S+ search \([^)]*\): (\d+) returned, (\d+) withheld$/;

function detailText(ev) {
  const m = SEARCH_DETAIL.exec(ev.detail || "");
  if (m) return `${m[1]} released${m[2] !== "0" ? `, ${m[2]} withheld by policy` : ""}`;
  return ev.subtype === "share-access" ? "" : ev.detail || "";
}

function describeWhat(ev) {
  const what = SUBTYPES[ev.subtype] || ev.subtype;
  const refs = ev.entity || [];
  const first = refs[0] ? refs[0].split("/").slice(0, 2).join("/") : "";
  const target = refs.length > 1 ? `${refs.length} records` : first;
  return [what, SEARCH_DETAIL.test(ev.detail || "") ? "" : target, detailText(ev)]
    .filter(Boolean);
}

// a share link's recipient is sealed free text (detail); the event's agent is the link
function shareRecipient(ev) {
  return ev.subtype === "share-access" ? ev.detail : "";
}

function accessRow(ev) {
  const mine = ev.agent === state.me;
  const [outcome, kind] = OUTCOMES[ev.outcome] || [ev.outcome, ""];
  const why = [];
  if (ev.break_glass) {
    why.push(h("strong", { class: "bg-reason" }, `Emergency access: ${ev.reason || "no reason"}`));
  } else {
    why.push(PURPOSES[ev.purpose] || ev.purpose || "");
    if (ev.basis) why.push(h("br"), h("span", { class: "muted" }, `basis: ${ev.basis}`));
    if (ev.reason && ev.outcome !== "0") why.push(h("br"), h("span", {}, ev.reason));
  }
  const [what, ...more] = describeWhat(ev);
  return h("tr", { class: ev.break_glass ? "row-bg" : ev.outcome !== "0" ? "row-refused" : "",
    dataset: { subtype: ev.subtype, breakGlass: String(Boolean(ev.break_glass)) } },
  h("td", {}, h("time", { datetime: ev.recorded }, formatDateTime(ev.recorded)),
    h("br"), h("span", { class: "muted small" },
      ev.anchored_height ? `anchored in block ${ev.anchored_height}` : "anchoring pending")),
  h("td", {}, mine ? "You" : shareRecipient(ev) || ev.agent, h("br"),
    h("span", { class: "muted small" }, [ev.agent_role, ev.agent_org].filter(Boolean).join(" · "))),
  h("td", {}, ev.break_glass ? [badge("Break the glass", "bg-badge"), " "] : null, what,
    more.length ? [h("br"), h("span", { class: "muted small" }, more.join(" · "))] : null),
  h("td", {}, why),
  h("td", {}, badge(outcome, kind)));
}

async function loadAccessLog() {
  const status = $("#access-status");
  say(status, "Loading the access log…");
  try {
    const events = await api("/api/access-log?count=500");
    const tbody = clear($("#access-table tbody"));
    tbody.append(...events.map(accessRow));
    renderAccessChart($("#access-chart"), events);
    const alert = clear($("#access-alert"));
    const bg = events.filter((e) => e.break_glass);
    if (bg.length) {
      alert.append(h("div", { class: "notice notice-danger", role: "alert" },
        h("strong", {}, `${bg.length} emergency (break-the-glass) access`
          + `${bg.length > 1 ? "es" : ""} to your record.`),
        h("ul", {}, bg.slice(0, 5).map((e) => h("li", {},
          `${formatDateTime(e.recorded)} — ${e.agent} (${e.agent_role}): "${e.reason}"`)))));
    }
    say(status, `${events.length} events.`);
  } catch (err) {
    say(status, `Could not load the access log: ${err.message}`, "error");
  }
}

// ------------------------------------------------------------------ consents
function checkbox(name, value, text, extra = "") {
  const id = `${name}-${value}`.replace(/[^A-Za-z0-9_-]/g, "_");
  return h("label", { class: "check", for: id },
    h("input", { type: "checkbox", id, name, value }), ` ${text}`,
    extra ? h("span", { class: "muted small" }, ` ${extra}`) : null);
}

function buildConsentForm(vocab) {
  clear($("#consent-categories")).append(
    ...vocab.categories.map((c) => checkbox("consent-category", c, c)));
  clear($("#consent-labels")).append(...Object.entries(vocab.labels)
    .map(([code, name]) => checkbox("consent-label", code, code, `(${name})`)));
}

function ids(text) {
  return text.split(",").map((x) => x.trim()).filter(Boolean);
}

function dayStart(value, plusDays = 0) {
  if (!value) return null;
  const [y, m, d] = value.split("-").map(Number);
  return Math.floor(new Date(y, m - 1, d + plusDays).getTime() / 1000);
}

function consentStatus(rule) {
  const now = Date.now() / 1000;
  if (rule.status !== "active") return rule.status === "inactive" ? "revoked" : rule.status;
  if (rule.end !== null && rule.end <= now) return "expired";
  if (rule.start !== null && rule.start > now) return "not yet in force";
  return "active";
}

function consentRow(rule) {
  const data = [...rule.categories, ...rule.labels].join(", ") || "all data";
  const who = [...rule.actors, ...rule.orgs].join(", ") || "everyone";
  const period = rule.start || rule.end
    ? `${rule.start ? formatEpoch(rule.start) : "now"} – ${rule.end ? formatEpoch(rule.end) : "no end"}`
    : "always";
  const action = rule.status === "active"
    ? h("button", { type: "button", class: "btn btn-small",
      "aria-label": `Revoke consent: ${rule.decision} ${data} for ${who}`,
      onclick: () => revokeConsent(rule) }, "Revoke")
    : null;
  return h("tr", { dataset: { consentId: rule.id, status: rule.status } },
    h("td", {}, badge(rule.decision === "deny" ? "Restrict" : "Allow",
      rule.decision === "deny" ? "refused" : "ok")),
    h("td", {}, data), h("td", {}, who), h("td", {}, period),
    h("td", {}, consentStatus(rule)), h("td", {}, action));
}

async function loadConsents() {
  const status = $("#consents-status");
  try {
    const rules = await api("/api/consents");
    rules.sort((a, b) => (b.recorded_ns || 0) - (a.recorded_ns || 0));
    clear($("#consents-table tbody")).append(...rules.map(consentRow));
    say(status, rules.length ? `${rules.length} consent rules.`
      : "No consent rules: your care team sees what their roles allow.");
  } catch (err) {
    say(status, `Could not load consents: ${err.message}`, "error");
  }
}

async function submitConsent(e) {
  e.preventDefault();
  const form = e.currentTarget;
  const status = $("#consent-form-status");
  const checked = (name) => [...form.querySelectorAll(`input[name="${name}"]:checked`)]
    .map((i) => i.value);
  const body = {
    decision: form.querySelector('input[name="decision"]:checked').value,
    categories: checked("consent-category"), labels: checked("consent-label"),
    orgs: ids($("#consent-org").value), actors: ids($("#consent-actor").value),
    start: dayStart($("#consent-start").value), end: dayStart($("#consent-end").value, 1),
  };
  if (body.start !== null && body.end !== null && body.end <= body.start) {
    say(status, "The end date must not be before the start date.", "error");
    $("#consent-end").focus();
    return;
  }
  say(status, "Saving your consent on the ledger…");
  try {
    await api("/api/consents", { method: "POST", body });
    say(status, `Consent saved: ${body.decision === "deny" ? "restricted" : "allowed"} `
      + `${[...body.categories, ...body.labels].join(", ") || "all data"}.`, "ok");
    form.reset();
    await loadConsents();
  } catch (err) {
    say(status, `Consent not saved: ${err.message}`, "error");
  }
}

async function revokeConsent(rule) {
  if (!window.confirm("Revoke this consent rule? This is recorded on the ledger.")) return;
  const status = $("#consents-status");
  try {
    await api(`/api/consents/${encodeURIComponent(rule.id)}/revoke`, { method: "POST" });
    await loadConsents();
    say(status, "Consent revoked.", "ok");
  } catch (err) {
    say(status, `Could not revoke: ${err.message}`, "error");
  }
}

// ------------------------------------------------------------------ share links
function buildShareCategories(vocab) {
  clear($("#share-categories")).append(
    ...vocab.categories.map((c) => checkbox("share-category", c, c)));
}

async function loadRecordTypes() {
  try {
    if (!state.records.length) await fetchRecords();
  } catch {
    return; // the records tab reports the error
  }
  const types = [...new Set(state.records.map((r) => r.resourceType))].sort();
  const box = $("#share-types");
  const ticked = new Set([...box.querySelectorAll("input:checked")].map((i) => i.value));
  clear(box).append(...types.map((t) => checkbox("share-type", t, TYPE_NAMES[t] || t)));
  for (const i of box.querySelectorAll("input")) i.checked = ticked.has(i.value);
}

function shareState(g) {
  if (g.revoked) return "revoked";
  if (g.exp !== null && g.exp * 1000 <= Date.now()) return "expired";
  return "active";
}

function shareRow(g) {
  const st = shareState(g);
  return h("tr", { dataset: { shareId: g.id, state: st } },
    h("td", {}, g.label || h("span", { class: "muted" }, "(no label)")),
    h("td", {}, formatDateTime(new Date(g.created_ns / 1e6).toISOString())),
    h("td", {}, formatEpoch(g.exp)),
    h("td", {}, String(g.records.length)),
    h("td", {}, g.has_passcode ? "yes" : "no"),
    h("td", {}, badge(st, { active: "ok", expired: "muted-badge", revoked: "refused" }[st])),
    h("td", {}, st === "active" ? h("button", { type: "button", class: "btn btn-small",
      "aria-label": `Revoke share link ${g.label || g.id.slice(0, 8)}`,
      onclick: () => revokeShare(g) }, "Revoke") : null));
}

async function loadShares() {
  const status = $("#shares-status");
  try {
    const grants = await api("/api/shares");
    grants.sort((a, b) => b.created_ns - a.created_ns);
    clear($("#shares-table tbody")).append(...grants.map(shareRow));
    say(status, grants.length ? `${grants.length} share links.` : "No share links yet.");
  } catch (err) {
    say(status, `Could not load share links: ${err.message}`, "error");
  }
}

function shareResult(doc, passcode) {
  const linkId = "share-link-text";
  const copyStatus = h("span", { class: "copy-status", role: "status", "aria-live": "polite" });
  const copy = h("button", { type: "button", class: "btn", onclick: async () => {
    const input = document.getElementById(linkId);
    try {
      await navigator.clipboard.writeText(input.value);
    } catch {
      input.select();
      document.execCommand("copy");
    }
    copyStatus.textContent = "Copied.";
  } }, "Copy link");
  const qr = h("div", { class: "qr", role: "img",
    "aria-label": "QR code of the share link" });
  // qr_svg is produced by the node (segno) from the link alone; no user text in it
  qr.innerHTML = doc.qr_svg;
  const svg = qr.querySelector("svg");
  if (svg) {
    const [w, ht] = [svg.getAttribute("width"), svg.getAttribute("height")];
    if (!svg.getAttribute("viewBox") && w && ht) svg.setAttribute("viewBox", `0 0 ${w} ${ht}`);
    svg.setAttribute("shape-rendering", "crispEdges");
    svg.setAttribute("aria-hidden", "true");
  }
  return h("section", { class: "card share-result", "aria-labelledby": "share-result-h",
    dataset: { shareId: doc.id } },
  h("h3", { id: "share-result-h" }, `Link ready${doc.label ? `: ${doc.label}` : ""}`),
  h("div", { class: "share-grid" },
    qr,
    h("div", {},
      h("label", { for: linkId }, "SMART Health Link"),
      h("textarea", { id: linkId, class: "mono", rows: 4, readonly: true }, doc.shlink),
      h("p", {}, copy, " ", copyStatus),
      h("p", {}, `${doc.records.length} records · expires ${formatEpoch(doc.exp)}`
        + (passcode ? " · the recipient needs the passcode (tell them separately)" : "")))));
}

async function submitShare(e) {
  e.preventDefault();
  const form = e.currentTarget;
  const status = $("#share-form-status");
  const checked = (name) => [...form.querySelectorAll(`input[name="${name}"]:checked`)]
    .map((i) => i.value);
  const amount = Number($("#share-expiry").value);
  if (!Number.isInteger(amount) || amount < 1) {
    say(status, "Expiry must be a whole number of at least 1.", "error");
    $("#share-expiry").focus();
    return;
  }
  const passcode = $("#share-passcode").value;
  if (passcode && passcode.length < 4) {
    say(status, "A passcode needs at least 4 characters.", "error");
    $("#share-passcode").focus();
    return;
  }
  const body = {
    selection: { categories: checked("share-category"), types: checked("share-type") },
    expires_in_s: amount * Number($("#share-unit").value),
    passcode: passcode || null, label: $("#share-label").value.trim(),
  };
  say(status, "Creating the link…");
  try {
    const doc = await api("/api/shares", { method: "POST", body });
    clear($("#share-result")).append(shareResult(doc, Boolean(passcode)));
    say(status, `Share link created with ${doc.records.length} records.`, "ok");
    form.reset();
    $("#share-expiry").value = "1";
    await loadShares();
  } catch (err) {
    say(status, `Link not created: ${err.message}`, "error");
  }
}

async function revokeShare(g) {
  if (!window.confirm("Revoke this share link? Nobody can open it afterwards.")) return;
  const status = $("#shares-status");
  try {
    await api(`/api/shares/${encodeURIComponent(g.id)}/revoke`, { method: "POST" });
    await loadShares();
    say(status, "Share link revoked.", "ok");
  } catch (err) {
    say(status, `Could not revoke: ${err.message}`, "error");
  }
}
