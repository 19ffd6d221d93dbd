"""Typed schemas of the config groups ``method``, ``task.protocol(s)`` and ``cluster``, and the check of a
composed config against them.

Each method's schema (its key names, their types, which keys a config of that method must have) lives
beside the method (``methods/splat_distill/schema.py``, ``baselines/fit3d/schema.py``, ...) and registers
itself in :data:`bench.registry.METHOD_SCHEMAS`; :func:`method_schemas` reads them. This module holds the
generic machinery, the pieces several methods share (:class:`SceneData`, :class:`Diagnostics`,
:class:`Cadence`), the probing protocols and the cluster back-ends. Every schema is also stored in hydra's
ConfigStore under ``schema/<group>/<name>`` (``schema/method/splat_distill``, ``schema/protocol/dense``,
``schema/cluster/slurm``, ...). :func:`check` validates a composed config against them before any
work (``bench.preflight.validate`` calls it): a key that no schema knows -- a misspelling in an
experiment recipe, a ``+key=value`` on the command line -- or a value of the wrong type is one
:class:`bench.errors.BenchError` naming the key and the nearest valid key. omegaconf does the checking
(:func:`check_node`: a copy of each node merged into ``OmegaConf.structured(schema)``, then thrown away);
bench translates its errors into those lines.

The schemas *validate*; they do not fill anything in. The yaml files under ``bench/conf`` stay the one
place of every default, and the config that is run, recorded and fingerprinted (:mod:`bench.identity`)
is the composed yaml exactly as before (no keys added, no int -> float conversions). That is why a
required key has no default here (``MISSING``): its value comes from the yaml, and a config without it
fails (``method.optim.lr is missing``) instead of falling back on a default repeated in code.

Method configs may carry other methods' keys: an experiment recipe that serves several methods
(``experiment/mini_benchmark.yaml``) merges Splat-and-Distill AND FiT3D keys into whichever method is
selected, and those keys are part of the committed records' fingerprints. So a ``method.*`` key is
checked against the selected method's schema first and, when that schema lacks it, against the union
of all method schemas (with its type there): a key that is nobody's is an error, a key of another
method is accepted and ignored by the selected one. Methods without a schema (plugins registered by a
script) are not checked.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import json
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

from omegaconf import MISSING, BooleanNode, DictConfig, FloatNode, IntegerNode, ListConfig, OmegaConf, StringNode
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from .errors import BenchError, UnknownNameError
from .registry import METHOD_SCHEMAS

REQ: Any = MISSING  # a key the config must have; its value (the default) lives in the yaml


def keyed(name: str):
    """A required field whose config key is not a python identifier (``from``)."""
    return field(default=REQ, metadata={"key": name})


def file_input(*words: str):
    """A key whose value is a file that decides a cell's number (a checkpoint, weights): it enters the cell
    fingerprint and the trained-backbone key by the digest of its content (:mod:`bench.identity`).
    ``words``: values that name no file (e.g. ``hub``)."""
    return field(default=REQ, metadata={"input": "file", "words": tuple(words)})


# ------------------------------------------------------------------------------------------- methods
@dataclass
class SceneData:
    """Multi-view training rooms (Splat-and-Distill, FiT3D): ``method.data``."""

    dataset: str = REQ
    root: Optional[str] = REQ
    scenes: Any = REQ  # null | N | [scene ids]
    views: int = REQ
    size: Any = REQ  # [H, W] | int
    seed: int = REQ


@dataclass
class DiagnosticsData:
    dataset: str = REQ
    root: Optional[str] = REQ
    scenes: Any = REQ
    views: int = REQ
    seed: int = REQ
    size: Any = None


@dataclass
class Diagnostics:
    enabled: bool = REQ
    data: DiagnosticsData = REQ
    gap: int = REQ
    pairs: int = REQ
    points: int = REQ


@dataclass
class Cadence:
    ckpt_every: int = REQ
    keep_last: int = REQ
    progress: bool = REQ
    log_every: int = REQ


# ----------------------------------------------------------------------------------------- protocols
@dataclass
class Features:
    layers: Any = None  # last | quartiles | [block indices]
    norm: Optional[bool] = None
    cls: Optional[bool] = None
    pad: Optional[str] = None
    pos_embed: Optional[str] = None
    cache: Optional[bool] = None
    cache_dtype: Optional[str] = None
    batch_size: Optional[int] = None


@dataclass
class Resize:
    mode: Optional[str] = None
    align_corners: Optional[bool] = None


@dataclass
class Head:
    type: Optional[str] = None
    upsample: Optional[int] = None
    batchnorm: Optional[bool] = None
    align_corners: Optional[bool] = None
    hidden: Optional[int] = None
    kernel_size: Optional[int] = None
    upsample_mode: Optional[str] = None
    resize: Optional[Resize] = None


@dataclass
class DepthBins:
    bins: Optional[int] = None
    min_depth: Optional[float] = None
    max_depth: Optional[float] = None
    norm: Optional[str] = None


@dataclass
class Loss:
    # depth
    sig_weight: Optional[float] = None
    sig_variance: Optional[str] = None
    warm_up: Optional[bool] = None
    warm_iter: Optional[int] = None
    grad_weight: Optional[float] = None
    grad_scales: Optional[List[int]] = None
    grad_reduction: Optional[str] = None
    grad_slices: Optional[str] = None  # image | leading (Probe3D 1fff822: batch/channel axes); set by code_version
    max_depth: Optional[float] = None
    # normals
    type: Optional[str] = None
    # segmentation
    avg_non_ignore: Optional[bool] = None


@dataclass
class Rotate:
    degree: Optional[float] = None
    p: Optional[float] = None


@dataclass
class ColorAug:
    p: Optional[float] = None
    gamma: Optional[List[float]] = None
    brightness: Optional[List[float]] = None
    color: Optional[List[float]] = None


@dataclass
class ColorJitter:
    p: Optional[float] = None
    brightness: Optional[float] = None
    contrast: Optional[float] = None
    saturation: Optional[float] = None
    hue: Optional[float] = None


@dataclass
class ResizedCrop:
    p: Optional[float] = None
    scale: Optional[List[float]] = None
    ratio: Optional[List[float]] = None


@dataclass
class Sliding:
    window: Optional[int] = None
    stride: Optional[int] = None


@dataclass
class Transforms:
    """``train`` (augmentation) and ``test`` nodes of a dense protocol (tasks/transforms.py)."""

    resize: Any = None
    resize_short: Optional[int] = None
    crop_box: Optional[List[int]] = None
    rotate: Optional[Rotate] = None
    scale_range: Optional[List[float]] = None
    photometric: Optional[bool] = None
    crop: Optional[List[int]] = None
    crop_mode: Optional[str] = None
    cat_max_ratio: Optional[float] = None
    cat_ignore_zero: Optional[bool] = None
    image_pad: Optional[List[float]] = None
    hflip: Optional[bool] = None
    color_aug: Optional[ColorAug] = None
    color_jitter: Optional[ColorJitter] = None
    resized_crop: Optional[ResizedCrop] = None
    # test only
    batch_size: Optional[int] = None
    flip: Optional[bool] = None
    clamp: Optional[bool] = None  # depth: clamp the prediction to [depth.min_depth, depth.max_depth] (FiT3D)
    sliding: Optional[Sliding] = None


@dataclass
class Schedule:
    iters: Optional[int] = None
    epochs: Optional[float] = None
    batch_size: Optional[int] = None
    samples_per_gpu: Optional[int] = None  # loss groups: the anchor's images per GPU (tasks/train_probe.py)
    lr: Optional[float] = None
    weight_decay: Optional[float] = None
    betas: Optional[List[float]] = None
    decay: Optional[str] = None
    power: Optional[float] = None
    shape: Optional[str] = None
    warmup: Optional[float] = None
    warmup_iters: Optional[int] = None
    warmup_start: Optional[float] = None
    min_factor: Optional[float] = None
    momentum: Optional[str] = None
    ckpt_every: Optional[int] = None  # resumable probe training (tasks/train_probe.py): cadence only
    keep_last: Optional[int] = None
    log_every: Optional[int] = None
    grad_clip: Optional[float] = None
    shuffle: Optional[bool] = None
    drop_last: Optional[bool] = None


@dataclass
class DepthEval:
    min_depth: Optional[float] = None
    max_depth: Optional[float] = None
    strict_max: Optional[bool] = None
    crop: Any = None
    metrics: Optional[List[str]] = None
    empty_images: Optional[str] = None  # drop (depth toolbox nanmean) | zero (Probe3D evaluate_depth)


@dataclass
class NormalsMask:
    depth: Optional[bool] = None
    max_depth: Optional[float] = None


@dataclass
class Deviation:
    key: str = REQ
    anchor: Any = None
    anchor_by_variant: Optional[Dict[str, Any]] = None
    why: str = REQ


@dataclass
class DenseProtocol:
    """One entry of ``task.protocols`` (linear | probe3d) of a depth, normals or segmentation task: the union
    of their keys (bench/conf/task/_protocols/*.yaml + each task's own additions)."""

    name: Optional[str] = None
    version: Optional[int] = None
    source: Optional[str] = None
    code_version: Optional[str] = None  # the anchor code the protocol follows (docs/PROTOCOLS.md)
    code_versions: Optional[Dict[str, Dict[str, Any]]] = None  # version -> {dotted key: value} it fixes
    anchors: Optional[List[str]] = None
    concat_original: Optional[bool] = None
    features: Optional[Features] = None
    head: Optional[Head] = None
    depth: Optional[DepthBins] = None
    loss: Optional[Loss] = None
    mask: Optional[NormalsMask] = None
    train: Optional[Transforms] = None
    test: Optional[Transforms] = None
    schedule: Optional[Schedule] = None
    schedule_variant: Optional[str] = None
    schedules: Optional[Dict[str, Schedule]] = None
    eval: Optional[DepthEval] = None
    deviations: Optional[Dict[str, Deviation]] = None


@dataclass
class CorrespondenceProtocol:
    """``task.protocol`` of a correspondence task (tasks/correspondence.py)."""

    family: Optional[str] = None
    image_size: Any = None
    input_norm: Optional[List[float]] = None
    layers: Any = None
    final_norm: Optional[bool] = None
    pad: Optional[str] = None
    depth_scale: Optional[float] = None
    xyz_scale: Optional[float] = None
    feature_upsample: Optional[str] = None
    queries: Optional[str] = None
    occlusion_tol: Optional[float] = None
    view_gaps: Optional[List[int]] = None
    pairs_per_gap: Optional[int] = None
    min_overlap: Optional[float] = None
    num_corr: Optional[int] = None
    max_ratio: Optional[float] = None
    mode: Optional[str] = None
    alpha: Optional[float] = None
    px_thresholds: Optional[List[float]] = None
    metric_thresholds: Optional[List[float]] = None
    binned_threshold: Optional[float] = None
    rotation_bins: Optional[List[float]] = None
    chunk_elems: Optional[int] = None


PROTOCOLS: Dict[str, type] = {"dense": DenseProtocol, "correspondence": CorrespondenceProtocol}


# ------------------------------------------------------------------------------------------- cluster
@dataclass
class ClusterCommon:
    name: str = REQ
    folder: str = REQ
    timeout_min: float = REQ
    max_num_timeout: int = REQ
    signal_delay_s: int = REQ
    gpus_per_node: int = REQ
    tasks_per_node: Optional[int] = REQ
    poll_s: float = REQ
    stage1_per_task: int = REQ  # FiT3D stage I: scenes per array task (0 = inside the training job)
    train: Dict[str, Any] = REQ  # per-kind overrides of the keys above (checked against this schema)
    eval: Dict[str, Any] = REQ
    table: Dict[str, Any] = REQ
    stage1: Dict[str, Any] = REQ


@dataclass
class LocalCluster(ClusterCommon):
    max_workers: int = REQ
    visible_gpus: Any = REQ  # null | [ids] | "0,1"


@dataclass
class SlurmCluster(ClusterCommon):
    partition: Optional[str] = REQ
    account: Optional[str] = REQ
    qos: Optional[str] = REQ
    constraint: Optional[str] = REQ
    nodes: int = REQ
    cpus_per_task: int = REQ
    mem_gb: float = REQ
    array_parallelism: int = REQ
    setup: List[str] = REQ
    additional: Dict[str, Any] = REQ


CLUSTERS: Dict[str, type] = {"local": LocalCluster, "slurm": SlurmCluster}
OVERRIDE_KINDS = ("train", "eval", "table", "stage1")  # cluster.<kind>: per-job-kind overrides
PER_TASK_KEY = "per_task"  # method.per_task.<task kind>: method keys


# file-valued keys of config nodes without a schema here (the backbone node) -> their words that name no file
# (bench/backbones/base.py resolve_weights: none | random | hub | package; hub and package weights are
# identified by hub_repo/hub_file/hub_revision and the record's package versions)
OTHER_FILE_KEYS: Dict[str, tuple] = {"backbone.weights": ("none", "random", "hub", "package")}


def file_fields(schema: type, prefix: str) -> Dict[str, tuple]:
    """The keys of ``schema`` (nested dataclasses walked, dotted under ``prefix``) marked as files
    (:func:`_file`) -> their words that name no file."""
    out: Dict[str, tuple] = {}
    for key, f in _fields(schema).items():
        dotted = f"{prefix}.{key}"
        if f.metadata.get("input") == "file":
            out[dotted] = tuple(f.metadata.get("words", ()))
        nested = _nested(f.type) or _dict_of(f.type)
        if nested is not None:
            out.update(file_fields(nested, dotted if _nested(f.type) else f"{dotted}.*"))
    return out


def file_keys() -> Dict[str, tuple]:
    """Every config key whose value is a file that decides a number (dotted; ``*`` = any name) -> its words
    that name no file: the marked keys of every method and protocol schema, and :data:`OTHER_FILE_KEYS`."""
    out = dict(OTHER_FILE_KEYS)
    for schema in method_schemas().values():
        out.update(file_fields(schema, "method"))
    out.update(file_fields(DenseProtocol, "task.protocol"))
    out.update(file_fields(CorrespondenceProtocol, "task.protocol"))
    return out


def method_schemas() -> Dict[str, type]:
    """Method name -> its schema, as each method registers it beside its code
    (``@METHOD_SCHEMAS.register("splat_distill", ...)`` in ``methods/splat_distill/schema.py``; importing the
    plugins of :data:`bench.registry.PLUGIN_MODULES` on first use). Each is also stored in hydra's
    ConfigStore as ``schema/method/<name>``."""
    from hydra.core.config_store import ConfigStore

    out = {e.name: e.obj for e in METHOD_SCHEMAS.entries()}
    repo = ConfigStore.instance().repo.get("schema", {}).get("method", {})
    for name, node in out.items():
        if f"{name}.yaml" not in repo:
            ConfigStore.instance().store(group="schema/method", name=name, node=node)
    return out


def register() -> None:
    """Store the protocol and cluster schemas in hydra's ConfigStore (``schema/<group>/<name>``); the
    methods' schemas are stored as they are looked up (:func:`method_schemas`)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for group, table in (("protocol", PROTOCOLS), ("cluster", CLUSTERS)):
        for name, node in table.items():
            cs.store(group=f"schema/{group}", name=name, node=node)


# ---------------------------------------------------------------------------------------- validation
def _fields(schema: type) -> Dict[str, dataclasses.Field]:
    """Config key -> dataclass field (with its resolved type) of ``schema``."""
    hints = typing.get_type_hints(schema)
    out = {}
    for f in dataclasses.fields(schema):
        f.type = hints[f.name]
        out[f.metadata.get("key", f.name)] = f
    return out


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) < len(typing.get_args(tp)):
            return (args[0] if len(args) == 1 else typing.Union[tuple(args)]), True
    return tp, False


def _nested(tp: Any) -> Optional[type]:
    tp, _ = _strip_optional(tp)
    return tp if dataclasses.is_dataclass(tp) else None


def _dict_of(tp: Any) -> Optional[type]:
    """``Dict[str, <dataclass>]`` -> the dataclass."""
    tp, _ = _strip_optional(tp)
    if typing.get_origin(tp) in (dict, Dict):
        return _nested(typing.get_args(tp)[1])
    return None


class SchemaError(BenchError):
    """A config key that no schema has, a required key that is missing, or a value of the wrong type."""


def unknown_key(key: str, valid: Sequence[str], where: str = "") -> SchemaError:
    """The error for a dotted ``key`` no schema has; ``valid`` = the keys at its level (dotted the same way)."""
    near = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    hint = f"did you mean {near[0]}? " if near else ""
    shown = ", ".join(sorted(k.rpartition(".")[2] for k in valid)[:40])
    return SchemaError(
        f"config key '{key}' does not exist{where}",
        f"{hint}valid keys here: {shown} (see `python -m bench run --print-config ...`)",
    )


# ---------------------------------------------------------------- validation: OmegaConf structured merges
# A node is checked by merging a copy of it into ``OmegaConf.structured(schema)``: omegaconf finds the keys the
# schema lacks (ConfigKeyError), the values it cannot take (ValidationError) and the required keys left
# ``???`` (missing_keys). The merged copy is thrown away. Two additions keep bench's rules: a key the schema
# lacks is looked up in the alternatives (other methods' schemas) before it is an error, and a value omegaconf
# would have converted (3 -> true, 5 -> '5', '5' -> 5; only an int for a float is fine) is a wrong type.
_PASSED: set = set()  # (schema, required, alternatives, node as JSON) of the nodes that passed


@functools.lru_cache(maxsize=None)
def _structured(schema: type) -> DictConfig:
    return OmegaConf.structured(schema)


def _to_fields(node: Dict[str, Any], schema: type) -> Dict[str, Any]:
    """``node`` with its config keys that are not python identifiers (``from``) renamed to their dataclass
    field (``from_``), nested nodes too."""
    fields = _fields(schema)
    out = {}
    for k, v in node.items():
        f = fields.get(k)
        if f is not None and isinstance(v, Mapping):
            nested, items = _nested(f.type), _dict_of(f.type)
            if nested is not None:
                v = _to_fields(dict(v), nested)
            elif items is not None:
                v = {n: _to_fields(dict(s), items) if isinstance(s, Mapping) else s for n, s in v.items()}
        out[f.name if f is not None else k] = v
    return out


@functools.lru_cache(maxsize=None)
def _config_keys(schema: type) -> Dict[str, str]:
    """Dataclass field -> config key, where they differ (``from_`` -> ``from``), in ``schema`` and below."""
    out: Dict[str, str] = {}
    for key, f in _fields(schema).items():
        if f.name != key:
            out[f.name] = key
        nested = _nested(f.type) or _dict_of(f.type)
        if nested is not None:
            out.update(_config_keys(nested))
    return out


def _path(parent: Any, key: Any) -> List[Any]:
    """Keys from the merged config's root to ``parent[key]``."""
    parts = [key]
    node = parent
    while node is not None and node._get_parent() is not None:
        parts.append(node._key())
        node = node._get_parent()
    return parts[::-1]


def _dotted(prefix: str, parts: Sequence[Any], names: Mapping[str, str]) -> str:
    return ".".join([prefix, *(str(names.get(p, p)) for p in parts)])


def _get(node: Any, parts: Sequence[Any]) -> Any:
    for p in parts:
        node = node[p]
    return node


def _kind(node: Any) -> str:
    """What an omegaconf node takes, in words (``an integer or null``)."""
    if isinstance(node, ListConfig):
        element = node._metadata.element_type
        words = {int: "integers", float: "numbers", str: "strings", bool: "true/false values"}
        name = f"a list of {words[element]}" if element in words else "a list"
    elif isinstance(node, DictConfig):
        name = "a mapping"
    else:
        name = {IntegerNode: "an integer", FloatNode: "a number", BooleanNode: "true or false"}.get(
            type(node), "a string"
        )
    return f"{name} or null" if node._is_optional() else name


def _wrong_type(key: str, value: Any, kind: str, where: str) -> SchemaError:
    if kind == "a mapping":
        return SchemaError(f"{key}={value!r} must be a mapping{where}", f"write {key} as {{key: value, ...}}")
    return SchemaError(f"{key}={value!r} must be {kind}{where}", f"pass {key}=<{kind}>")


def _type_error(e: ValidationError, node: Dict[str, Any], prefix: str, names: Mapping[str, str], where: str):
    """omegaconf's ValidationError -> ``key=value must be <kind>`` (a list element: the whole list)."""
    parent, child = e.parent_node, e.child_node
    try:
        if isinstance(parent, ListConfig):
            parts, target = _path(parent._get_parent(), parent._key()), parent
        else:
            parts = _path(parent, e.key)
            target = child if child is not None else parent._get_node(e.key)
        return _wrong_type(_dotted(prefix, parts, names), _get(node, parts), _kind(target), where)
    except (AttributeError, KeyError, IndexError, TypeError):  # an error omegaconf places elsewhere (a bad key)
        msg = str(e).strip().splitlines()[0]
        full = _dotted(prefix, str(e.full_key).split("."), names) if e.full_key else prefix
        return SchemaError(
            f"{full}: {msg}{where}", f"see the schema of {prefix} (`python -m bench run --print-config`)"
        )


def _refuse_conversions(node: Any, merged: Any, parts: List[Any], prefix: str, names: Mapping[str, str], where: str):
    """A value omegaconf converted to the declared type (3 -> true, 5 -> '5') is a wrong type."""
    items = node.items() if isinstance(node, Mapping) else enumerate(node)
    for k, v in items:
        target = merged._get_node(k)
        if isinstance(v, (Mapping, list)) and isinstance(target, (DictConfig, ListConfig)):
            _refuse_conversions(v, target, parts + [k], prefix, names, where)
        elif isinstance(target, (IntegerNode, FloatNode, BooleanNode, StringNode)) and v is not None:
            taken = target._value()
            if type(taken) is not type(v) and not (isinstance(target, FloatNode) and type(v) is int):
                if isinstance(merged, ListConfig):  # an element: the list is named, as omegaconf's errors are
                    raise _wrong_type(_dotted(prefix, parts, names), list(node), _kind(merged), where)
                raise _wrong_type(_dotted(prefix, parts + [k], names), v, _kind(target), where)


def _foreign(
    parts: List[Any], value: Any, schema: type, alternatives: Sequence[type], prefix: str, names, where: str
) -> None:
    """A key ``schema`` lacks (at ``parts`` below it): checked against the first alternative (another method's
    schema, at the same path) that has it, with its type there; a key no schema has is an error."""
    own, alts, named = schema, list(alternatives), False
    for p in parts[:-1]:
        if named:  # the name under a Dict[str, <dataclass>] field: its value has that dataclass's keys
            named = False
            continue
        k = names.get(p, p)
        f = _fields(own).get(k) if own is not None else None
        nested = _nested(f.type) if f is not None else None
        items = _dict_of(f.type) if f is not None else None
        if nested is not None:
            alts = [_nested(_fields(a)[k].type) for a in alts if k in _fields(a)]
            alts = [a for a in alts if a is not None]
            own = nested
        elif items is not None:  # no alternatives under a dict of dataclasses
            own, alts, named = items, [], True
        else:
            own = None
    key = str(parts[-1])
    at = _dotted(prefix, parts[:-1], names)
    cands = [a for a in alts if key in _fields(a)]
    if not cands:
        valid = list(_fields(own)) if own is not None else []
        valid = list(dict.fromkeys(valid + [n for a in alts for n in _fields(a)]))
        raise unknown_key(f"{at}.{key}", [f"{at}.{n}" for n in valid], where)
    first: Optional[SchemaError] = None
    for a in cands:
        try:
            check_node({key: value}, a, at, required=False, alternatives=[b for b in cands if b is not a], where=where)
            return
        except SchemaError as e:
            first = first or e
    raise first  # type: ignore[misc]


def check_node(
    node: Mapping[str, Any],
    schema: type,
    prefix: str,
    *,
    required: bool = True,
    alternatives: Sequence[type] = (),
    where: str = "",
) -> None:
    """Validate the mapping ``node`` (at dotted ``prefix``) against ``schema`` by merging a copy of it into
    ``OmegaConf.structured(schema)``; a key ``schema`` lacks is checked against the first of ``alternatives``
    that has it (type included). ``required``: every field without a default must be present (the selected
    schema only, never the alternatives)."""
    if not isinstance(node, Mapping):
        raise _wrong_type(prefix, node, "a mapping", where)
    memo = (schema, required, tuple(alternatives), json.dumps(node, sort_keys=True, default=repr))
    if memo in _PASSED:  # a sweep checks the same method and protocol nodes for many cells
        return
    names = _config_keys(schema)
    own = _to_fields(copy.deepcopy(dict(node)), schema)
    while True:
        try:
            merged = OmegaConf.merge(_structured(schema), own)
            break
        except ConfigKeyError as e:  # a key the schema lacks: another method's, or nobody's
            parts = _path(e.parent_node, e.key)
            value = _get(own, parts)
            _foreign(parts, value, schema, alternatives, prefix, names, where)
            del _get(own, parts[:-1])[parts[-1]]
        except ValidationError as e:
            raise _type_error(e, own, prefix, names, where) from None
        except OmegaConfBaseException as e:  # e.g. a key that is not a string under Dict[str, ...]
            full = _dotted(prefix, str(e.full_key).split("."), names) if e.full_key else prefix
            raise SchemaError(f"{full}: {str(e).strip().splitlines()[0]}{where}", "use string keys there") from None
    _refuse_conversions(own, merged, [], prefix, names, where)
    if required:
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            key = _dotted(prefix, missing[0].split("."), names)
            raise SchemaError(
                f"config key '{key}' is missing{where}",
                f"set it in the config (its default lives in bench/conf), e.g. +{key}=...",
            )
    if len(_PASSED) > 4096:
        _PASSED.clear()
    _PASSED.add(memo)


def _recipe_hint(cfg: Mapping[str, Any]) -> str:
    label = cfg.get("recipe")
    return f" (experiment recipe '{label}' or the command line)" if label else ""


def check_method(method: Mapping[str, Any], where: str = "") -> None:
    """``method.*`` against the selected method's schema, other methods' keys accepted (module docstring)."""
    name = method.get("name")
    schemas = method_schemas()
    schema = schemas.get(str(name))
    if schema is None:
        return  # a plugin method without a schema
    others = [s for n, s in schemas.items() if n != name]
    check_node(method, schema, "method", alternatives=others, where=where)
    for kind, sub in dict(method.get(PER_TASK_KEY) or {}).items():
        check_node(sub, schema, f"method.{PER_TASK_KEY}.{kind}", required=False, alternatives=others, where=where)


# Keys every dense protocol of a task kind must state (dotted, inside task.protocols.<name>): the numbers and
# switches an anchor fixes. None of them has a default in code (tasks/*.py read them with ``need``), so a
# missing one is an error here, before any work, instead of a silent fallback.
REQUIRED_DENSE: Dict[str, tuple] = {
    "*": tuple(
        """name version code_version features.layers features.norm features.cls features.pad features.pos_embed
        features.batch_size head.type test.batch_size schedule.batch_size schedule.lr schedule.weight_decay
        schedule.betas schedule.decay schedule.shape schedule.warmup_start schedule.min_factor schedule.shuffle""".split()
    ),
    "depth": tuple(
        """depth.bins depth.min_depth depth.max_depth depth.norm loss.sig_weight loss.sig_variance loss.warm_up
        loss.grad_weight loss.max_depth eval.min_depth eval.max_depth eval.metrics eval.empty_images test.clamp""".split()
    ),
    "normals": ("loss.type", "mask.depth"),
    "seg": ("loss.avg_non_ignore",),
}
# required when another key has a value: (key, value or None = any true value) -> keys
REQUIRED_IF: Dict[tuple, tuple] = {
    ("head.type", "linear"): ("head.upsample",),
    ("head.type", "dpt"): ("head.hidden", "head.kernel_size", "head.upsample_mode", "head.align_corners"),
    ("schedule.decay", "poly"): ("schedule.power",),
    ("loss.warm_up", None): ("loss.warm_iter",),
    ("loss.grad_weight", None): ("loss.grad_scales", "loss.grad_reduction"),
    ("mask.depth", None): ("mask.max_depth",),
}


def apply_code_version(proto: Dict[str, Any], where: str = "task.protocol") -> None:
    """Set the keys that the protocol's ``code_version`` fixes (``code_versions.<version>``: dotted key ->
    value, docs/PROTOCOLS.md) in the plain protocol dict ``proto``. The version decides those keys in every
    rule at once (loss, interpolation, resize), so a node that sets one of them itself is an error, as is an
    unknown version name."""
    table = proto.get("code_versions")
    if not table:
        return
    version = proto.get("code_version")
    if version not in table:
        raise UnknownNameError(f"code version of {where}", str(version), list(table))
    for dotted, value in dict(table[version] or {}).items():
        *parents, leaf = str(dotted).split(".")
        node = proto
        for k in parents:
            if node.get(k) is None:
                node[k] = {}
            node = node[k]
            if not isinstance(node, dict):
                raise BenchError(f"{where}.{'.'.join(parents)} must be a mapping", "see bench/conf/task/_protocols")
        if leaf in node and node[leaf] != value:
            raise BenchError(
                f"{where}.{dotted}={node[leaf]!r} is fixed by {where}.code_version={version} (which sets {value!r})",
                f"remove {where}.{dotted}, or select the code version that has it: "
                f"{where}.code_version=<{' | '.join(table)}>",
            )
        node[leaf] = value


def _has(node: Mapping[str, Any], dotted: str) -> tuple[bool, Any]:
    cur: Any = node
    for part in dotted.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            return False, None
        cur = cur[part]
    return True, cur


def check_dense_required(node: Mapping[str, Any], kind: str, prefix: str, where: str = "") -> None:
    """The keys :data:`REQUIRED_DENSE` / :data:`REQUIRED_IF` ask of a dense protocol node of task ``kind``
    (after its ``code_version`` set the keys it fixes): one SchemaError naming the first missing key."""
    node = copy.deepcopy(dict(node))
    apply_code_version(node, prefix)
    keys = list(REQUIRED_DENSE["*"]) + list(REQUIRED_DENSE.get(kind, ()))
    for (key, value), then in REQUIRED_IF.items():
        present, v = _has(node, key)
        if present and (v == value if value is not None else bool(v)):
            keys += list(then)
    sched = node.get("schedule") or {}
    if not sched.get("iters"):
        keys.append("schedule.epochs")
    if sched.get("warmup_iters") is None:
        keys.append("schedule.warmup")
    for key in keys:
        if not _has(node, key)[0]:
            raise SchemaError(
                f"config key '{prefix}.{key}' is missing{where}: the protocol must state it (no default stands in "
                "for the anchor's value)",
                f"set it in bench/conf/task/_protocols/*.yaml or the task yaml (docs/PROTOCOLS.md has the anchor's "
                f"value), e.g. +{prefix}.{key}=...",
            )


def check_protocols(task: Mapping[str, Any], where: str = "") -> None:
    """Every ``task.protocols.<name>`` (dense tasks) or the ``task.protocol`` node (correspondence tasks)."""
    protocols = task.get("protocols")
    if isinstance(protocols, Mapping):
        for name, node in protocols.items():
            check_node(node, DenseProtocol, f"task.protocols.{name}", required=False, where=where)
            if task.get("kind") in ("depth", "normals", "seg"):
                check_dense_required(node, str(task["kind"]), f"task.protocols.{name}", where)
    elif isinstance(task.get("protocol"), Mapping):
        check_node(task["protocol"], CorrespondenceProtocol, "task.protocol", required=False, where=where)


def check_cluster(cluster: Mapping[str, Any], where: str = "") -> None:
    schema = CLUSTERS.get(str(cluster.get("name")))
    if schema is None:
        return
    check_node(cluster, schema, "cluster", where=where)
    for kind in OVERRIDE_KINDS:
        check_node(cluster.get(kind) or {}, schema, f"cluster.{kind}", required=False, where=where)


def _conf_dir():
    from importlib import resources

    return resources.files("bench.conf")


def _yaml_keys(path) -> Dict[str, Any]:
    from omegaconf import OmegaConf

    node = OmegaConf.to_container(OmegaConf.load(str(path)), resolve=False) or {}
    node.pop("defaults", None)
    return node


def _interpolated(cfg: Any) -> set:
    """Top-level names that some value of the (unresolved) config interpolates (``${train_steps}``): keys a
    recipe may add for its own use."""
    import re

    from omegaconf import OmegaConf

    blob = str(OmegaConf.to_container(cfg, resolve=False)) if OmegaConf.is_config(cfg) else str(cfg)
    return set(re.findall(r"\$\{\s*([A-Za-z_][A-Za-z0-9_]*)", blob))


def check_top_level(cfg: Mapping[str, Any], where: str = "") -> None:
    """Top-level keys (and the keys of its plain mappings, ``distributed``, ``loader``) are those of
    ``bench/conf/config.yaml`` and its config groups, or a key the config interpolates (a recipe's own
    ``train_steps``): a misspelt ``devcie:`` in a recipe is one error naming the nearest key."""
    base = _yaml_keys(_conf_dir().joinpath("config.yaml"))
    valid = set(base) | {"paths", "backbone", "method", "task", "cluster", "experiment", "hydra"}
    used = _interpolated(cfg)
    for k in cfg.keys():
        if k not in valid and k not in used:
            raise unknown_key(str(k), sorted(valid), where)
    for k, sub in base.items():
        if k == "recipe_values":  # free-form: a recipe's own values
            continue
        if isinstance(sub, Mapping) and isinstance(cfg.get(k), Mapping):
            for kk in cfg[k].keys():
                if kk not in sub:
                    raise unknown_key(f"{k}.{kk}", [f"{k}.{n}" for n in sub], where)


def _task_yaml_keys() -> tuple:
    """``(task keys, {dataset name: dataset keys})`` over the task yamls, read once per state of the folder
    (file names and modification times: a yaml edited or added is read again)."""
    paths = sorted(p for p in _conf_dir().joinpath("task").iterdir() if p.name.endswith(".yaml"))
    return _read_task_yamls(tuple((str(p), p.stat().st_mtime_ns) for p in paths))


@functools.lru_cache(maxsize=1)
def _read_task_yamls(state: tuple) -> tuple:
    task_keys: set = set()
    by_name: Dict[str, set] = {}
    for path, _ in state:
        node = _yaml_keys(path)
        task_keys |= set(node)
        ds = node.get("dataset")
        if isinstance(ds, Mapping):
            by_name.setdefault(str(ds.get("name")), set()).update(ds)
    return frozenset(task_keys), {k: frozenset(v) for k, v in by_name.items()}


def check_task_keys(task: Mapping[str, Any], where: str = "") -> None:
    """``task.*`` keys are those some task yaml (``bench/conf/task/*.yaml``) has, and ``task.dataset.*`` those
    that a task yaml gives a dataset of the same ``dataset.name``: a recipe's ``task.dataset.limt`` is an
    error naming ``limit``."""
    task_keys, by_name = _task_yaml_keys()
    for k in task.keys():
        if k not in task_keys:
            raise unknown_key(f"task.{k}", [f"task.{n}" for n in sorted(task_keys)], where)
    ds = task.get("dataset")
    if isinstance(ds, Mapping):
        allowed = by_name.get(str(ds.get("name"))) or set().union(*by_name.values())
        for k in ds.keys():
            if k not in allowed:
                raise unknown_key(f"task.dataset.{k}", [f"task.dataset.{n}" for n in sorted(allowed)], where)


def check(cfg: Any) -> None:
    """Validate the composed config ``cfg`` (see the module docstring); raises :class:`SchemaError`."""
    from .config import to_container

    c = {k: to_container(cfg[k]) for k in ("method", "task", "cluster") if k in cfg}
    where = _recipe_hint(cfg)
    check_top_level(cfg, where)
    if isinstance(c.get("task"), Mapping):
        check_task_keys(c["task"], where)
    if isinstance(c.get("method"), Mapping):
        check_method(c["method"], where)
    if isinstance(c.get("task"), Mapping):
        check_protocols(c["task"], where)
    if isinstance(c.get("cluster"), Mapping):
        check_cluster(c["cluster"], where)


register()
