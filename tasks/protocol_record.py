"""What a record says about its protocol: name, version, and the deviations from the anchor in force.

Each protocol node (``bench/conf/task/_protocols/*.yaml``, merged with the task's own part) carries
``name``, ``version`` and ``deviations``: a mapping ``id -> {key, anchor, why}`` where ``key`` is a
dotted path inside the protocol node and ``anchor`` the value the anchor's code uses. A deviation is
**active** when the composed value at ``key`` differs from ``anchor`` (no-op entries such as
``false``/``null``/``{}`` compare equal to absent ones). ``anchor_by_variant`` gives the anchor's
value under a named schedule variant (``schedule_variant``). docs/PROTOCOLS.md lists them with the switch
that restores the anchor's behaviour (setting ``key`` to ``anchor``).
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping

from omegaconf import DictConfig


def _canon(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {k: _canon(x) for k, x in sorted(v.items()) if x not in (None, False, [], {})}
    if isinstance(v, (list, tuple)):
        return [_canon(x) for x in v]
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, (int, float)):
        return float(v)
    return v


def _get(node: Mapping[str, Any], dotted: str) -> Any:
    cur: Any = node
    for part in dotted.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            return None
        cur = cur[part]
    return cur


def active_deviations(proto: Mapping[str, Any]) -> List[Dict[str, Any]]:
    """The deviations of a resolved protocol node whose value differs from the anchor's."""
    out = []
    for name, d in sorted(dict(proto.get("deviations") or {}).items()):
        if not isinstance(d, Mapping) or "key" not in d:
            continue
        value = _get(proto, str(d["key"]))
        anchor = d.get("anchor")
        variant = proto.get("schedule_variant")
        if variant and variant in (d.get("anchor_by_variant") or {}):  # e.g. SnD's 307,200 iterations
            anchor = d["anchor_by_variant"][variant]
        if _canon(value) != _canon(anchor):
            out.append({"id": name, "key": str(d["key"]), "value": value, "anchor": anchor, "why": d.get("why", "")})
    return out


def code_version(proto: Mapping[str, Any]) -> Any:
    """The code a resolved protocol follows, as the records and results/reference/*.csv name it:
    ``code_version``, plus ``+<schedule_variant>`` when a named schedule variant is selected (SnD's
    single-GPU schedule on FiT3D's code: ``fit3d_evaluation+snd_1gpu``); None for a protocol without one."""
    name = proto.get("code_version")
    variant = proto.get("schedule_variant")
    return f"{name}+{variant}" if name and variant else name


def protocol_summary(cfg: DictConfig) -> Dict[str, Any]:
    """``{"name", "version", "deviations": [ids...], "deviation_details": [...]}`` of ``cfg``'s task protocol."""
    from .dense import resolve_protocol

    proto = resolve_protocol(cfg) if "protocols" in cfg.task else {}
    devs = active_deviations(proto)
    return {
        "name": str(proto.get("name", "default")),
        "version": proto.get("version"),
        "code_version": code_version(proto),
        "deviations": [d["id"] for d in devs],
        "deviation_details": devs,
    }


def list_protocols() -> List[str]:
    """One line per (protocol, task kind) from ``bench/conf/task/_protocols/*.yaml``: name, version, source."""
    from pathlib import Path

    from omegaconf import OmegaConf

    root = Path(__file__).resolve().parents[1] / "bench" / "conf" / "task" / "_protocols"
    lines = []
    for path in sorted(root.glob("*.yaml")):
        node = OmegaConf.load(path)
        for name in node:
            p = node[name]
            lines.append(f"{str(name):<9} {path.stem:<8} v{p.get('version', '?')}  {p.get('source', '')}")
    return lines
