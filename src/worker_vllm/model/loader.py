"""MODEL_NAME -> a local directory vLLM can load without touching the network.

A local directory is used as is. A hub id is downloaded with huggingface_hub into the HF cache
under BASE_PATH (a network volume there caches it across workers), keeping ONE weights format
plus config, tokenizer, chat template, generation config and ``*.py`` for trust_remote_code.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock
from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

from worker_vllm.config.settings import parse_bool
from worker_vllm.errors import WorkerError

log = logging.getLogger(__name__)

# Everything but weights that loading and serving can need.
SUPPORT_PATTERNS = [
    "*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken", "*.py", "tokenizer*", "*.tekken",
]
# Weight formats in order of preference; only the first one the repo has is downloaded.
WEIGHT_FORMATS = [["*.safetensors"], ["*.bin"], ["*.pt", "*.pth"]]


class ModelLoadError(WorkerError):
    type = "model_load_error"


def hf_cache_dir(base_path: str) -> Path:
    return Path(base_path) / "huggingface-cache" / "hub"


def is_offline() -> bool:
    return parse_bool(os.environ.get("HF_HUB_OFFLINE", "")) is True


def allow_patterns(repo_files: list[str], *, weights: bool = True) -> list[str]:
    """Support files plus the single preferred weights format present in `repo_files`."""
    patterns: list[str] = list(SUPPORT_PATTERNS)
    if weights:
        for fmt in WEIGHT_FORMATS:
            if any(fnmatch.fnmatch(f, p) for f in repo_files for p in fmt):
                patterns += fmt
                break
    return patterns


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def resolve(
    name: str,
    *,
    revision: str | None,
    token: str | None,
    base_path: str,
    weights: bool = True,
    on_download: Callable[[dict[str, object]], None] | None = None,
) -> Path:
    """Return a local directory for `name` (local path, or hub id downloaded into the cache).

    Two workers sharing a network volume take turns (a file lock per repository), so a
    snapshot is downloaded once; the second finds it complete. huggingface_hub resumes an
    interrupted download and shows its progress.
    """
    local = Path(name).expanduser()
    if local.is_dir():
        return local
    if name.startswith(("/", "./", "../", "~")):
        raise ModelLoadError(f"{name!r} is not a directory (a path must exist in the worker; "
                             "a Hugging Face model id has the form org/name)")
    cache_dir = hf_cache_dir(base_path)
    cached = cached_snapshot(cache_dir, name, revision, weights=weights)
    if cached is not None:
        log.info("Using the cached snapshot of %s at %s (nothing fetched)", name, cached)
        return cached
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelLoadError(f"Model {name!r} is not in the cache at {cache_dir}, and the "
                             f"cache cannot take a download: {exc}") from None
    lock = FileLock(str(cache_dir / f".worker-vllm-{name.replace('/', '--')}.lock"))
    with lock:
        repo_dir = cache_dir / f"models--{name.replace('/', '--')}"
        before, started = _size(repo_dir), time.monotonic()
        path = _download(name, revision=revision, token=token, cache_dir=cache_dir,
                         weights=weights)
        fetched = _size(repo_dir) - before
    seconds = time.monotonic() - started
    if fetched > 0:
        log.info("Downloaded %s: %.1f MB in %.1f s (%.1f MB/s)", name, fetched / 1e6, seconds,
                 fetched / 1e6 / max(seconds, 1e-6))
        if on_download is not None:
            on_download({"name": name, "bytes": fetched, "seconds": round(seconds, 2)})
    return path


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def cached_snapshot(cache_dir: Path, name: str, revision: str | None, *,
                    weights: bool = True) -> Path | None:
    """A complete snapshot of `name` already in the HF cache, found without any network call
    and without writing: RunPod's cached models are mounted read-only in this layout, and some
    of its stores lowercase the repository name. The revision is followed through `refs/`
    (a commit hash names a snapshot directly); without `refs/`, a lone snapshot is taken."""
    folder = f"models--{name.replace('/', '--')}"
    for repo in dict.fromkeys([cache_dir / folder, cache_dir / folder.lower()]):
        snapshots = repo / "snapshots"
        if not snapshots.is_dir():
            continue
        ref = repo / "refs" / (revision or "main")
        if ref.is_file():
            candidates = [snapshots / ref.read_text().strip()]
        elif revision:
            candidates = [snapshots / revision]
        else:
            candidates = [p for p in snapshots.iterdir() if p.is_dir()]
            if len(candidates) > 1:
                log.warning("%s has %d snapshots and no refs/main: set MODEL_REVISION to pick "
                            "one; using the newest", repo, len(candidates))
                candidates = [max(candidates, key=lambda p: p.stat().st_mtime)]
        for snapshot in candidates:
            if _complete(snapshot, weights):
                return snapshot
    return None


def _complete(snapshot: Path, weights: bool) -> bool:
    if not (snapshot / "config.json").is_file() and weights:
        return False
    if not weights:
        return snapshot.is_dir() and any(snapshot.iterdir())
    return any(p.name.endswith(WEIGHT_SUFFIXES) for p in snapshot.iterdir())


# The last download's figures, for the start-up summary.


def _download(name: str, *, revision: str | None, token: str | None, cache_dir: Path,
              weights: bool) -> Path:
    offline = is_offline()
    try:
        if offline:
            # Nothing is fetched offline: the cached snapshot is used as it is.
            patterns = None
        else:
            files = HfApi(token=token).list_repo_files(name, revision=revision)
            patterns = allow_patterns(files, weights=weights)
        log.info("Fetching %s (revision %s) into %s%s", name, revision or "default",
                 cache_dir, " [offline]" if offline else "")
        path = snapshot_download(
            name,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            allow_patterns=patterns,
            local_files_only=offline,
        )
    except LocalEntryNotFoundError:
        raise ModelLoadError(
            f"Model {name!r} is not in the cache at {cache_dir} and HF_HUB_OFFLINE is set"
        ) from None
    except HfHubHTTPError as exc:
        status = getattr(exc.response, "status_code", None)
        hint = " (gated or private: set HF_TOKEN)" if status in (401, 403) else ""
        raise ModelLoadError(f"Cannot download model {name!r}: HTTP {status}{hint}") from None
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"Cannot fetch model {name!r}: {exc}") from None
    except Exception as exc:  # the HTTP client's own errors: no route to the hub
        raise ModelLoadError(
            f"Cannot reach the Hugging Face hub for model {name!r} ({type(exc).__name__}: "
            f"{exc}); a model that is neither local nor cached needs the network") from None
    return Path(path)
