// Data: upload a JSONL (POST /v1/files), its validation errors, and rows previewed as chat turns with the
// loss-carrying tokens highlighted (GET /v1/files/{id}/preview).
import {useState} from "preact/hooks";
import {api} from "./api.mjs";
import {ErrorLine, html, useApi, when} from "./ui.mjs";

const PREVIEW_ROWS = 20;

function Upload({onUploaded}) {
  const [error, setError] = useState(null);
  const [busy, setBusy] = useState(false);
  const submit = async (ev) => {
    ev.preventDefault();
    const input = ev.target.querySelector("#upload-file");
    if (!input.files.length) return;
    const form = new FormData();
    form.append("purpose", "fine-tune");
    form.append("file", input.files[0]);
    setBusy(true); setError(null);
    try { onUploaded(await api("/v1/files", {method: "POST", form})); input.value = ""; }
    catch (e) { setError(e); }
    finally { setBusy(false); }
  };
  return html`<form id="upload" class="row" onSubmit=${submit}>
    <input id="upload-file" type="file" accept=".jsonl,application/jsonl"/>
    <button id="upload-send" disabled=${busy}>${busy ? "Uploading..." : "Upload"}</button>
    <div id="upload-error">${html`<${ErrorLine} error=${error}/>`}</div>
  </form>`;
}

function Segments({segments}) {
  return segments.map((s) => html`<span class=${s.loss ? "seg loss" : "seg"} title=${s.loss ? "carries loss" : "context"}>${s.text}</span>`);
}

function Row({row}) {
  const byRole = [];
  for (const s of row.segments || []) {
    const last = byRole[byRole.length - 1];
    if (last && last.role === s.role) last.segments.push(s); else byRole.push({role: s.role, segments: [s]});
  }
  return html`<div class="chatrow" data-line=${row.line}>
    <div class="hint">line ${row.line}</div>
    ${byRole.map((t) => html`<div class=${"turn " + t.role}><b>${t.role}</b> <${Segments} segments=${t.segments}/></div>`)}
  </div>`;
}

function Preview({file}) {
  const {data, error} = useApi(`/v1/files/${file.id}/preview?limit=${PREVIEW_ROWS}`);
  return html`<section id="preview" data-file=${file.id}>
    <h3>${file.filename} <span class="hint">${file.id}, ${file.bytes} bytes</span></h3>
    <p class="hint">Highlighted: the tokens that carry loss (what the trainer learns from); the rest is context.</p>
    <${ErrorLine} error=${error}/>
    ${data && data.data.map((row) => html`<${Row} row=${row}/>`)}
  </section>`;
}

export function DataTab() {
  const files = useApi("/v1/files");
  const [shown, setShown] = useState(null);
  const uploaded = (f) => { setShown(f); files.reload(); };
  return html`<section id="data">
    <h2>Data</h2>
    <p class="hint">Chat, instruction, prompt/completion or preference rows, one JSON object per line. Every row is
      checked at upload with the trainer's own readers; a bad file is refused with its line and field, and nothing is stored.</p>
    <${Upload} onUploaded=${uploaded}/>
    <${ErrorLine} error=${files.error}/>
    <table id="files"><thead><tr><th>file</th><th>id</th><th>bytes</th><th>uploaded</th><th></th></tr></thead>
      <tbody>${(files.data ? files.data.data : []).map((f) => html`<tr data-file=${f.id}>
        <td>${f.filename}</td><td class="mono">${f.id}</td><td>${f.bytes}</td><td>${when(f.created_at)}</td>
        <td><button class="preview-btn" onClick=${() => setShown(f)}>Preview</button></td></tr>`)}</tbody></table>
    ${shown && html`<${Preview} key=${shown.id} file=${shown}/>`}
  </section>`;
}
