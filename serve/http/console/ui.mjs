// Small shared pieces: htm bound to preact, a hook that loads an API path, an error line, number formats.
import {h} from "preact";
import {useCallback, useEffect, useState} from "preact/hooks";
import htm from "htm";
import {api, explain} from "./api.mjs";

export const html = htm.bind(h);

// {data, error, loading, reload} of GET `path` (null path: nothing loaded); `every` ms: poll while mounted.
export function useApi(path, every = 0) {
  const [st, setSt] = useState({data: null, error: null, loading: !!path});
  const reload = useCallback(async () => {
    if (!path) return;
    try { setSt({data: await api(path), error: null, loading: false}); }
    catch (e) { setSt((s) => ({data: s.data, error: e, loading: false})); }
  }, [path]);
  useEffect(() => {
    setSt({data: null, error: null, loading: !!path});
    reload();
    if (!every || !path) return undefined;
    const t = setInterval(reload, every);
    return () => clearInterval(t);
  }, [path, every]);
  return {...st, reload};
}

export const ErrorLine = ({error}) => error ? html`<p class="err" role="alert">${explain(error)}</p>` : null;

export const pct = (x) => (x === null || x === undefined) ? "-" : `${(100 * x).toFixed(1)} %`;
export const num = (x, d = 3) => (x === null || x === undefined) ? "-" : Number(x).toFixed(d);
export const when = (t) => t ? new Date(t * 1000).toLocaleString() : "-";

export function secs(s) {
  if (s === null || s === undefined || !isFinite(s)) return "-";
  s = Math.max(0, Math.round(s));
  return s >= 60 ? `${Math.floor(s / 60)} min ${s % 60} s` : `${s} s`;
}

// Base models (no parent) and adapters of /v1/models, for pickers.
export function modelLabel(m) {
  return m.parent ? `${m.id} (adapter on ${m.parent})` : `${m.id} (base)`;
}
