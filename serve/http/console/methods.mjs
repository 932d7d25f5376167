// GET /v1/fine_tuning/methods as [{method, hyperparameters: [{name, default, reason, type}]}], whatever
// the document's container (a list under `data`, or an object keyed by method).
export function normalizeMethods(doc) {
  if (!doc) return [];
  let items = doc.data || doc.methods || doc;
  if (!Array.isArray(items)) items = Object.entries(items).map(([method, v]) => ({method, ...v}));
  return items.map((m) => {
    let hp = m.hyperparameters || {};
    if (!Array.isArray(hp)) hp = Object.entries(hp).map(([name, v]) => ({name, ...v}));
    return {method: m.method || m.type || m.name, description: m.description || m.reason || "", hyperparameters: hp,
            extra: m};
  });
}

// The form's strings -> typed hyperparameters; blanks stay unset (the trainer's documented default applies).
export function hyperparameters(spec, values) {
  const out = {};
  for (const hp of spec.hyperparameters) {
    const v = (values[hp.name] ?? "").toString().trim();
    if (v === "") continue;
    const n = Number(v);
    out[hp.name] = v === "auto" ? "auto" : (Number.isFinite(n) ? n : v);
  }
  return out;
}
