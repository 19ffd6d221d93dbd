"""Hugging Face Hub access: one place that downloads, with clear errors.

``hf://org/repo/path/in/repo[@revision]`` is accepted wherever a checkpoint path is.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Tuple

from .errors import HubError


def parse_hf_path(ref: str) -> Tuple[str, str, Optional[str]]:
    """``hf://org/repo/dir/file.pth@rev`` -> (``org/repo``, ``dir/file.pth``, ``rev``)."""
    if not ref.startswith("hf://"):
        raise HubError(f"not an hf:// reference: {ref}", "write hf://org/repo/path/to/file[@revision]")
    body = ref[len("hf://"):]
    revision = None
    if "@" in body:
        body, revision = body.rsplit("@", 1)
    parts = body.split("/")
    if len(parts) < 3 or not all(parts):
        raise HubError(f"malformed hf:// reference: {ref}", "write hf://org/repo/path/to/file[@revision]")
    return "/".join(parts[:2]), "/".join(parts[2:]), revision


def hub_download(repo_id: str, filename: str, revision: Optional[str] = None,
                 cache_dir: Optional[str] = None) -> Path:
    """Download (or take from the local cache) one file of a Hub model repo."""
    import huggingface_hub
    from huggingface_hub import errors as hf_errors

    try:
        return Path(huggingface_hub.hf_hub_download(repo_id=repo_id, filename=filename, revision=revision,
                                                    cache_dir=cache_dir))
    except hf_errors.RepositoryNotFoundError:
        raise HubError(f"Hub repo '{repo_id}' not found (or not accessible)",
                       "check the repo name, or log in with `huggingface-cli login` for a private repo") from None
    except hf_errors.RevisionNotFoundError:
        raise HubError(f"revision '{revision}' of Hub repo '{repo_id}' not found",
                       "use an existing branch, tag or commit") from None
    except hf_errors.EntryNotFoundError:
        raise HubError(f"file '{filename}' not found in Hub repo '{repo_id}'"
                       + (f" at revision '{revision}'" if revision else ""),
                       "check the file name (list the repo's files on the Hub)") from None
    except (hf_errors.LocalEntryNotFoundError, OSError) as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        raise HubError(
            f"cannot fetch '{filename}' from Hub repo '{repo_id}'"
            + (" (HF_HUB_OFFLINE is set and the file is not in the local cache)" if offline
               else f" (Hub unreachable: {type(e).__name__})"),
            "pass a local checkpoint path instead, or set HF_HUB_OFFLINE=1 with a cache populated "
            f"by `python -m bench hub pull {repo_id}` on a machine with internet") from None


def resolve_hf_path(ref: str) -> Path:
    repo, filename, revision = parse_hf_path(ref)
    return hub_download(repo, filename, revision)
