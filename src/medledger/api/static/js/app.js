// Portal entry point: sign in / out, and show the patient or practitioner view.

import { api, setUnauthenticatedHandler } from "./api.js";
import { $, say } from "./dom.js";
import { startPatientView } from "./patient.js";
import { startPractitionerView } from "./practitioner.js";
import { setupAccountForms } from "./rights.js";

const VIEWS = ["view-login", "view-patient", "view-practitioner", "view-other"];
let vocab = null;

function show(view) {
  for (const v of VIEWS) $(`#${v}`).hidden = v !== view;
  document.body.dataset.view = view;
}

function signedIn(session) {
  const who = session.kind === "patient" ? `Patient ${session.actor}`
    : `${session.actor} (${session.role || session.kind})`;
  $("#who-label").textContent = `Signed in: ${who}`;
  $("#who").hidden = false;
  $("#org-name").textContent = session.org ? `· ${session.org}` : "";
  if (session.kind === "patient") {
    show("view-patient");
    startPatientView(session, vocab);
  } else if (session.kind === "practitioner") {
    show("view-practitioner");
    startPractitionerView(session, vocab);
  } else {
    show("view-other");
  }
}

function signedOut(message = "", kind = "info") {
  $("#who").hidden = true;
  show("view-login");
  say($("#login-status"), message, kind);
  $("#login-password").value = "";
  $("#login-id").focus();
}

async function login(e) {
  e.preventDefault();
  const id = $("#login-id").value.trim();
  const password = $("#login-password").value;
  const status = $("#login-status");
  if (!id || !password) {
    say(status, "Enter your id and your password.", "error");
    (id ? $("#login-password") : $("#login-id")).focus();
    return;
  }
  say(status, "Signing in…");
  try {
    const session = await api("/auth/login", { method: "POST", body: { id, password },
      auth: false });
    say(status, "");
    signedIn(session);
  } catch (err) {
    say(status, `Sign-in failed: ${err.message}`, "error");
    $("#login-password").select();
  }
}

async function logout() {
  try {
    await api("/auth/logout", { method: "POST", auth: false });
  } finally {
    signedOut("You are signed out.", "ok");
  }
}

async function boot() {
  setUnauthenticatedHandler((err) => signedOut(`Please sign in again: ${err.message}`, "error"));
  $("#login-form").addEventListener("submit", login);
  $("#logout").addEventListener("click", logout);
  setupAccountForms((session) => signedIn({ ...session, actor: session.actor }));
  try {
    vocab = await api("/api/vocabulary", { auth: false });
  } catch (err) {
    say($("#page-status"), `The node is not answering: ${err.message}`, "error");
    return;
  }
  try {
    const me = await api("/auth/me", { auth: false });
    signedIn({ ...me, actor: me.actor });
  } catch {
    signedOut();
  }
}

boot();
