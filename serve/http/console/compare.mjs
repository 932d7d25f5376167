// Compare: one prompt to two or more models side by side, streamed, with token counts and latency.
import {useState} from "preact/hooks";
import {explain, streamChat} from "./api.mjs";
import {ErrorLine, html, modelLabel, useApi} from "./ui.mjs";

function Answer({a}) {
  return html`<div class="answer" data-model=${a.model} data-done=${a.done ? "1" : "0"}>
    <h4 class="mono">${a.model}</h4>
    <div class="answer-text">${a.text}</div>
    ${a.error ? html`<p class="err">${a.error}</p>` : html`<p class="hint answer-stats">
      ${a.usage ? `${a.usage.completion_tokens} tokens` : "..."}, first token ${a.ttft ?? "-"} ms, total ${a.total ?? "-"} ms</p>`}
  </div>`;
}

async function ask(model, prompt, settings, update) {
  const t0 = performance.now();
  let ttft = null, text = "";
  try {
    const usage = await streamChat({model, messages: [{role: "user", content: prompt}], ...settings}, (d) => {
      if (ttft === null) ttft = Math.round(performance.now() - t0);
      text += d;
      update({text, ttft});
    });
    update({text, ttft, usage, total: Math.round(performance.now() - t0), done: true});
  } catch (e) {
    update({error: explain(e), done: true});
  }
}

export function CompareTab() {
  const models = useApi("/v1/models");
  const [picked, setPicked] = useState([]);
  const [prompt, setPrompt] = useState("");
  const [settings, setSettings] = useState({max_tokens: 48, temperature: 0});
  const [answers, setAnswers] = useState([]);
  const all = models.data ? models.data.data : [];
  const toggle = (id) => setPicked(picked.includes(id) ? picked.filter((x) => x !== id) : [...picked, id]);
  const send = (ev) => {
    ev.preventDefault();
    const chosen = picked.length ? picked : all.slice(0, 2).map((m) => m.id);
    setAnswers(chosen.map((model) => ({model, text: ""})));
    chosen.forEach((model, i) => ask(model, prompt, settings, (patch) =>
      setAnswers((cur) => cur.map((a, j) => j === i ? {...a, ...patch} : a))));
  };
  return html`<section id="compare">
    <h2>Compare</h2>
    <${ErrorLine} error=${models.error}/>
    <div class="pick">${all.map((m) => html`<label><input type="checkbox" class="compare-model" value=${m.id}
      checked=${picked.includes(m.id)} onChange=${() => toggle(m.id)}/> ${modelLabel(m)}</label>`)}</div>
    <form id="compare-form" class="row" onSubmit=${send}>
      <input id="compare-prompt" size="60" placeholder="One prompt, sent to every checked model" value=${prompt}
        onInput=${(e) => setPrompt(e.target.value)}/>
      <label>max tokens <input id="compare-max" type="number" min="1" max="512" value=${settings.max_tokens} style="width:5em"
        onInput=${(e) => setSettings({...settings, max_tokens: Number(e.target.value)})}/></label>
      <label>temperature <input id="compare-temp" type="number" min="0" max="2" step="0.1" value=${settings.temperature} style="width:4em"
        onInput=${(e) => setSettings({...settings, temperature: Number(e.target.value)})}/></label>
      <button id="compare-send" disabled=${!prompt.trim() || !all.length}>Send to ${picked.length || Math.min(2, all.length)} models</button>
    </form>
    <div id="answers" class="answers">${answers.map((a) => html`<${Answer} a=${a}/>`)}</div>
  </section>`;
}
