"""tunestack registry list | publish | rollback | prune: the versions serving reads, their evidence and the gate.

    list                      the base, each name with the version it serves, and every kept version
    publish SRC               a finished run or an exported folder -> a new version, through the publish gate
    rollback NAME@vN          point NAME back (or forward) to a kept version; replicas follow on their next poll
    prune [NAME]              delete the oldest versions beyond --keep, never the one a name serves

Only the registry's own contract (artifacts/) is needed: it runs wherever serving runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from artifacts import GatePolicy, GateRefused, Manifest, ManifestError, Registry, RegistryError, split_ref
from artifacts.registry import KEEP_VERSIONS
from lm.cli import HelpFormatter

KINDS = ("adapters", "models")  # the versioned kinds (the base is registered once, never versioned)


def configure(ap: argparse.ArgumentParser) -> None:
    ap.description, ap.formatter_class = __doc__, HelpFormatter
    sub = ap.add_subparsers(dest="registry_cmd", required=True)

    def add(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)
        p.add_argument("--registry", type=Path, default=Path("registry"), help="the registry folder")
        return p

    add("list", "the base, each name with the version it serves and its evidence, and every kept version")
    p = add("publish", "publish a finished run (its adapter or model) or an exported folder, through the gate")
    p.add_argument("src", type=Path, help="a finished run directory or an exported model folder (tunestack export)")
    p.add_argument("--name", help="registry name; unset: a run's folder name (an export must be named)")
    p.add_argument("--override-gate", metavar="REASON",
                   help="publish even if the gate refuses; REASON is recorded in the manifest and the card")
    p.add_argument("--min-gain", type=float, help="task gain in points the gate requires "
                   f"(unset: a run's publish.min_gain, else {GatePolicy.min_gain:g})")
    p.add_argument("--max-retention-drop", type=float, help="retention drop in points the gate allows "
                   f"(unset: a run's publish.max_retention_drop, else {GatePolicy.max_retention_drop:g})")
    p.add_argument("--keep", type=int, help=f"versions kept per name (unset: a run's publish.keep_versions, "
                   f"else {KEEP_VERSIONS}); never the one served")
    r = add("rollback", "point NAME back (or forward) to a kept version; serving replicas follow on their next poll")
    r.add_argument("ref", help="NAME@vN: the version NAME should serve")
    r.add_argument("--kind", choices=KINDS, default="adapters", help="adapters (LoRA etc.) or models (full weights)")
    pr = add("prune", "delete the oldest versions beyond --keep, never the one a name serves")
    pr.add_argument("name", nargs="?", help="prune this name only; unset: every name")
    pr.add_argument("--keep", type=int, default=KEEP_VERSIONS, help="versions kept per name")
    pr.add_argument("--kind", choices=KINDS, help="prune this kind only; unset: both")


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed registry command; a refusal exits 2 with one line."""
    commands = {"list": cmd_list, "publish": cmd_publish, "rollback": cmd_rollback, "prune": cmd_prune}
    try:
        return commands[args.registry_cmd](args)
    except (RegistryError, GateRefused, ManifestError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


# -- list ------------------------------------------------------------------------------------------
def _evidence_line(m: Manifest) -> str:
    """Task gain, retention and the gate's verdict of one entry, from its manifest."""
    head, ret, gate = m.metrics.get("headline") or {}, m.metrics.get("retention") or {}, m.extra.get("gate") or {}
    gain = f"gain {head['gain_points']:+.1f} ({head.get('metric')})" if head.get("gain_points") is not None else "gain n/a"
    kept = (f"retention {100 * ret['base']:.1f} -> {100 * ret['tuned']:.1f} %" if ret.get("base") is not None
            else "retention n/a")
    if not gate or gate.get("checked") is False:
        verdict = "gate not checked"
    else:
        why = f" by {gate['override_reason']!r}" if gate.get("override_reason") else ""
        verdict = (f"gate {'OVERRIDDEN' + why if gate.get('forced') else 'passed'} "
                   f"(min_gain {gate.get('min_gain'):g}, max_retention_drop {gate.get('max_retention_drop'):g})")
    return f"{gain}, {kept}, {verdict}"


def _entry_line(reg: Registry, kind: str, ref: str, base_sha: str | None) -> str:
    try:
        m = reg.verify(kind, ref)
    except ManifestError as e:
        return f"REFUSED: {e}"
    if kind == "adapters" and m.base_model.get("sha256") != base_sha:
        return "REFUSED: trained on another base"
    v = m.servability.get("vllm", {})
    vl = f"vllm ok (max-lora-rank {v.get('max_lora_rank')})" if v.get("ok") else "vllm no: " + "; ".join(v.get("reasons", []))
    return f"{m.method} r={(m.peft_config or {}).get('r')}  {vl}  {_evidence_line(m)}"


def cmd_list(args: argparse.Namespace) -> int:
    """Base, then each adapter and model: the version its name serves, and every kept version."""
    reg = Registry(args.registry)
    base = reg.base()
    if base is None:
        raise RegistryError(f"{args.registry}: no base model registered (publish a run first)")
    base_sha = reg.manifest("base", base[0]).base_model.get("sha256")
    print(f"base  {base[0]}  sha256 {str(base_sha)[:12]}")
    for kind in KINDS:
        for name in reg.names(kind, versions=False):
            serving = reg.serving_version(kind, name)
            print(f"{kind.rstrip('s')} {name} -> {f'v{serving}' if serving else '(unversioned)'}  "
                  f"{_entry_line(reg, kind, name, base_sha)}")
            for v in reg.versions(kind, name):
                mark = "*" if v.serving else " "
                print(f"  {mark} {name}@v{v.version}  {v.manifest.created_at if v.manifest else 'unreadable'}  "
                      f"{_evidence_line(v.manifest) if v.manifest else ''}")
    return 0


# -- publish ---------------------------------------------------------------------------------------
def _source_kind(src: Path) -> str:
    """'run' or 'model', from SRC's manifest; anything else is refused with what SRC holds."""
    if not src.is_dir():
        raise RegistryError(f"{src}: no such folder (publish takes a finished run or an exported model folder)")
    try:
        kind = Manifest.read(src).kind
    except ManifestError as e:
        raise RegistryError(f"{src}: neither a finished run nor an export ({e})") from None
    if kind not in ("run", "model"):
        raise RegistryError(f"{src}/manifest.json: kind {kind!r}; publish takes a finished run (kind 'run') "
                            "or an exported model folder (kind 'model')")
    return kind


def _run_publish_defaults(run: Path) -> tuple[float, float, int]:
    """(min_gain, max_retention_drop, keep_versions) from the run's own config.yaml `publish` section."""
    import yaml

    try:
        raw = (yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}).get("publish") or {}
    except FileNotFoundError:
        raw = {}
    except (OSError, yaml.YAMLError) as e:
        raise RegistryError(f"{run}/config.yaml: unreadable run config: {e}".splitlines()[0]) from None
    return (float(raw.get("min_gain", GatePolicy.min_gain)),
            float(raw.get("max_retention_drop", GatePolicy.max_retention_drop)),
            int(raw.get("keep_versions", KEEP_VERSIONS)))


def cmd_publish(args: argparse.Namespace) -> int:
    src = args.src
    kind = _source_kind(src)
    if kind == "run":
        min_gain, max_drop, keep = _run_publish_defaults(src)
        name = args.name or src.resolve().name
    else:
        min_gain, max_drop, keep = GatePolicy.min_gain, GatePolicy.max_retention_drop, KEEP_VERSIONS
        if not args.name:
            raise RegistryError(f"{src}: an exported folder needs a registry name: --name NAME")
        name = args.name
    policy = GatePolicy(min_gain if args.min_gain is None else args.min_gain,
                        max_drop if args.max_retention_drop is None else args.max_retention_drop)
    publish = Registry(args.registry).publish_run if kind == "run" else Registry(args.registry).publish_model
    path = publish(src, name, gate=policy, override_gate=args.override_gate, keep=args.keep or keep)
    gate = Manifest.read(path).extra["gate"]
    verdict = f"gate REFUSED, overridden: {gate['override_reason']}" if gate["forced"] else "gate passed"
    print(f"published {path} ({verdict}); {name!r} serves {path.name}")
    return 0


# -- rollback, prune -------------------------------------------------------------------------------
def cmd_rollback(args: argparse.Namespace) -> int:
    reg = Registry(args.registry)
    name, version = split_ref(args.ref)
    if version is None:
        kept = ", ".join(f"v{v.version}" for v in reg.versions(args.kind, name)) or "none"
        raise RegistryError(f"{args.ref!r}: name the version, e.g. {args.ref}@v1 (kept: {kept})")
    before = reg.serving_version(args.kind, name)
    reg.rollback(args.kind, name, version)
    print(f"{args.kind}/{name}: v{before} -> v{version}; replicas pick it up on their next registry poll")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    reg = Registry(args.registry)
    kinds = (args.kind,) if args.kind else KINDS
    if args.name and not any(args.name in reg.names(k, versions=False) for k in kinds):
        raise RegistryError(f"{args.registry}: no name {args.name!r} in {' or '.join(kinds)}")
    for kind in kinds:
        for name in [args.name] if args.name else reg.names(kind, versions=False):
            if name not in reg.names(kind, versions=False):
                continue
            gone = reg.prune(kind, name, args.keep)
            kept = ", ".join(f"v{v.version}" for v in reg.versions(kind, name))
            print(f"{kind}/{name}: removed {', '.join(f'v{v}' for v in gone) or 'nothing'}; kept {kept}")
    return 0
