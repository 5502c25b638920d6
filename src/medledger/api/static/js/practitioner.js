// The practitioner's view: find a patient, open their record (permitted records plus
// explicitly withheld items), and break the glass with a stated reason.

import { api } from "./api.js";
import { $, clear, formatDate, h, say } from "./dom.js";
import { parseSearchset, patientName } from "./fhir.js";
import { renderTimeline } from "./timeline.js";

let state = { session: null, vocab: null, patientId: null, wired: false };

export function startPractitionerView(session, vocab) {
  state = { ...state, session, vocab, patientId: null };
  $("#bg-min").textContent = String(vocab.break_glass_min_reason);
  $("#chart-view").hidden = true;
  clear($("#search-results"));
  say($("#search-status"), "");
  $("#search-form").reset();
  if (!state.wired) {
    state.wired = true;
    $("#search-form").addEventListener("submit", searchPatients);
    $("#bg-open").addEventListener("click", openBreakGlass);
    $("#bg-cancel").addEventListener("click", () => $("#bg-dialog").close());
    $("#bg-form").addEventListener("submit", confirmBreakGlass);
  }
  $("#search-q").focus();
}

const looksLikeId = (q) => /^[0-9a-f]{8}-[0-9a-f-]{27,}$/i.test(q);

async function searchPatients(e) {
  e.preventDefault();
  const q = $("#search-q").value.trim();
  const status = $("#search-status");
  const list = clear($("#search-results"));
  say(status, "Searching…");
  try {
    const param = !q ? "" : looksLikeId(q) ? `?_id=${encodeURIComponent(q)}`
      : `?name=${encodeURIComponent(q)}`;
    const { records } = parseSearchset(await api(`/fhir/Patient${param}`));
    const patients = records.filter((r) => r.resourceType === "Patient");
    list.append(...patients.map((p) => h("li", { class: "patient-item", dataset: { id: p.id } },
      h("div", {},
        h("strong", {}, patientName(p)),
        h("span", { class: "muted" }, [p.birthDate ? ` · born ${formatDate(p.birthDate)}` : "",
          p.gender ? ` · ${p.gender}` : ""].join("")),
        h("br"), h("span", { class: "muted mono small" }, p.id)),
      h("button", { type: "button", class: "btn", "aria-label": `Open record of ${patientName(p)}`,
        onclick: () => openChart(p.id) }, "Open record"))));
    say(status, patients.length ? `${patients.length} patient${patients.length > 1 ? "s" : ""} found.`
      : `No patient matches "${q}".`);
  } catch (err) {
    say(status, `Search failed: ${err.message}`, "error");
  }
}

async function openChart(pid, reason = null) {
  state.patientId = pid;
  const view = $("#chart-view");
  const status = $("#chart-status");
  view.hidden = false;
  say(status, reason ? "Opening the record with emergency access…" : "Opening the record…");
  const headers = reason ? { "X-Break-Glass-Reason": reason } : {};
  try {
    const bundle = await api(`/fhir/Patient/${encodeURIComponent(pid)}/$everything`,
      { headers });
    const { records, withheld, patient } = parseSearchset(bundle);
    $("#chart-title").textContent = patient ? patientName(patient) : `Patient ${pid}`;
    $("#chart-facts").textContent = patient ? [patient.birthDate ? `born ${formatDate(patient.birthDate)}` : "",
      patient.gender, `id ${pid}`].filter(Boolean).join(" · ") : `id ${pid} (demographics withheld)`;
    renderTimeline($("#chart-timeline"), { records, withheld });
    const banner = clear($("#bg-banner"));
    if (reason) {
      banner.append(h("div", { class: "notice notice-danger", role: "alert" },
        h("strong", {}, "Emergency access (break the glass) is active for this view."),
        ` Reason recorded: "${reason}". This access is highlighted in the patient's access log.`));
    }
    const shown = records.filter((r) => r.resourceType !== "Patient").length;
    say(status, `${shown} records shown, ${withheld.length} withheld.`);
    const canBreak = state.vocab.break_glass_roles.includes(state.session.role);
    $("#bg-open").hidden = !(canBreak && withheld.length && !reason);
    $("#chart-title").focus();
  } catch (err) {
    clear($("#chart-timeline"));
    say(status, `Could not open the record: ${err.message}`, "error");
  }
}

function openBreakGlass() {
  $("#bg-form").reset();
  say($("#bg-error"), "");
  $("#bg-dialog").showModal();
  $("#bg-reason").focus();
}

function confirmBreakGlass(e) {
  e.preventDefault();
  const reason = $("#bg-reason").value.trim().replace(/\s+/g, " ");
  const min = state.vocab.break_glass_min_reason;
  if (reason.length < min) {
    say($("#bg-error"), `Give a reason of at least ${min} characters `
      + `(${reason.length} so far).`, "error");
    $("#bg-reason").focus();
    return;
  }
  if (/[^\x20-\x7e\u00a0-\u00ff]/.test(reason)) {
    say($("#bg-error"), "Please use plain letters, digits and punctuation in the reason.",
      "error");
    $("#bg-reason").focus();
    return;
  }
  $("#bg-dialog").close();
  openChart(state.patientId, reason);
}
