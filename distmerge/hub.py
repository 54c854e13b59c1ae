"""Models named by hub id (`org/name`, `org/name@revision`): read from the local Hugging Face cache, downloaded
into it with huggingface_hub when they are not there.

Only what a merge reads is downloaded: config.json, generation_config.json, the tokenizer files and chat
templates, a LoRA adapter's files, and the safetensors weights (the shards the index lists, else
model.safetensors). Pickle weights never are (unpickling can run code): a repository that has nothing else is
refused from its file listing, before anything large is fetched. Downloads land in the normal cache
(HF_HUB_CACHE, else HF_HOME/hub) in huggingface_hub's layout, snapshot files linking into the repository's
`blobs/`, so `checkpoint_file`'s rule holds for them as for any cached model. Nothing is downloaded with
`HubAccess.offline` (`--offline`) or HF_HUB_OFFLINE set.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import INDEX_NAME, SINGLE_NAME, refuse_pickle_weights
from .errors import CheckpointError
from .lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from .writer import TOKENIZER_FILES

# What is fetched besides the weights (small files; `*.jinja`: chat templates, also transformers 5's
# additional_chat_templates/), the index included, since it names the weight files.
SMALL_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES, "*.jinja", ADAPTER_CONFIG, ADAPTER_WEIGHTS,
               INDEX_NAME)


@dataclass(frozen=True)
class HubAccess:
    """What may happen for a hub id that is not in the local cache."""

    offline: bool = False  # never download (as with HF_HUB_OFFLINE)
    quiet: bool = False  # download without huggingface_hub's progress bars

    @property
    def why_offline(self) -> tuple[str, str] | None:
        """Why nothing may be downloaded and how to allow it (the flag or the environment), None when downloads
        are allowed."""
        from huggingface_hub import constants

        if self.offline:
            return "--offline is given", "run without --offline"
        setting = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
        if constants.HF_HUB_OFFLINE or setting.upper() in {"1", "ON", "YES", "TRUE"}:
            return "HF_HUB_OFFLINE is set", "unset HF_HUB_OFFLINE"
        return None


def hub_snapshot(ref: str, access: HubAccess, weights: bool = True) -> Path:
    """The snapshot directory of hub id `ref` in the local cache, downloaded first when it is not there (or, with
    `weights`, lacks weight files). `weights=False`: only the small files are needed (planning from config.json,
    a tokenizer source)."""
    from huggingface_hub import constants

    repo_id, _, revision = ref.partition("@")
    snapshot = _cached_snapshot(repo_id, revision or None)
    missing = _missing_weights(snapshot) if snapshot is not None and weights else None
    if snapshot is not None and missing is None:
        return snapshot
    offline = access.why_offline
    if offline is None:
        return _download(ref, repo_id, revision or None, weights, access.quiet)
    why, allow = offline
    what_to_do = f"download it first (`hf download {repo_id}`), {allow}, or give its local path"
    if snapshot is None:
        raise CheckpointError(f"model {ref!r} is neither a local directory nor in the Hugging Face cache "
                              f"({constants.HF_HUB_CACHE}), and {why}, so it is not downloaded; {what_to_do}")
    refuse_pickle_weights(ref, [p.name for p in snapshot.iterdir()])  # what a cached pickle-only model gets
    raise CheckpointError(f"model {ref!r} is only partly in the Hugging Face cache ({snapshot} has no {missing}), "
                          f"and {why}, so it is not downloaded; {what_to_do}")


def _cached_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The cached snapshot holding the small files, None when there is none (or huggingface_hub's listing of the
    revision says files are missing from it)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(SMALL_FILES),
                                      local_files_only=True))
    except Exception:  # huggingface_hub raises several types for "not cached"
        return None


def _weight_files(snapshot: Path) -> list[str]:
    """The weight files the checkpoint in `snapshot` reads: the shards its index lists, else model.safetensors;
    none for a LoRA adapter (its weights are among the small files). An index that cannot be read names none:
    opening the checkpoint says what is wrong with it."""
    if (snapshot / ADAPTER_CONFIG).is_file():
        return []
    if not (snapshot / INDEX_NAME).is_file():
        return [SINGLE_NAME]
    try:
        weight_map = json.loads((snapshot / INDEX_NAME).read_text())["weight_map"]
        return sorted({name for name in weight_map.values() if isinstance(name, str)})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []


def _missing_weights(snapshot: Path) -> str | None:
    return next((name for name in _weight_files(snapshot) if not (snapshot / name).is_file()), None)


def _download(ref: str, repo_id: str, revision: str | None, weights: bool, quiet: bool) -> Path:
    """List the repository, refuse one whose only weights are pickles, fetch the small files, then the weight files
    the index names (from the same commit)."""
    from huggingface_hub import HfApi, constants, snapshot_download

    if not quiet:
        print(f"{ref}: downloading from {constants.ENDPOINT} into {constants.HF_HUB_CACHE}", file=sys.stderr)
    with _answers_of_the_hub(ref), _progress_bars(shown=not quiet):
        listed = [s.rfilename for s in HfApi().model_info(repo_id, revision=revision).siblings or []]
        top_level = [name for name in listed if "/" not in name]
        if weights and not {INDEX_NAME, SINGLE_NAME, ADAPTER_CONFIG} & set(top_level):
            refuse_pickle_weights(ref, top_level)
        snapshot = Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(SMALL_FILES)))
        shards = _weight_files(snapshot) if weights else []
        wanted = [glob.escape(name) for name in shards if name in listed]  # the index may name files that are not
        if wanted:                                                          # there: opening it says so
            snapshot_download(repo_id, revision=snapshot.name, allow_patterns=wanted)
    return snapshot


@contextlib.contextmanager
def _progress_bars(shown: bool):
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    if shown or are_progress_bars_disabled():
        yield
        return
    disable_progress_bars()
    try:
        yield
    finally:
        enable_progress_bars()


@contextlib.contextmanager
def _answers_of_the_hub(ref: str):
    """huggingface_hub's errors as one line naming the model and what to do."""
    from huggingface_hub import constants
    from huggingface_hub.utils import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    repo_id, _, revision = ref.partition("@")
    hub = constants.ENDPOINT
    try:
        yield
    except CheckpointError:
        raise
    except GatedRepoError:
        raise CheckpointError(
            f"model {ref!r} is gated on the Hugging Face Hub: accept its conditions at {hub}/{repo_id}, then log in "
            "with that account (`hf auth login`, or set HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"model {ref!r} is not a local directory, and the Hugging Face Hub ({hub}) has no repository {repo_id} "
            "that this login can read; check the path or the id, or log in (`hf auth login`, or set HF_TOKEN) if "
            "it is private") from None
    except RevisionNotFoundError:
        raise CheckpointError(
            f"model {ref!r}: the Hugging Face Hub ({hub}) has no revision {revision!r} of {repo_id}; give an "
            "existing branch, tag or commit after `@`") from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "an error"
        raise CheckpointError(
            f"model {ref!r}: downloading it from the Hugging Face Hub ({hub}) failed with HTTP {status}; retry later, "
            f"or download it into the cache some other way (`hf download {repo_id}`)") from None
    except Exception as exc:  # the Hub unreachable: connection, timeout, DNS, proxy (the HTTP client's own types)
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise CheckpointError(
            f"model {ref!r} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and downloading it from "
            f"{hub} failed ({reason}); check the network (and HF_ENDPOINT), or download it where the Hub can be "
            "reached into a cache this machine reads, or give its local path") from None
