// Train: start a job (base, method, hyperparameters with their documented default and reason, files), list
// the jobs on the server (a reload re-attaches: nothing lives in the page) and follow one live.
import {useEffect, useState} from "preact/hooks";
import {api} from "./api.mjs";
import {ErrorLine, html, useApi, when} from "./ui.mjs";
import {hyperparameters, normalizeMethods} from "./methods.mjs";
import {JobDetail} from "./job.mjs";

const JOBS_POLL_MS = 3000;  // the list's statuses; the open job polls faster (job.mjs)
const ACTIVE = ["validating_files", "queued", "running"];

function HyperparameterInputs({spec, values, setValues}) {
  return html`<table class="hp"><thead><tr><th>hyperparameter</th><th>value</th><th>default</th><th>why</th></tr></thead>
    <tbody>${spec.hyperparameters.map((hp) => html`<tr data-hp=${hp.name}>
      <td class="mono">${hp.name}</td>
      <td><input id=${"hp-" + hp.name} size="8" placeholder=${String(hp.default ?? "auto")} value=${values[hp.name] || ""}
        onInput=${(e) => setValues({...values, [hp.name]: e.target.value})}/></td>
      <td class="mono hp-default">${JSON.stringify(hp.default ?? null)}</td><td class="hint hp-reason">${hp.reason || ""}</td>
    </tr>`)}</tbody></table>`;
}

function NewJob({onCreated}) {
  const models = useApi("/v1/models");
  const files = useApi("/v1/files");
  const methodsDoc = useApi("/v1/fine_tuning/methods");
  const methods = normalizeMethods(methodsDoc.data);
  const [form, setForm] = useState({model: "", method: "supervised", training_file: "", validation_file: "", suffix: ""});
  const [values, setValues] = useState({});
  const [grader, setGrader] = useState('{"type": "string_check", "name": "exact", "input": "{{sample.output_text}}", "reference": "{{item.answer}}", "operation": "eq"}');
  const [error, setError] = useState(null);
  const set = (k) => (e) => setForm({...form, [k]: e.target.value});
  const bases = models.data ? models.data.data.filter((m) => !m.parent) : [];
  const fileList = files.data ? files.data.data : [];
  const spec = methods.find((m) => m.method === form.method) || {method: form.method, hyperparameters: []};
  const submit = async (ev) => {
    ev.preventDefault(); setError(null);
    const body = {model: form.model || (bases[0] && bases[0].id), training_file: form.training_file || (fileList[0] && fileList[0].id),
      method: {type: spec.method, [spec.method]: {hyperparameters: hyperparameters(spec, values)}}};
    if (spec.method === "reinforcement") {
      try { body.method.reinforcement.grader = JSON.parse(grader); } catch (e) { setError(new Error("grader: " + e.message)); return; }
    }
    if (form.validation_file) body.validation_file = form.validation_file;
    if (form.suffix) body.suffix = form.suffix;
    try { onCreated(await api("/v1/fine_tuning/jobs", {method: "POST", json: body})); } catch (e) { setError(e); }
  };
  return html`<form id="new-job" onSubmit=${submit}>
    <h3>New fine-tuning job</h3>
    <${ErrorLine} error=${models.error || files.error || methodsDoc.error}/>
    <div class="row">
      <label>Base <select id="job-model" onChange=${set("model")}>${bases.map((m) => html`<option value=${m.id}>${m.id}</option>`)}</select></label>
      <label>Method <select id="job-method" value=${form.method} onChange=${(e) => { setValues({}); set("method")(e); }}>
        ${(methods.length ? methods : [{method: "supervised"}]).map((m) => html`<option value=${m.method}>${m.method}</option>`)}</select></label>
      <label>Training file <select id="job-train" onChange=${set("training_file")}>${fileList.map((f) => html`<option value=${f.id}>${f.filename} (${f.id})</option>`)}</select></label>
      <label>Validation file <select id="job-valid" onChange=${set("validation_file")}><option value="">(a split of the training rows)</option>
        ${fileList.map((f) => html`<option value=${f.id}>${f.filename} (${f.id})</option>`)}</select></label>
      <label>Suffix <input id="job-suffix" size="10" value=${form.suffix} onInput=${set("suffix")}/></label>
    </div>
    ${spec.description && html`<p class="hint">${spec.description}</p>`}
    <${HyperparameterInputs} spec=${spec} values=${values} setValues=${setValues}/>
    ${spec.method === "reinforcement" && html`<label>Grader (JSON) <textarea id="job-grader" rows="3" cols="80"
      onInput=${(e) => setGrader(e.target.value)}>${grader}</textarea></label>`}
    <button id="job-start" disabled=${!bases.length || !fileList.length}>Start job</button>
    ${!fileList.length && html`<span class="hint"> upload a training file first (Data)</span>`}
    <${ErrorLine} error=${error}/>
  </form>`;
}

function JobList({jobs, selected, onSelect}) {
  return html`<table id="jobs"><thead><tr><th>job</th><th>status</th><th>base</th><th>fine-tuned model</th><th>created</th></tr></thead>
    <tbody>${jobs.map((j) => html`<tr data-job=${j.id} data-status=${j.status} class=${j.id === selected ? "selected" : ""}
      onClick=${() => onSelect(j.id)}><td class="mono"><a href="#train" onClick=${() => onSelect(j.id)}>${j.id}</a></td>
      <td class=${"status " + j.status}>${j.status}</td><td>${j.model}</td><td class="mono">${j.fine_tuned_model || "-"}</td>
      <td>${when(j.created_at)}</td></tr>`)}</tbody></table>`;
}

export function TrainTab({scopes}) {
  const list = useApi("/v1/fine_tuning/jobs?limit=20", JOBS_POLL_MS);
  const jobs = list.data ? list.data.data : [];
  const [selected, setSelected] = useState(sessionStorage.getItem("tunestack_console_job"));
  const select = (id) => { sessionStorage.setItem("tunestack_console_job", id); setSelected(id); };
  useEffect(() => {  // re-attach: the running job (else the newest) when nothing valid is selected
    if (!jobs.length || jobs.some((j) => j.id === selected)) return;
    select((jobs.find((j) => ACTIVE.includes(j.status)) || jobs[0]).id);
  }, [jobs.map((j) => j.id).join()]);
  return html`<section id="train">
    <h2>Train</h2>
    <${NewJob} onCreated=${(job) => { select(job.id); list.reload(); }}/>
    <h3>Jobs</h3>
    <${ErrorLine} error=${list.error}/>
    <${JobList} jobs=${jobs} selected=${selected} onSelect=${select}/>
    ${selected && html`<${JobDetail} key=${selected} id=${selected} scopes=${scopes} onChange=${list.reload}/>`}
  </section>`;
}
