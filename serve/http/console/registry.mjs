// Registry: every name, its versions, which one serves, each version's evidence and training curve; roll back
// (admin keys only) after a confirmation.
import {useEffect, useRef, useState} from "preact/hooks";
import {api} from "./api.mjs";
import {ErrorLine, html, num, useApi, when} from "./ui.mjs";
import {Evidence} from "./evidence.mjs";
import {LossChart} from "./chart.mjs";

const enc = encodeURIComponent;

function VersionDetail({name, v}) {
  const metrics = useApi(`/v1/registry/models/${enc(name)}/versions/${enc(v.version)}/metrics`);
  return html`<div class="version-detail">
    <${Evidence} evidence=${v.evidence}/>
    ${metrics.data && metrics.data.data.length ? html`<${LossChart} id=${`chart-${name}-${v.version}`} rows=${metrics.data.data}/>` : null}
  </div>`;
}

function summary(ev) {
  if (!ev) return "no evidence";
  const t = ev.task;
  const gate = ev.gate ? (ev.gate.passed ? "gate passed" : ev.gate.forced ? "gate overridden" : "gate refused") : "";
  return [t && `${t.metric} ${num(t.base)} -> ${num(t.tuned)}`, gate].filter(Boolean).join(", ");
}

function Entry({entry, admin, onRollback}) {
  const [open, setOpen] = useState(null);
  return html`<section class="entry" data-name=${entry.name}>
    <h3>${entry.name} <span class="hint">${entry.kind}, serving <b class="serving-version">${entry.serving_version || "none"}</b></span></h3>
    <table class="versions"><thead><tr><th>version</th><th>published</th><th>serving</th><th>evidence</th><th></th></tr></thead>
      <tbody>${entry.versions.map((v) => html`<tr data-version=${v.version} class=${v.serving ? "serving" : ""}>
        <td class="mono">${v.version}</td><td>${when(v.created_at)}</td><td>${v.serving ? "serving" : ""}</td>
        <td>${summary(v.evidence)} <button class="evidence-btn" onClick=${() => setOpen(open === v.version ? null : v.version)}>
          ${open === v.version ? "Hide" : "Evidence"}</button></td>
        <td>${admin && !v.serving && html`<button class="rollback-btn" onClick=${() => onRollback(entry.name, v.version)}>Roll back to ${v.version}</button>`}</td>
      </tr>${open === v.version && html`<tr><td colspan="5"><${VersionDetail} name=${entry.name} v=${v}/></td></tr>`}`)}</tbody></table>
  </section>`;
}

function Confirm({ask, onYes, onNo}) {
  const box = useRef(null);
  useEffect(() => { box.current.showModal(); return () => box.current && box.current.close(); }, []);
  return html`<dialog ref=${box} id="confirm" class="confirm" onCancel=${onNo}>
    <p>Roll <b>${ask.name}</b> back to <b>${ask.version}</b>? Every replica serves it within the registry poll interval.</p>
    <button id="confirm-yes" onClick=${onYes}>Roll back</button> <button id="confirm-no" onClick=${onNo}>Cancel</button>
  </dialog>`;
}

export function RegistryTab({scopes}) {
  const list = useApi("/v1/registry/models");
  const [ask, setAsk] = useState(null);
  const [error, setError] = useState(null);
  const [done, setDone] = useState(null);
  const admin = scopes.includes("admin");
  const rollback = async () => {
    const {name, version} = ask;
    setAsk(null); setError(null);
    try {
      const entry = await api(`/v1/registry/models/${enc(name)}/rollback`, {method: "POST", json: {version}});
      setDone(`${entry.name} now serves ${entry.serving_version}`);
      list.reload();
    } catch (e) { setError(e); }
  };
  return html`<section id="registry">
    <h2>Registry</h2>
    ${!admin && html`<p class="hint">Rolling back needs an admin key.</p>`}
    <${ErrorLine} error=${list.error || error}/>
    ${done && html`<p id="rollback-done" class="good">${done}.</p>`}
    ${ask && html`<${Confirm} ask=${ask} onYes=${rollback} onNo=${() => setAsk(null)}/>`}
    ${(list.data ? list.data.data : []).map((e) => html`<${Entry} key=${e.name} entry=${e} admin=${admin}
      onRollback=${(name, version) => setAsk({name, version})}/>`)}
  </section>`;
}
