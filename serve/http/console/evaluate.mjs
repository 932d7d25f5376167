// Evaluate & publish: a finished job's evidence (GET .../evaluation); publish, or override the gate with a
// recorded reason (POST .../publish, admin keys only).
import {useState} from "preact/hooks";
import {api, ApiError} from "./api.mjs";
import {ErrorLine, html, useApi} from "./ui.mjs";
import {Evidence} from "./evidence.mjs";

const FINISHED = ["succeeded", "failed"];

function Publish({job, evidence, onDone}) {
  const [reason, setReason] = useState("");
  const [error, setError] = useState(null);
  const [done, setDone] = useState(null);
  const refused = evidence && evidence.gate && !evidence.gate.passed;
  const submit = async (ev) => {
    ev.preventDefault(); setError(null);
    try {
      setDone(await api(`/v1/fine_tuning/jobs/${job.id}/publish`, {method: "POST",
        json: {override_reason: refused ? reason : null}}));
      onDone();
    } catch (e) { setError(e); }
  };
  return html`<form id="publish" onSubmit=${submit}>
    ${refused && html`<label>Override reason (recorded with the version) <input id="override-reason" size="50"
      value=${reason} onInput=${(e) => setReason(e.target.value)} required/></label>`}
    <button id="publish-btn">${refused ? "Override the gate and publish" : "Publish"}</button>
    ${done && html`<p id="publish-done" class="good">Published${done.fine_tuned_model ? ` as ${done.fine_tuned_model}` : ""}.</p>`}
    <${ErrorLine} error=${error}/>
  </form>`;
}

function JobEvidence({job, scopes, onChange}) {
  const ev = useApi(`/v1/fine_tuning/jobs/${job.id}/evaluation`);
  const notYet = ev.error instanceof ApiError && ev.error.status === 404;
  const published = job.status === "succeeded" && job.fine_tuned_model;
  return html`<section id="evaluation" data-job=${job.id}>
    <h3>Job <span class="mono">${job.id}</span> (${job.status}) on ${job.model}</h3>
    ${notYet ? html`<p class="hint">This job's run has not been evaluated (yet).</p>` : html`<${ErrorLine} error=${ev.error}/>`}
    ${ev.data && html`<${Evidence} evidence=${ev.data}/>`}
    ${published ? html`<p class="good">Published: <b class="mono">${job.fine_tuned_model}</b></p>`
      : ev.data && scopes.includes("admin") ? html`<${Publish} job=${job} evidence=${ev.data} onDone=${onChange}/>`
      : ev.data ? html`<p class="hint">Not published; publishing or overriding the gate needs an admin key.</p>` : null}
  </section>`;
}

export function EvaluateTab({scopes}) {
  const list = useApi("/v1/fine_tuning/jobs?limit=50");
  const jobs = (list.data ? list.data.data : []).filter((j) => FINISHED.includes(j.status));
  const [picked, setPicked] = useState(sessionStorage.getItem("tunestack_console_job"));
  const job = jobs.find((j) => j.id === picked) || jobs[0];
  return html`<section id="evaluate">
    <h2>Evaluate & publish</h2>
    <${ErrorLine} error=${list.error}/>
    ${list.data && !jobs.length && html`<p class="hint">No finished job yet.</p>`}
    ${jobs.length > 0 && html`<label>Job <select id="eval-job" value=${job && job.id} onChange=${(e) => setPicked(e.target.value)}>
      ${jobs.map((j) => html`<option value=${j.id}>${j.id} (${j.status}${j.fine_tuned_model ? ", " + j.fine_tuned_model : ""})</option>`)}</select></label>`}
    ${job && html`<${JobEvidence} key=${job.id} job=${job} scopes=${scopes} onChange=${list.reload}/>`}
  </section>`;
}
