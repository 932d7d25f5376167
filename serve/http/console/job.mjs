// One job, live: status, the loss curve (GET .../metrics, or its events on an older server), progress and ETA,
// checkpoints, events (a failed job's error event first), cancel.
import {useState} from "preact/hooks";
import {api, ApiError} from "./api.mjs";
import {ErrorLine, html, num, secs, useApi, when} from "./ui.mjs";
import {LossChart, rowsFromEvents} from "./chart.mjs";

const LIVE_POLL_MS = 2000;  // the curve's refresh while the job runs: a step takes seconds on a CPU
const ACTIVE = ["validating_files", "queued", "running"];

// fraction done from the last logged epoch and the job's n_epochs; ETA from the time since "started"
function progress(job, rows, events) {
  const epochs = Number(job.hyperparameters && job.hyperparameters.n_epochs);
  const last = rows.filter((r) => r.epoch != null).pop();
  const step = rows.length ? Math.max(...rows.map((r) => r.step)) : 0;
  const frac = last && epochs > 0 ? Math.min(1, last.epoch / epochs) : null;
  const started = events.filter((e) => e.message === "Fine-tuning job started").map((e) => e.created_at)[0];
  let eta = null;
  if (job.estimated_finish) eta = job.estimated_finish - Date.now() / 1000;
  else if (frac && started && job.status === "running") eta = (Date.now() / 1000 - started) * (1 - frac) / frac;
  return {step, frac, eta};
}

function Events({events}) {
  return html`<ol id="events" class="events">${events.slice(0, 15).map((e) => html`<li class=${"event " + e.level}>
    <span class="hint">${when(e.created_at)}</span> ${e.message}</li>`)}</ol>`;
}

export function JobDetail({id, scopes, onChange}) {
  const job = useApi(`/v1/fine_tuning/jobs/${id}`, LIVE_POLL_MS);
  const live = job.data && ACTIVE.includes(job.data.status);
  const metrics = useApi(`/v1/fine_tuning/jobs/${id}/metrics`, live ? LIVE_POLL_MS : 0);
  const events = useApi(`/v1/fine_tuning/jobs/${id}/events?limit=100`, live ? LIVE_POLL_MS : 0);
  const ckpts = useApi(`/v1/fine_tuning/jobs/${id}/checkpoints`, live ? LIVE_POLL_MS * 3 : 0);
  const [error, setError] = useState(null);
  if (!job.data) return html`<${ErrorLine} error=${job.error}/>`;
  const j = job.data;
  const evs = events.data ? events.data.data : [];
  const noMetricsApi = metrics.error instanceof ApiError && metrics.error.status === 404;
  const rows = metrics.data ? metrics.data.data : (noMetricsApi ? rowsFromEvents(evs) : []);
  const p = progress(j, rows, evs);
  const cancel = async () => {
    setError(null);
    try { await api(`/v1/fine_tuning/jobs/${id}/cancel`, {method: "POST"}); job.reload(); onChange(); } catch (e) { setError(e); }
  };
  const failed = evs.find((e) => e.level === "error");
  return html`<section id="job" data-job=${id} data-status=${j.status}>
    <h3>Job <span class="mono">${id}</span>: <span id="job-status" class=${"status " + j.status}>${j.status}</span></h3>
    ${j.status === "failed" && html`<p id="job-error" class="err" role="alert">${failed ? failed.message :
      (j.error && j.error.message) || "failed"}${j.error && j.error.code ? ` (${j.error.code})` : ""}</p>`}
    <p>base <b>${j.model}</b>${j.fine_tuned_model && html`, tuned <b class="mono">${j.fine_tuned_model}</b>`};
      hyperparameters <span class="mono">${JSON.stringify(j.hyperparameters || {})}</span></p>
    <p id="progress">step ${p.step}${p.frac !== null ? html` (${(100 * p.frac).toFixed(0)} %)` : null}
      <progress max="1" value=${p.frac ?? 0}></progress> ETA ${live ? secs(p.eta) : "-"}
      ${live && scopes.includes("finetune") && html` <button id="job-cancel" onClick=${cancel}>Cancel</button>`}</p>
    <${ErrorLine} error=${error || (metrics.error && !noMetricsApi ? metrics.error : null)}/>
    <${LossChart} rows=${rows}/>
    <p class="hint">last train loss ${num(rows.filter((r) => r.train_loss != null).map((r) => r.train_loss).pop())},
      validation ${num(rows.filter((r) => r.valid_loss != null).map((r) => r.valid_loss).pop())}</p>
    <h4>Checkpoints</h4>
    <ul id="checkpoints">${(ckpts.data ? ckpts.data.data : []).map((c) => html`<li class="mono">step ${c.step_number}:
      ${c.fine_tuned_model_checkpoint} ${c.metrics && c.metrics.train_loss != null ? `(loss ${num(c.metrics.train_loss)})` : ""}</li>`)}</ul>
    ${j.status === "succeeded" && html`<p><a id="job-evaluate" href=${"#evaluate"} onClick=${() => sessionStorage.setItem("tunestack_console_job", id)}>Evaluation and publish</a></p>`}
    <h4>Events</h4>
    <${Events} events=${evs}/>
  </section>`;
}
