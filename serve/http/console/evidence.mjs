// A run's evidence (the registry's and a job's evaluation share one shape): task base vs tuned, retention by
// category with the answers that were lost, KL to base, the gate's verdict and reasons.
import {html, num, pct} from "./ui.mjs";

function Task({task}) {
  if (!task) return html`<p class="hint">No task evaluation recorded.</p>`;
  const gain = task.gain ?? 100 * (task.tuned - task.base);  // in points, as the manifest records it
  return html`<table class="task"><thead><tr><th>task metric</th><th>base</th><th>tuned</th><th>gain (points)</th></tr></thead>
    <tbody><tr><td>${task.metric}</td><td class="ev-task-base">${num(task.base)}</td><td class="ev-task-tuned">${num(task.tuned)}</td>
      <td class=${"ev-gain " + (gain > 0 ? "good" : "bad")}>${gain > 0 ? "+" : ""}${num(gain, 1)}</td></tr></tbody></table>`;
}

function Retention({retention}) {
  if (!retention) return html`<p class="hint ev-no-retention">Retention was not measured for this run.</p>`;
  const cats = Object.entries(retention.by_category || {});
  const o = retention.overall || {};
  return html`<table class="retention"><thead><tr><th>retention (general prompts)</th><th>base</th><th>tuned</th><th>kept</th></tr></thead>
    <tbody><tr class="overall"><td><b>overall</b></td><td class="ev-ret-base">${pct(o.base)}</td><td class="ev-ret-tuned">${pct(o.tuned)}</td><td>${pct(o.ratio)}</td></tr>
      ${cats.map(([c, v]) => html`<tr data-category=${c}><td>${c}</td><td>${pct(v.base)}</td><td>${pct(v.tuned)}</td><td>${pct(v.ratio)}</td></tr>`)}</tbody></table>
    ${(retention.lost_examples || []).length ? html`<details class="lost"><summary>${retention.lost_examples.length} answers the base got right and the tuned model lost</summary>
      ${retention.lost_examples.map((x) => html`<div class="lost-example"><div class="hint">${x.category}</div><div><b>prompt</b> ${x.prompt}</div>
        <div class="good"><b>base</b> ${x.base_answer}</div><div class="bad"><b>tuned</b> ${x.tuned_answer}</div></div>`)}</details>` : null}`;
}

function Gate({gate}) {
  if (!gate) return null;
  return html`<div class=${"gate " + (gate.passed ? "passed" : "refused")}>
    <b class="ev-gate">${gate.passed ? "gate passed" : "gate refused"}${gate.forced ? " (overridden)" : ""}</b>
    ${gate.override_reason && html` <span class="ev-override">override: ${gate.override_reason}</span>`}
    <ul>${(gate.reasons || []).map((r) => html`<li>${r}</li>`)}</ul></div>`;
}

export function Evidence({evidence}) {
  if (!evidence) return html`<p class="hint evidence none">No evidence recorded (published without an evaluation).</p>`;
  return html`<div class="evidence">
    <${Gate} gate=${evidence.gate}/>
    <${Task} task=${evidence.task}/>
    <${Retention} retention=${evidence.retention}/>
    <p>KL to base: <span class="ev-kl">${evidence.kl == null ? "-" : num(evidence.kl, 4)}</span></p>
  </div>`;
}
