// The console: a key box, the key's scopes (GET /v1/me), and one section per task, hidden where the scope lacks.
import {render} from "preact";
import {useEffect, useState} from "preact/hooks";
import {api, ApiError, explain, getKey, setKey} from "./api.mjs";
import {html} from "./ui.mjs";
import {DataTab} from "./data.mjs";
import {TrainTab} from "./train.mjs";
import {EvaluateTab} from "./evaluate.mjs";
import {RegistryTab} from "./registry.mjs";
import {CompareTab} from "./compare.mjs";

// tab -> the scope it needs (docs/console.md); the admin-only buttons check `admin` inside their tab
const TABS = [
  {id: "data", label: "Data", scope: "finetune", view: DataTab},
  {id: "train", label: "Train", scope: "finetune", view: TrainTab},
  {id: "evaluate", label: "Evaluate & publish", scope: "finetune", view: EvaluateTab},
  {id: "registry", label: "Registry", scope: "finetune", view: RegistryTab},
  {id: "compare", label: "Compare", scope: "inference", view: CompareTab},
];

function KeyBox({onKey}) {
  const [value, setValue] = useState(getKey());
  const save = (ev) => { ev.preventDefault(); setKey(value.trim()); onKey(value.trim()); };
  return html`<form class="keybox" onSubmit=${save}>
    <label>API key <input id="key" type="password" size="24" autocomplete="off" value=${value}
      onInput=${(e) => setValue(e.target.value)} placeholder="Bearer key"/></label>
    <button id="key-save">Use key</button>
  </form>`;
}

// The key's scopes: GET /v1/me, or a message saying why there are none (401: wrong or missing key).
async function whoAmI() {
  try {
    const me = await api("/v1/me");
    return {scopes: ["inference", "finetune", "admin"].filter((s) => (me.scopes || []).includes(s)), error: null};
  } catch (e) {
    // a server older than /v1/me: its one key may do everything the console does (the API still says 403)
    if (e instanceof ApiError && e.status === 404) return {scopes: ["inference", "finetune", "admin"], error: null};
    return {scopes: [], error: e};
  }
}

function App() {
  const [key, setKeyState] = useState(getKey());
  const [me, setMe] = useState(null);
  const [tab, setTab] = useState((location.hash || "#").slice(1));
  useEffect(() => { setMe(null); whoAmI().then(setMe); }, [key]);
  useEffect(() => {
    const onHash = () => setTab(location.hash.slice(1));
    addEventListener("hashchange", onHash);
    return () => removeEventListener("hashchange", onHash);
  }, []);
  const allowed = me ? TABS.filter((t) => me.scopes.includes(t.scope)) : [];
  const current = allowed.find((t) => t.id === tab) || allowed[0];
  return html`<header>
      <h1>tunestack console</h1>
      <${KeyBox} onKey=${setKeyState}/>
      ${me && html`<span id="scopes" class="hint">scopes: ${me.scopes.join(", ") || "none"}</span>`}
    </header>
    ${me === null ? html`<p class="hint">Checking the key...</p>` : null}
    ${me && me.error ? html`<p id="auth-error" class="err" role="alert">${explain(me.error)}</p>` : null}
    ${me && !me.error && !allowed.length ? html`<p id="auth-error" class="err">This key has no scope the console uses.</p>` : null}
    <nav>${allowed.map((t) => html`<a href=${"#" + t.id} id=${"tab-" + t.id}
      class=${current && t.id === current.id ? "active" : ""}>${t.label}</a>`)}</nav>
    <main>${current && html`<${current.view} key=${key + current.id} scopes=${me.scopes}/>`}</main>`;
}

// An uncaught error is shown on the page (and stays in the browser log the tests read), never a blank page.
addEventListener("error", (e) => showFatal(e.message));
addEventListener("unhandledrejection", (e) => showFatal(e.reason instanceof ApiError ? explain(e.reason) : String(e.reason)));
function showFatal(msg) {
  const p = document.createElement("p");
  p.className = "err fatal"; p.textContent = "console error: " + msg;
  document.body.prepend(p);
}

render(html`<${App}/>`, document.getElementById("root"));
