// Reading FHIR R4 resources for people: a date, a category, sensitivity labels and a
// one-line human summary per resource; parsing $everything searchsets (incl. withheld).

export const SENSITIVE = new Set(["PSY", "ETH", "HIV", "SDV", "SEX", "STD", "R", "V"]);

export const TYPE_NAMES = {
  Observation: "Observation", Condition: "Condition", MedicationRequest: "Medication",
  MedicationStatement: "Medication", AllergyIntolerance: "Allergy",
  Immunization: "Immunization", Encounter: "Visit", Procedure: "Procedure",
  DiagnosticReport: "Report", DocumentReference: "Document", CarePlan: "Care plan",
  Patient: "Patient", Consent: "Consent",
};

// Mirrors medledger.fhir.labels (the server's category is authoritative for policy;
// this is only for display and filtering of records already returned).
const CATEGORY_BY_TYPE = {
  Patient: "demographics", RelatedPerson: "demographics", Medication: "medications",
  MedicationRequest: "medications", MedicationStatement: "medications",
  MedicationAdministration: "medications", MedicationDispense: "medications",
  AllergyIntolerance: "allergies", Condition: "conditions", Procedure: "procedures",
  Immunization: "immunizations", Encounter: "encounters", DocumentReference: "documents",
  Composition: "documents", DiagnosticReport: "documents", CarePlan: "care-plan",
  CareTeam: "care-plan", Goal: "care-plan", Claim: "claims", ExplanationOfBenefit: "claims",
  Consent: "consent",
};

function codings(value) {
  const list = Array.isArray(value) ? value : value ? [value] : [];
  return list.flatMap((c) => c.coding || []);
}

export function conceptText(cc) {
  if (!cc) return "";
  if (Array.isArray(cc)) return cc.map(conceptText).filter(Boolean).join(", ");
  if (cc.text) return cc.text;
  const c = (cc.coding || []).find((x) => x.display) || (cc.coding || [])[0];
  return c ? c.display || c.code || "" : "";
}

export function labelsOf(resource) {
  const sec = ((resource.meta && resource.meta.security) || []).map((s) => s.code);
  return [...new Set(sec.filter((c) => SENSITIVE.has(c)))].sort();
}

export function categoryOf(resource) {
  const type = resource.resourceType;
  const labels = labelsOf(resource);
  if (type === "Observation") {
    if (labels.includes("PSY")) return "mental-health";
    const declared = new Set(codings(resource.category).map((c) => c.code));
    for (const code of ["vital-signs", "laboratory", "social-history"]) {
      if (declared.has(code)) return code;
    }
    if (labels.includes("ETH")) return "social-history";
    return "other";
  }
  if (type === "Condition" && labels.includes("PSY")) return "mental-health";
  if (type === "DiagnosticReport") {
    return codings(resource.category).some((c) => c.code === "LAB" || c.code === "laboratory")
      ? "laboratory" : "documents";
  }
  return CATEGORY_BY_TYPE[type] || "other";
}

export function dateOf(r) {
  const period = (p) => (p ? p.start || p.end : undefined);
  const candidates = {
    Observation: [r.effectiveDateTime, period(r.effectivePeriod), r.issued],
    Condition: [r.onsetDateTime, period(r.onsetPeriod), r.recordedDate],
    MedicationRequest: [r.authoredOn],
    MedicationStatement: [r.effectiveDateTime, period(r.effectivePeriod), r.dateAsserted],
    AllergyIntolerance: [r.onsetDateTime, r.recordedDate],
    Immunization: [r.occurrenceDateTime, r.recorded],
    Encounter: [period(r.period)],
    Procedure: [r.performedDateTime, period(r.performedPeriod)],
    DiagnosticReport: [r.effectiveDateTime, period(r.effectivePeriod), r.issued],
    DocumentReference: [r.date],
    CarePlan: [period(r.period), r.created],
  }[r.resourceType] || [];
  return candidates.find(Boolean) || (r.meta && r.meta.lastUpdated) || "";
}

function num(v) {
  if (typeof v !== "number") return String(v ?? "");
  return Number.isInteger(v) ? String(v) : String(Math.round(v * 10) / 10);
}

const UNITS = { "mm[Hg]": "mmHg", Cel: "°C", "[degF]": "°F", "/min": "/min", "{score}": "points",
  "kg/m2": "kg/m²", "[lb_av]": "lb", "[in_i]": "in" };

function unitText(u) {
  return UNITS[u] ?? String(u || "").replace(/^\{(.*)\}$/, "$1");
}

function quantity(q) {
  if (!q) return "";
  const unit = unitText(q.unit || q.code);
  return `${num(q.value)}${unit === "%" ? "" : " "}${unit}`.trim();
}

function observationValue(o) {
  if (o.valueQuantity) return quantity(o.valueQuantity);
  if (o.valueCodeableConcept) return conceptText(o.valueCodeableConcept);
  if (o.valueString) return o.valueString;
  if (o.valueInteger !== undefined) return String(o.valueInteger);
  if (o.valueBoolean !== undefined) return o.valueBoolean ? "yes" : "no";
  const comps = o.component || [];
  if (comps.length) {
    const find = (code) => comps.find((c) => codings(c.code).some((x) => x.code === code));
    const sys = find("8480-6");
    const dia = find("8462-4");
    if (sys && dia && sys.valueQuantity && dia.valueQuantity) {
      return `${num(sys.valueQuantity.value)}/${num(dia.valueQuantity.value)} `
        + `${unitText(sys.valueQuantity.unit || "mmHg")}`;
    }
    return comps.map((c) => `${conceptText(c.code)} ${observationValue(c)}`.trim()).join("; ");
  }
  return o.dataAbsentReason ? `no value (${conceptText(o.dataAbsentReason)})` : "";
}

/** A one-line description a patient can read: "Body weight: 75.9 kg". */
export function summarize(r) {
  const join = (...parts) => parts.filter(Boolean).join(" · ");
  switch (r.resourceType) {
    case "Observation": {
      const value = observationValue(r);
      return value ? `${conceptText(r.code)}: ${value}` : conceptText(r.code);
    }
    case "Condition":
      return join(conceptText(r.code), conceptText(r.clinicalStatus),
        conceptText(r.verificationStatus) === "Confirmed" ? "" : conceptText(r.verificationStatus));
    case "MedicationRequest":
    case "MedicationStatement":
      return join(conceptText(r.medicationCodeableConcept)
        || (r.medicationReference && r.medicationReference.display) || "medication",
      (r.dosageInstruction || r.dosage || []).map((d) => d.text).filter(Boolean).join("; "),
      r.status);
    case "AllergyIntolerance":
      return join(conceptText(r.code),
        (r.reaction || []).flatMap((x) => (x.manifestation || []).map(conceptText)).join(", "),
        r.criticality ? `criticality ${r.criticality}` : "");
    case "Immunization":
      return join(conceptText(r.vaccineCode), r.status);
    case "Encounter":
      return join(conceptText(r.type) || (r.class && (r.class.display || r.class.code)),
        conceptText(r.reasonCode), r.status);
    case "Procedure":
      return join(conceptText(r.code), r.status);
    case "DiagnosticReport":
      return join(conceptText(r.code), r.conclusion);
    case "DocumentReference":
      return join(conceptText(r.type), r.description);
    case "CarePlan":
      return join(r.title, conceptText(r.category), r.status);
    case "Patient":
      return join(patientName(r), r.birthDate ? `born ${r.birthDate}` : "", r.gender);
    default:
      return (r.text && r.text.div ? r.text.div.replace(/<[^>]*>/g, " ").trim() : "")
        || `${r.resourceType}/${r.id}`;
  }
}

export function patientName(p) {
  const n = (p && p.name && (p.name.find((x) => x.use === "official") || p.name[0])) || null;
  if (!n) return p && p.id ? `Patient ${p.id}` : "Unknown patient";
  if (n.text) return n.text;
  return [...(n.given || []), n.family].filter(Boolean).join(" ");
}

const WITHHELD_RE = /^(\S+) \(([^)]*)\) withheld: ([\s\S]*)$/;

/** Split a searchset into resources, the Patient and the explicitly withheld items. */
export function parseSearchset(bundle) {
  const records = [];
  const withheld = [];
  let patient = null;
  for (const entry of (bundle && bundle.entry) || []) {
    const r = entry.resource || {};
    if (entry.search && entry.search.mode === "outcome" && r.resourceType === "OperationOutcome") {
      for (const issue of r.issue || []) {
        const m = WITHHELD_RE.exec(issue.diagnostics || "");
        if (!m) continue;
        const [type, id, , version] = m[1].split("/");
        withheld.push({ ref: m[1], type, id, version, category: m[2], reason: m[3] });
      }
      continue;
    }
    if (r.resourceType === "Patient") patient = r;
    records.push(r);
  }
  return { records, withheld, patient };
}
