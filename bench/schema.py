"""Typed schemas of the config groups ``method``, ``task.protocol(s)`` and ``cluster``.

Every method, the probing protocols and the cluster back-ends have a dataclass here (the key names,
their types, which keys a config of that kind must have), registered in hydra's ConfigStore under
``schema/<group>/<name>`` (``schema/method/splat_distill``, ``schema/protocol/dense``,
``schema/cluster/slurm``, ...). :func:`check` validates a composed config against them before any
work (``bench.preflight.validate`` calls it): a key that no schema knows -- a misspelling in an
experiment recipe, a ``+key=value`` on the command line -- or a value of the wrong type is one
:class:`bench.errors.BenchError` naming the key and the nearest valid key.

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

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

from omegaconf import MISSING

from .errors import BenchError, UnknownNameError

REQ: Any = MISSING  # a key the config must have; its value (the default) lives in the yaml


def _key(name: str):
    """A field whose config key is not a python identifier (``from``)."""
    return field(default=REQ, metadata={"key": name})


def _file(*words: str):
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


@dataclass
class DINOv2Method:
    """The raw teacher: nothing to configure."""

    name: str = REQ


@dataclass
class SnDViews:
    gap: Any = REQ  # int | [min, max]
    target: str = REQ
    order: str = REQ
    contiguous: bool = REQ
    keep_bad: bool = REQ
    last_batch: str = REQ


@dataclass
class SnDAdapter:
    mode: str = REQ
    r: int = REQ
    alpha: float = REQ
    dropout: float = REQ
    target_modules: Any = REQ  # official | attention | [suffixes]


@dataclass
class SnDHead:
    prototypes: int = REQ
    hidden_dim: int = REQ
    bottleneck_dim: int = REQ
    student_temp: float = REQ
    teacher_temp: float = REQ
    train_gain: bool = REQ
    prototype_init: str = REQ


@dataclass
class SnDTeacher:
    momentum: float = REQ
    every: int = REQ
    frozen: bool = REQ
    ema: str = REQ
    dropout: bool = REQ


@dataclass
class SnDReconstructor:
    name: str = REQ
    scale_mult: float = REQ
    checkpoint: Optional[str] = _file()
    near: float = REQ
    far: float = REQ


@dataclass
class SnDLift:
    resize: str = REQ
    upsample: str = REQ
    upsample_grid: str = REQ
    all_excluded: str = REQ
    masks: str = REQ
    slic_segments: int = REQ
    slic_compactness: float = REQ
    alpha_threshold: float = REQ
    coverage: str = REQ
    uncovered: str = REQ
    normalize_alpha: bool = REQ
    feature_covariance: str = REQ
    blending: bool = REQ
    blend_alpha: float = REQ
    blend_segments: str = REQ
    render_basis: str = REQ


@dataclass
class SnDOptim:
    lr: float = REQ
    warmup_pct: float = REQ
    steps: int = REQ
    batch_size: int = REQ
    grad_clip: Optional[float] = REQ
    accumulate: int = 1


@dataclass
class SplatDistillMethod(Cadence):
    name: str = REQ
    data: SceneData = REQ
    views: SnDViews = REQ
    adapter: SnDAdapter = REQ
    head: SnDHead = REQ
    teacher: SnDTeacher = REQ
    reconstructor: SnDReconstructor = REQ
    lift: SnDLift = REQ
    loss: str = REQ
    optim: SnDOptim = REQ
    per_task: Dict[str, Any] = REQ  # task kind -> method keys (checked against this schema)
    diagnostics: Diagnostics = REQ
    export: str = REQ


@dataclass
class Fit3DLR:
    means: float = REQ
    means_final: float = REQ
    scales: float = REQ
    quats: float = REQ
    opacities: float = REQ
    colors: float = REQ
    features: float = REQ
    decoder: float = REQ


@dataclass
class Fit3DDensify:
    from_: int = _key("from")
    until: int = REQ
    every: int = REQ
    grad_threshold: float = REQ
    percent_dense: float = REQ
    min_opacity: float = REQ
    max_screen_size: float = REQ
    world_size: float = REQ
    max_gaussians: Optional[int] = REQ


@dataclass
class Fit3DStage1:
    iterations: int = REQ
    init_points: int = REQ
    init_opacity: float = REQ
    feature_dim: int = REQ
    lambda_dssim: float = REQ
    feature_weight: float = REQ
    lr: Fit3DLR = REQ
    densify: Fit3DDensify = REQ
    opacity_reset_every: int = REQ
    reset_opacity_to: float = REQ
    eval: bool = REQ
    ckpt_every: int = REQ


@dataclass
class Fit3DStage2:
    lr: float = REQ
    weight_decay: float = REQ
    batch_size: int = REQ
    epochs: int = REQ
    steps: Optional[int] = REQ
    drop_last: bool = REQ
    grad_clip: Optional[float] = REQ
    batchnorm: str = REQ
    loss_mask: str = REQ
    hflip: float = REQ
    alpha_threshold: float = REQ
    cached_scenes: int = REQ


@dataclass
class Fit3DMethod(Cadence):
    name: str = REQ
    data: SceneData = REQ
    resize: str = REQ
    scene_cache: str = REQ
    stage1: Fit3DStage1 = REQ
    stage2: Fit3DStage2 = REQ
    diagnostics: Diagnostics = REQ


@dataclass
class MEFData:
    dataset: str = REQ
    root: Optional[str] = REQ
    objects: Any = REQ  # null | N | [ids]
    held_out: Any = REQ  # count | fraction
    views: int = REQ
    size: Any = REQ
    seed: int = REQ
    supersample: int = REQ
    scenes: Any = None  # the shared recipes' set-size key (used when objects is null)


@dataclass
class MEFLoRA:
    r: int = REQ
    blocks: int = REQ
    qv_only: bool = REQ


@dataclass
class MEFInput:
    target_res: Any = REQ  # auto | null | int
    stride: int = REQ


@dataclass
class MEFLoss:
    pos_thresh: float = REQ
    neg_thresh: float = REQ
    temperature: float = REQ


@dataclass
class MEFOptim:
    lr: float = REQ
    weight_decay: float = REQ
    steps: int = REQ
    batch_size: int = REQ
    grad_clip: Optional[float] = REQ


@dataclass
class MEFEval:
    pairs: int = REQ
    points: int = REQ


@dataclass
class MEFMethod(Cadence):
    name: str = REQ
    data: MEFData = REQ
    points: int = REQ
    max_angle: float = REQ
    augment: bool = REQ
    lora: MEFLoRA = REQ
    input: MEFInput = REQ
    loss: MEFLoss = REQ
    optim: MEFOptim = REQ
    export_stride: Optional[int] = REQ
    eval: MEFEval = REQ


@dataclass
class OfficialMethod:
    """A released checkpoint loaded into the backbone (no training)."""

    name: str = REQ
    variant: str = REQ
    repo: str = REQ
    revision: Optional[str] = REQ
    checkpoint: Optional[str] = _file()


@dataclass
class SnDOfficialMethod(OfficialMethod):
    blending: bool = REQ
    per_task: Dict[str, Any] = REQ


@dataclass
class MEFOfficialMethod(OfficialMethod):
    export_stride: Optional[int] = REQ


METHODS: Dict[str, type] = {
    "dinov2": DINOv2Method,
    "splat_distill": SplatDistillMethod,
    "fit3d": Fit3DMethod,
    "mef": MEFMethod,
    "snd_official": SnDOfficialMethod,
    "fit3d_official": OfficialMethod,
    "mef_official": MEFOfficialMethod,
}


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
    for schema in METHODS.values():
        out.update(file_fields(schema, "method"))
    out.update(file_fields(DenseProtocol, "task.protocol"))
    out.update(file_fields(CorrespondenceProtocol, "task.protocol"))
    return out


def register_method(name: str, node: type) -> None:
    """The schema of a plugin method (registered by a script): its keys are checked, and join the union
    that other methods' configs may carry."""
    from hydra.core.config_store import ConfigStore

    METHODS[name] = node
    ConfigStore.instance().store(group="schema/method", name=name, node=node)


def register() -> None:
    """Store every schema in hydra's ConfigStore (``schema/<group>/<name>``)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for group, table in (("method", METHODS), ("protocol", PROTOCOLS), ("cluster", CLUSTERS)):
        for name, node in table.items():
            cs.store(group=f"schema/{group}", name=name, node=node)


# ---------------------------------------------------------------------------------------- validation
def _fields(schema: type) -> Dict[str, dataclasses.Field]:
    hints = typing.get_type_hints(schema)
    out = {}
    for f in dataclasses.fields(schema):
        f.type = hints[f.name]
        out[f.metadata.get("key", f.name)] = f
    return out


def _required(f: dataclasses.Field) -> bool:
    return f.default is REQ or f.default == MISSING


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) < len(typing.get_args(tp)):
            return (args[0] if len(args) == 1 else typing.Union[tuple(args)]), True
    return tp, False


def _type_name(tp: Any) -> str:
    tp, optional = _strip_optional(tp)
    origin = typing.get_origin(tp)
    if origin in (list, List):
        name = f"a list of {_type_name(typing.get_args(tp)[0])}"
    elif origin in (dict, Dict) or dataclasses.is_dataclass(tp):
        name = "a mapping"
    else:
        name = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))
    return f"{name} or null" if optional else name


def _leaf_ok(v: Any, tp: Any) -> bool:
    if tp is Any:
        return True
    tp, optional = _strip_optional(tp)
    if v is None:
        return optional
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        return any(_leaf_ok(v, a) for a in typing.get_args(tp))
    if origin in (list, List):
        return isinstance(v, list) and all(_leaf_ok(x, typing.get_args(tp)[0]) for x in v)
    if origin in (dict, Dict):
        return isinstance(v, dict)
    if tp is bool:
        return isinstance(v, bool)
    if tp is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if tp is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if tp is str:
        return isinstance(v, str)
    return isinstance(v, tp)


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


def check_node(
    node: Mapping[str, Any],
    schema: type,
    prefix: str,
    *,
    required: bool = True,
    alternatives: Sequence[type] = (),
    where: str = "",
) -> None:
    """Validate the mapping ``node`` (at dotted ``prefix``) against ``schema``; a key ``schema`` lacks is
    checked against the first of ``alternatives`` that has it (type included). ``required``: every
    field without a default must be present (the selected schema only, never the alternatives)."""
    own = _fields(schema)
    alts = [_fields(a) for a in alternatives]
    if not isinstance(node, Mapping):
        raise SchemaError(f"{prefix}={node!r} must be a mapping{where}", f"write {prefix} as {{key: value, ...}}")
    for k, v in node.items():
        key = f"{prefix}.{k}"
        cands = [(own[k], True)] if k in own else [(a[k], False) for a in alts if k in a]
        if not cands:
            valid = list(own) + [n for a in alts for n in a if n not in own]
            raise unknown_key(key, [f"{prefix}.{n}" for n in dict.fromkeys(valid)], where)
        first: Optional[BenchError] = None
        for f, mine in cands:
            nested_alts = [t for t in (_nested(a[k].type) for a in alts if k in a) if t is not None]
            if mine is False:
                nested_alts = [t for t in nested_alts if t is not _nested(f.type)]
            try:
                _check_value(v, f, key, required=required and mine, alternatives=nested_alts, where=where)
                break
            except SchemaError as e:
                first = first or e
        else:
            raise first  # type: ignore[misc]
    if required:
        for k, f in own.items():
            if _required(f) and k not in node:
                raise SchemaError(
                    f"config key '{prefix}.{k}' is missing{where}",
                    f"set it in the config (its default lives in bench/conf), e.g. +{prefix}.{k}=...",
                )


def _check_value(
    v: Any, f: dataclasses.Field, key: str, *, required: bool, alternatives: Sequence[type], where: str
) -> None:
    nested, items = _nested(f.type), _dict_of(f.type)
    _, optional = _strip_optional(f.type)
    if v is None and (optional or f.type is Any):
        return
    if nested is not None:
        check_node(v, nested, key, required=required, alternatives=alternatives, where=where)
    elif items is not None:
        if not isinstance(v, Mapping):
            raise SchemaError(f"{key}={v!r} must be a mapping{where}", f"write {key} as {{name: {{...}}}}")
        for name, sub in v.items():
            check_node(sub, items, f"{key}.{name}", required=required, where=where)
    elif not _leaf_ok(v, f.type):
        raise SchemaError(f"{key}={v!r} must be {_type_name(f.type)}{where}", f"pass {key}=<{_type_name(f.type)}>")


def _recipe_hint(cfg: Mapping[str, Any]) -> str:
    label = cfg.get("recipe")
    return f" (experiment recipe '{label}' or the command line)" if label else ""


def check_method(method: Mapping[str, Any], where: str = "") -> None:
    """``method.*`` against the selected method's schema, other methods' keys accepted (module docstring)."""
    name = method.get("name")
    schema = METHODS.get(str(name))
    if schema is None:
        return  # a plugin method without a schema
    others = [s for n, s in METHODS.items() if n != name]
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
    import copy

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


def check_task_keys(task: Mapping[str, Any], where: str = "") -> None:
    """``task.*`` keys are those some task yaml (``bench/conf/task/*.yaml``) has, and ``task.dataset.*`` those
    that a task yaml gives a dataset of the same ``dataset.name``: a recipe's ``task.dataset.limt`` is an
    error naming ``limit``."""
    task_keys: set = set()
    by_name: Dict[str, set] = {}
    for path in _conf_dir().joinpath("task").iterdir():
        if not path.name.endswith(".yaml"):
            continue
        node = _yaml_keys(path)
        task_keys |= set(node)
        ds = node.get("dataset")
        if isinstance(ds, Mapping):
            by_name.setdefault(str(ds.get("name")), set()).update(ds)
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
