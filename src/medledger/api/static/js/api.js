// fetch wrapper for the node's API: JSON in, JSON out, errors as ApiError with the
// server's own diagnosis (OperationOutcome diagnostics) so the UI can show it plainly.

export class ApiError extends Error {
  constructor(status, message, doc) {
    super(message);
    this.status = status;
    this.doc = doc;
  }
}

let onUnauthenticated = () => {};

/** Called when an authenticated request comes back 401 (session expired or revoked). */
export function setUnauthenticatedHandler(fn) {
  onUnauthenticated = fn;
}

export function diagnose(status, doc) {
  if (doc && doc.resourceType === "OperationOutcome") {
    const text = (doc.issue || [])
      .map((i) => i.diagnostics || (i.details && i.details.text) || i.code)
      .filter(Boolean).join("; ");
    if (text) return text;
  }
  if (doc && typeof doc.error === "string") return doc.error;
  if (status === 0) return "The node could not be reached; check the connection and retry.";
  return `The node answered with HTTP ${status}.`;
}

/**
 * api("/api/consents", {method: "POST", body: {...}, headers: {...}, auth: true})
 * The session travels in the httpOnly cookie set by /auth/login.
 */
export async function api(path, { method = "GET", body, headers = {}, auth = true } = {}) {
  const init = { method, credentials: "same-origin",
    headers: { Accept: "application/fhir+json, application/json", ...headers } };
  // every state change is JSON (the node refuses cookie-authenticated writes without it:
  // a cross-site form cannot send that content type)
  if (body !== undefined || method !== "GET") {
    init.body = JSON.stringify(body === undefined ? {} : body);
    init.headers["Content-Type"] = "application/json";
  }
  let resp;
  try {
    resp = await fetch(path, init);
  } catch (err) {
    if (err instanceof TypeError && /header/i.test(String(err.message))) {
      throw new ApiError(0, "That text contains characters that cannot be sent; use plain "
        + "letters, digits and punctuation.", null);
    }
    throw new ApiError(0, diagnose(0, null), null);
  }
  const text = await resp.text();
  let doc = null;
  try {
    doc = text ? JSON.parse(text) : null;
  } catch {
    doc = null;
  }
  if (!resp.ok) {
    const err = new ApiError(resp.status, diagnose(resp.status, doc), doc);
    if (resp.status === 401 && auth) onUnauthenticated(err);
    throw err;
  }
  return doc;
}
