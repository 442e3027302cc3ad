// The loss chart: an SVG line of training loss by step, drawn from the job's metrics events.

const NS = "http://www.w3.org/2000/svg";
const W = 560, H = 220, PAD = { left: 52, right: 16, top: 14, bottom: 34 };

function svg(tag, attrs = {}, text) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  if (text !== undefined) el.textContent = text;
  return el;
}

function ticks(lo, hi, n) {
  const step = (hi - lo) / n || 1;
  return Array.from({ length: n + 1 }, (_, i) => lo + i * step);
}

// `points`: [{step, loss}] in step order; a series per key of `series` ({name: points}).
export function lossChart(series) {
  const all = Object.values(series).flat();
  const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img" });
  const first = series.train?.[0], last = series.train?.[series.train.length - 1];
  const label = first
    ? `Training loss by step: ${first.loss.toFixed(3)} at step ${first.step}, ` +
      `${last.loss.toFixed(3)} at step ${last.step}`
    : "Training loss: no steps yet";
  chart.setAttribute("aria-label", label);
  chart.append(svg("title", {}, label));
  if (!all.length) {
    chart.append(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "No steps yet"));
    return chart;
  }
  const steps = all.map((p) => p.step), losses = all.map((p) => p.loss);
  const x0 = Math.min(...steps), x1 = Math.max(...steps, x0 + 1);
  const y0 = Math.min(0, ...losses), y1 = Math.max(...losses) * 1.05 || 1;
  const x = (s) => PAD.left + ((s - x0) / (x1 - x0)) * (W - PAD.left - PAD.right);
  const y = (l) => H - PAD.bottom - ((l - y0) / (y1 - y0)) * (H - PAD.top - PAD.bottom);
  for (const t of ticks(y0, y1, 4)) {
    chart.append(svg("line", { x1: PAD.left, x2: W - PAD.right, y1: y(t), y2: y(t), class: "grid" }));
    chart.append(svg("text", { x: PAD.left - 6, y: y(t) + 4, "text-anchor": "end" }, t.toFixed(2)));
  }
  for (const t of ticks(x0, x1, Math.min(5, x1 - x0))) {
    chart.append(svg("text", { x: x(t), y: H - PAD.bottom + 16, "text-anchor": "middle" },
      Math.round(t)));
  }
  chart.append(svg("text", { x: W / 2, y: H - 4, "text-anchor": "middle" }, "step"));
  for (const [name, points] of Object.entries(series)) {
    if (!points.length) continue;
    const d = points.map((p, i) => `${i ? "L" : "M"}${x(p.step).toFixed(1)},${y(p.loss).toFixed(1)}`);
    chart.append(svg("path", { d: d.join(" "), class: `line line-${name}` }));
  }
  return chart;
}
