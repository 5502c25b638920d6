// Records as a timeline grouped by year, newest first, with a category filter;
// withheld items (policy did not release them) are listed explicitly, never dropped.

import { badge, clear, formatDate, h } from "./dom.js";
import { categoryOf, dateOf, labelsOf, summarize, TYPE_NAMES } from "./fhir.js";

let counter = 0;

function recordItem(r) {
  const date = dateOf(r);
  const category = categoryOf(r);
  const labels = labelsOf(r);
  return h("li", { class: `record${labels.length ? " sensitive" : ""}`,
    dataset: { category, type: r.resourceType, id: r.id } },
  h("time", { datetime: date, class: "rec-date" }, formatDate(date)),
  h("div", { class: "rec-body" },
    h("div", { class: "rec-meta" },
      h("span", { class: "rec-type" }, TYPE_NAMES[r.resourceType] || r.resourceType),
      badge(category, "cat"),
      labels.map((l) => badge(l, "label-sensitive"))),
    h("p", { class: "rec-summary" }, summarize(r))));
}

function withheldItem(w) {
  return h("li", { class: "record withheld", dataset: { category: w.category, type: w.type } },
    h("span", { class: "rec-date" }, badge("Withheld", "withheld-badge")),
    h("div", { class: "rec-body" },
      h("div", { class: "rec-meta" },
        h("span", { class: "rec-type" }, TYPE_NAMES[w.type] || w.type),
        badge(w.category, "cat"),
        h("span", { class: "muted mono" }, `${w.type}/${w.id.slice(0, 8)}… v${w.version}`)),
      h("p", { class: "rec-summary" }, `Not shown: ${w.reason}`)));
}

function byYear(records) {
  const groups = new Map();
  const sorted = [...records].sort((a, b) => dateOf(b).localeCompare(dateOf(a)));
  for (const r of sorted) {
    const year = dateOf(r).slice(0, 4) || "Undated";
    if (!groups.has(year)) groups.set(year, []);
    groups.get(year).push(r);
  }
  return groups;
}

/** Render records (+ withheld) into container; returns nothing. */
export function renderTimeline(container, { records, withheld = [] }) {
  clear(container);
  const shown = records.filter((r) => r.resourceType !== "Patient");
  const categories = new Map();
  for (const r of shown) categories.set(categoryOf(r), (categories.get(categoryOf(r)) || 0) + 1);
  for (const w of withheld) categories.set(w.category, (categories.get(w.category) || 0) + 1);

  const filterId = `tl-filter-${++counter}`;
  const select = h("select", { id: filterId },
    h("option", { value: "" }, `All categories (${shown.length + withheld.length})`),
    [...categories.entries()].sort().map(([c, n]) => h("option", { value: c }, `${c} (${n})`)));
  const tools = h("div", { class: "timeline-tools" },
    h("label", { for: filterId }, "Show"), select);

  const parts = [tools];
  if (withheld.length) {
    const hid = `withheld-h-${counter}`;
    parts.push(h("section", { class: "withheld-group", "aria-labelledby": hid },
      h("h3", { id: hid }, `Withheld from you (${withheld.length})`),
      h("p", { class: "muted" }, "These records exist but were not released to you. "
        + "The reason is given for each one."),
      h("ul", { class: "records" }, withheld.map(withheldItem))));
  }
  if (!shown.length) {
    parts.push(h("p", { class: "empty" }, "No records to show."));
  } else {
    const years = [];
    for (const [year, items] of byYear(shown)) {
      const yid = `tl-year-${counter}-${year}`;
      years.push(h("li", { class: "tl-year" },
        h("h3", { id: yid }, year),
        h("ol", { class: "records", "aria-labelledby": yid }, items.map(recordItem))));
    }
    parts.push(h("ol", { class: "timeline", "aria-label": "Records by year, newest first" },
      years));
  }
  container.append(...parts);

  select.addEventListener("change", () => {
    const want = select.value;
    for (const li of container.querySelectorAll("li.record")) {
      li.hidden = Boolean(want) && li.dataset.category !== want;
    }
    for (const year of container.querySelectorAll("li.tl-year")) {
      year.hidden = !year.querySelector("li.record:not([hidden])");
    }
    const group = container.querySelector(".withheld-group");
    if (group) group.hidden = !group.querySelector("li.record:not([hidden])");
  });
}
