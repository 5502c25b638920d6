// Accesses per day as an inline SVG bar chart: allowed / refused / break-the-glass
// stacked, break-glass days flagged with a red marker. No libraries.

import { clear, h, s } from "./dom.js";

const MAX_DAYS = 60;

function dayKey(d) {
  const pad = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}`;
}

function bucket(events) {
  const days = new Map();
  for (const ev of events) {
    const t = new Date(ev.recorded);
    if (Number.isNaN(t.getTime())) continue;
    const key = dayKey(t);
    const b = days.get(key) || { day: key, date: t, ok: 0, refused: 0, bg: 0 };
    if (ev.break_glass) b.bg += 1;
    else if (ev.outcome !== "0") b.refused += 1;
    else b.ok += 1;
    days.set(key, b);
  }
  if (!days.size) return [];
  const dates = [...days.values()].map((b) => b.date).sort((a, b) => a - b);
  const last = new Date(dates[dates.length - 1]);
  let first = new Date(dates[0]);
  const earliest = new Date(last);
  earliest.setDate(earliest.getDate() - (MAX_DAYS - 1));
  if (first < earliest) first = earliest;
  // a little context on either side of a single busy day
  if (dayKey(first) === dayKey(last)) first.setDate(first.getDate() - 6);
  const out = [];
  for (const d = new Date(first.getFullYear(), first.getMonth(), first.getDate());
    d <= last; d.setDate(d.getDate() + 1)) {
    const key = dayKey(d);
    out.push(days.get(key) || { day: key, ok: 0, refused: 0, bg: 0 });
  }
  return out;
}

function niceMax(n) {
  if (n <= 5) return Math.max(n, 1);
  const p = 10 ** Math.floor(Math.log10(n));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= n) return m * p;
  return n;
}

export function renderAccessChart(container, events) {
  clear(container);
  const days = bucket(events);
  if (!days.length) {
    container.append(h("p", { class: "empty" }, "No accesses recorded yet."));
    return;
  }
  const W = 720, H = 220, L = 40, R = 12, T = 24, B = 40;
  const plotW = W - L - R, plotH = H - T - B;
  const total = (b) => b.ok + b.refused + b.bg;
  const max = niceMax(Math.max(...days.map(total)));
  const step = plotW / days.length;
  const bw = Math.max(2, Math.min(28, step * 0.7));
  const y = (v) => T + plotH - (v / max) * plotH;
  const sumAll = days.reduce((a, b) => a + total(b), 0);
  const sumBg = days.reduce((a, b) => a + b.bg, 0);
  const sumRefused = days.reduce((a, b) => a + b.refused, 0);
  const label = `Accesses per day from ${days[0].day} to ${days[days.length - 1].day}: `
    + `${sumAll} in all, ${sumRefused} refused, ${sumBg} break-the-glass.`;

  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, class: "access-chart", role: "img",
    "aria-label": label, preserveAspectRatio: "xMidYMid meet" });
  svg.append(s("title", {}, label));
  for (const v of [0, max / 2, max]) {
    svg.append(s("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), class: "grid" }));
    svg.append(s("text", { x: L - 6, y: y(v) + 4, class: "axis", "text-anchor": "end" },
      Number.isInteger(v) ? String(v) : v.toFixed(1)));
  }
  const every = Math.max(1, Math.ceil(days.length / 8));
  days.forEach((b, i) => {
    const x = L + i * step + (step - bw) / 2;
    const g = s("g", { class: "bar" });
    let base = 0;
    for (const [n, cls] of [[b.ok, "seg-ok"], [b.refused, "seg-refused"], [b.bg, "seg-bg"]]) {
      if (!n) continue;
      g.append(s("rect", { x, width: bw, y: y(base + n), height: y(base) - y(base + n),
        class: cls }));
      base += n;
    }
    g.append(s("title", {}, `${b.day}: ${total(b)} accesses`
      + (b.refused ? `, ${b.refused} refused` : "") + (b.bg ? `, ${b.bg} break-the-glass` : "")));
    if (b.bg) {
      const cx = x + bw / 2, top = y(base) - 6;
      g.append(s("path", { d: `M${cx - 6},${top - 10} L${cx + 6},${top - 10} L${cx},${top} Z`,
        class: "bg-marker" }));
    }
    svg.append(g);
    if (i % every === 0 || i === days.length - 1) {
      svg.append(s("text", { x: x + bw / 2, y: H - B + 16, class: "axis",
        "text-anchor": "middle" }, b.day.slice(5)));
    }
  });
  svg.append(s("line", { x1: L, x2: W - R, y1: y(0), y2: y(0), class: "baseline" }));
  svg.append(s("text", { x: L, y: H - 6, class: "axis" }, `days (${days[0].day.slice(0, 4)})`));
  container.append(svg);
}
