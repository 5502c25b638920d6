// Patient rights in the portal: accounting of disclosures (+ PDF), key recovery (setup,
// requests, approvals as a guardian), erasure (with a typed confirmation), and the
// sign-in page's account activation and key recovery forms. No inline handlers.

import { api } from "./api.js";
import { $, badge, clear, formatDateTime, h, say } from "./dom.js";
import { TYPE_NAMES } from "./fhir.js";

const KINDS = { "other-organisation": "another organisation", "share-link": "share link",
  "break-glass": "emergency access", export: "export" };
const PURPOSES = { TREAT: "treatment", ETREAT: "emergency treatment", PATRQT: "your request" };
const BASES = { "consent-withdrawn": "consent withdrawn", objection: "objection",
  "no-longer-necessary": "no longer necessary", "unlawful-processing": "unlawful processing",
  "legal-obligation": "legal obligation", "retention-expired": "retention expired" };

let ctx = { me: null, records: () => [], vocab: null, wired: false };

/** Wire the rights panels once; ``records()`` returns the patient's loaded records. */
export function setupRights(me, vocab, records) {
  ctx = { ...ctx, me, vocab, records };
  if (ctx.wired) return;
  ctx.wired = true;
  $("#disclosures-form").addEventListener("submit", (e) => { e.preventDefault(); loadDisclosures(); });
  for (const id of ["#disclosures-start", "#disclosures-end"]) {
    $(id).addEventListener("change", updatePdfLink);
  }
  $("#recovery-form").addEventListener("submit", submitRecoverySetup);
  $("#erase-form").addEventListener("submit", askErase);
  $("#erase-form").addEventListener("change", showEraseScope);
  $("#erase-cancel").addEventListener("click", () => $("#erase-dialog").close());
  $("#erase-confirm-form").addEventListener("submit", confirmErase);
}

export const RIGHTS_LOADERS = {
  "panel-disclosures": loadDisclosures,
  "panel-recovery": loadRecovery,
  "panel-erase": loadErase,
};

// ------------------------------------------------------------------ disclosures
function period() {
  const q = new URLSearchParams();
  if ($("#disclosures-start").value) q.set("start", $("#disclosures-start").value);
  if ($("#disclosures-end").value) q.set("end", $("#disclosures-end").value);
  return q.toString();
}

function updatePdfLink() {
  const q = period();
  $("#disclosures-pdf").href = `/api/disclosures.pdf${q ? `?${q}` : ""}`;
}

function disclosureRow(d) {
  const what = d.what.slice(0, 3).map((r) => r.split("/").slice(0, 2).join("/")).join(", ")
    + (d.what.length > 3 ? ` and ${d.what.length - 3} more` : "");
  const who = [d.role, d.recipient_org].filter((x) => x && x !== "external").join(" · ");
  return h("tr", { class: d.kind === "break-glass" ? "row-bg" : "",
    dataset: { kind: d.kind, eventId: d.id } },
  h("td", {}, h("time", { datetime: d.date }, formatDateTime(d.date))),
  h("td", {}, d.recipient, who ? [h("br"), h("span", { class: "muted small" }, who)] : null),
  h("td", {}, what || "—"),
  h("td", {}, PURPOSES[d.purpose] || d.purpose || "",
    d.reason ? [h("br"), h("span", { class: "muted small" }, d.reason)] : null),
  h("td", {}, badge(KINDS[d.kind] || d.kind, d.kind === "break-glass" ? "bg-badge" : "")),
  h("td", {}, d.anchored_height ? `block ${d.anchored_height}` : "anchoring pending"));
}

async function loadDisclosures() {
  const status = $("#disclosures-status");
  updatePdfLink();
  say(status, "Loading your accounting of disclosures…");
  try {
    const q = period();
    const rows = await api(`/api/disclosures${q ? `?${q}` : ""}`);
    clear($("#disclosures-table tbody")).append(...rows.map(disclosureRow));
    say(status, rows.length ? `${rows.length} disclosures.`
      : "No disclosures outside your own care in this period.");
  } catch (err) {
    say(status, `Could not load the disclosures: ${err.message}`, "error");
  }
}

// ------------------------------------------------------------------ key recovery
function requestRow(r) {
  const cancel = r.status === "open" ? h("button", { type: "button", class: "btn btn-small",
    "aria-label": `Cancel recovery request ${r.id.slice(0, 8)}`,
    onclick: () => cancelRequest(r) }, "Not me: cancel") : null;
  return h("tr", { dataset: { requestId: r.id, status: r.status } },
    h("td", {}, formatDateTime(new Date(r.created_ns / 1e6).toISOString())),
    h("td", {}, r.by), h("td", {}, h("code", {}, r.fingerprint)),
    h("td", {}, `${r.approved_by.length} of ${r.threshold}`
      + (r.approved_by.length ? ` (${r.approved_by.join(", ")})` : "")),
    h("td", {}, badge(r.status, r.status === "completed" ? "ok"
      : r.status === "cancelled" ? "refused" : "")),
    h("td", {}, cancel));
}

function approveItem(r) {
  return h("li", { dataset: { requestId: r.id } },
    h("strong", {}, r.patient), ` asked to recover their key (opened by ${r.by}). `,
    "Check this fingerprint with them before approving: ", h("code", {}, r.fingerprint), " ",
    h("button", { type: "button", class: "btn btn-small",
      "aria-label": `Approve recovery for ${r.patient}`, onclick: () => approve(r) },
    "Approve"));
}

// ``keepStatus``: after an action, its outcome stays on screen while the lists refresh
async function loadRecovery(keepStatus = false) {
  const status = $("#recovery-status");
  try {
    const doc = await api("/api/recovery");
    const view = clear($("#recovery-setup-view"));
    if (doc.setup && doc.setup.status === "active") {
      view.append(h("p", { class: "notice notice-audit" }, "Recovery is set up: any ",
        h("strong", {}, String(doc.setup.threshold)), " of ",
        h("strong", {}, doc.setup.guardians.join(", ")), " can together give your key back."));
    } else {
      view.append(h("p", { class: "notice" }, "Recovery is not set up: if you lose your "
        + "password, your key is lost."));
    }
    clear($("#recovery-table tbody")).append(...doc.requests.map(requestRow));
    clear($("#recovery-to-approve")).append(...(doc.to_approve.length
      ? doc.to_approve.map(approveItem) : [h("li", { class: "empty" }, "Nothing to approve.")]));
    if (!keepStatus) say(status, "");
  } catch (err) {
    say(status, `Could not load key recovery: ${err.message}`, "error");
  }
}

async function submitRecoverySetup(e) {
  e.preventDefault();
  const status = $("#recovery-form-status");
  const guardians = $("#recovery-guardians").value.split(",").map((x) => x.trim())
    .filter(Boolean);
  const threshold = Number($("#recovery-threshold").value);
  if (guardians.length < 2 || !Number.isInteger(threshold) || threshold < 2
      || threshold > guardians.length) {
    say(status, "Name at least two guardians and need 2 up to that many approvals.", "error");
    $("#recovery-guardians").focus();
    return;
  }
  say(status, "Splitting your key and sealing each share to its guardian…");
  try {
    await api("/api/recovery/setup", { method: "POST", body: { guardians, threshold } });
    say(status, `Recovery set up: any ${threshold} of ${guardians.length} guardians.`, "ok");
    await loadRecovery();
  } catch (err) {
    say(status, `Recovery not set up: ${err.message}`, "error");
  }
}

async function cancelRequest(r) {
  if (!window.confirm("Cancel this recovery request? Do this if you did not ask for it.")) return;
  try {
    await api(`/api/recovery/requests/${encodeURIComponent(r.id)}/cancel`, { method: "POST" });
    await loadRecovery();
  } catch (err) {
    say($("#recovery-status"), `Could not cancel: ${err.message}`, "error");
  }
}

async function approve(r) {
  if (!window.confirm(`Approve the recovery of ${r.patient}'s key? Only if they read you `
    + `the fingerprint ${r.fingerprint}.`)) return;
  try {
    const doc = await api(`/api/recovery/requests/${encodeURIComponent(r.id)}/approve`,
      { method: "POST", body: {} });
    say($("#recovery-status"), `Approved (${doc.approvals}).`, "ok");
    await loadRecovery(true);
  } catch (err) {
    say($("#recovery-status"), `Could not approve: ${err.message}`, "error");
  }
}

// ------------------------------------------------------------------ erasure
function showEraseScope() {
  const scope = $('input[name="erase-scope"]:checked').value;
  $("#erase-record-field").hidden = scope !== "record";
  $("#erase-category-field").hidden = scope !== "category";
}

function erasureRow(e) {
  const s = e.scope || {};
  const what = s.records ? s.records.join(", ") : s.category ? `all ${s.category}`
    : "everything";
  return h("tr", {}, h("td", {}, formatDateTime(new Date(e.at / 1e6).toISOString())),
    h("td", {}, e.by === ctx.me ? "You" : e.by), h("td", {}, what),
    h("td", {}, BASES[e.basis] || e.basis), h("td", {}, String(e.versions)));
}

async function loadErase() {
  const records = ctx.records().filter((r) => r.resourceType !== "Patient");
  const select = clear($("#erase-record"));
  select.append(...records.map((r) => h("option", { value: `${r.resourceType}/${r.id}` },
    `${TYPE_NAMES[r.resourceType] || r.resourceType} ${r.id.slice(0, 8)}`
    + (r.meta && r.meta.lastUpdated ? ` (${r.meta.lastUpdated.slice(0, 10)})` : ""))));
  const cats = clear($("#erase-category"));
  cats.append(...ctx.vocab.categories.filter((c) => c !== "directory")
    .map((c) => h("option", { value: c }, c)));
  showEraseScope();
  try {
    const rows = await api("/api/erasures");
    clear($("#erasures-table tbody")).append(...rows.map(erasureRow));
  } catch (err) {
    say($("#erase-form-status"), `Could not load your erasures: ${err.message}`, "error");
  }
}

let pending = null;

function askErase(e) {
  e.preventDefault();
  const scope = $('input[name="erase-scope"]:checked').value;
  const params = [{ name: "basis", valueCode: $("#erase-basis").value }];
  let what;
  if (scope === "record") {
    const ref = $("#erase-record").value;
    if (!ref) {
      say($("#erase-form-status"), "Choose a record.", "error");
      return;
    }
    params.push({ name: "record", valueString: ref });
    what = `the record ${ref}`;
  } else if (scope === "category") {
    params.push({ name: "category", valueCode: $("#erase-category").value });
    what = `every ${$("#erase-category").value} record`;
  } else {
    params.push({ name: "all", valueBoolean: true });
    what = "your whole record, including your demographics";
  }
  pending = params;
  $("#erase-desc").textContent = `This erases ${what} on every node, for good. Nobody, `
    + "not even you, can open it afterwards; share links that include it stop working.";
  $("#erase-typed").value = "";
  say($("#erase-error"), "");
  $("#erase-dialog").showModal();
  $("#erase-typed").focus();
}

async function confirmErase(e) {
  e.preventDefault();
  if ($("#erase-typed").value.trim() !== "ERASE") {
    say($("#erase-error"), "Type ERASE (capital letters) to confirm.", "error");
    $("#erase-typed").focus();
    return;
  }
  $("#erase-dialog").close();
  const status = $("#erase-form-status");
  say(status, "Erasing on every node…");
  try {
    const doc = await api(`/fhir/Patient/${encodeURIComponent(ctx.me)}/$erase`,
      { method: "POST", body: { resourceType: "Parameters", parameter: pending } });
    const n = doc.parameter.find((p) => p.name === "versionsErased").valueInteger;
    say(status, `Erased: ${n} versions. Every node deletes their content.`, "ok");
    await loadErase();
  } catch (err) {
    say(status, `Not erased: ${err.message}`, "error");
  }
}

// ------------------------------------------------------------------ sign-in page
/** Activation (imported patients) and key recovery forms; ``signedIn(session)`` on success. */
export function setupAccountForms(signedIn) {
  const m = /^#activate\/([^/]+)(?:\/(.+))?$/.exec(window.location.hash);
  if (m) {
    $("#activate-box").open = true;
    $("#activate-id").value = decodeURIComponent(m[1]);
    if (m[2]) $("#activate-code").value = decodeURIComponent(m[2]);
    window.history.replaceState(null, "", window.location.pathname);
  }
  $("#activate-form").addEventListener("submit", (e) => account(e, "/auth/activate",
    ["id", "code", "password"], "#activate-status", signedIn));
  $("#recover-form").addEventListener("submit", (e) => account(e, "/auth/recover",
    ["id", "request", "code", "password"], "#recover-status", signedIn));
}

async function account(e, path, names, statusId, signedIn) {
  e.preventDefault();
  const form = e.currentTarget;
  const body = Object.fromEntries(names.map((n) => [n, form.elements[n].value.trim()]));
  const status = $(statusId);
  if (names.some((n) => !body[n])) {
    say(status, "Fill in every field.", "error");
    return;
  }
  if (body.password.length < 8) {
    say(status, "Choose a password of at least 8 characters.", "error");
    return;
  }
  say(status, "Checking…");
  try {
    const session = await api(path, { method: "POST", body, auth: false });
    say(status, "");
    form.reset();
    signedIn(session);
  } catch (err) {
    say(status, err.message, "error");
  }
}
