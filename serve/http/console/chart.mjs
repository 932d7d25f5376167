// The loss curve (train and validation against the step), drawn with uPlot (vendor/, a global script).
import {useEffect, useRef} from "preact/hooks";
import {html} from "./ui.mjs";

// rows: [{step, train_loss, valid_loss}] -> uPlot's columns; a step with neither loss is left out
function columns(rows) {
  const kept = rows.filter((r) => r.train_loss != null || r.valid_loss != null).sort((a, b) => a.step - b.step);
  return [kept.map((r) => r.step), kept.map((r) => r.train_loss ?? null), kept.map((r) => r.valid_loss ?? null)];
}

export function LossChart({rows, id = "loss-chart"}) {
  const box = useRef(null);
  const plot = useRef(null);
  const data = columns(rows);
  useEffect(() => {
    const opts = {width: Math.min(760, box.current.clientWidth || 760), height: 260, scales: {x: {time: false}},
      axes: [{label: "step", incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]}, {label: "loss"}],
      series: [{label: "step"},
        {label: "train loss", stroke: "#1f6feb", width: 2, points: {show: true}},
        {label: "validation loss", stroke: "#d1242f", width: 2, spanGaps: true, points: {show: true}}]};
    plot.current = new window.uPlot(opts, data, box.current);
    return () => plot.current.destroy();
  }, []);
  useEffect(() => { if (plot.current) plot.current.setData(data); }, [JSON.stringify(data)]);
  const trainPoints = data[1].filter((v) => v !== null).length;
  const validPoints = data[2].filter((v) => v !== null).length;
  return html`<div id=${id} class="chart" ref=${box} data-train-points=${trainPoints} data-valid-points=${validPoints}></div>`;
}

// The series from the job's events (type "metrics", data {step, train_loss|valid_loss}): for a server
// without the metrics endpoint. Events come newest first.
export function rowsFromEvents(events) {
  const bySteps = new Map();
  for (const e of [...events].reverse()) {
    if (e.type !== "metrics" || !e.data || e.data.step == null) continue;
    bySteps.set(e.data.step, {...(bySteps.get(e.data.step) || {step: e.data.step}), ...e.data});
  }
  return [...bySteps.values()];
}
