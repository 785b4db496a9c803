"""Hub repos as inputs: the commit a revision names (asked of the Hub once, or read from the cache when
HF_HUB_OFFLINE=1), every way the Hub can fail as one line that names the setting to change, and the commits this
process used, for the run records."""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

# What each kind of input is called in the settings, and what to give instead of a hub id.
KINDS = {
    "model": ("BASE_MODEL", "MODEL_REVISION", "a local folder"),
    "dataset": ("DATASET", "DATASET_REVISION", "a local file"),
}
# role -> {"repo_id", "revision", "commit"} for a hub input, None for a local one; filled as inputs are resolved.
USED: dict[str, dict | None] = {}
COMMIT = re.compile(r"[0-9a-f]{40}")


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def cached_commit(kind: str, repo_id: str, revision: str) -> str | None:
    """The commit the Hugging Face cache holds for `revision` (a branch or tag through its ref), or None."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    folder = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type=kind)
    if COMMIT.fullmatch(revision):
        return revision if (folder / "snapshots" / revision).is_dir() else None
    ref = folder / "refs" / revision
    return ref.read_text().strip() if ref.is_file() else None


def resolve_commit(kind: str, repo_id: str, revision: str, token: str) -> str:
    """The commit `revision` of a hub repo names now. One call to the Hub, with no retries, so a Hub that is down
    answers within seconds; with HF_HUB_OFFLINE=1 the cache's ref, and nothing is fetched."""
    setting, revision_setting, instead = KINDS[kind]
    if offline():
        commit = cached_commit(kind, repo_id, revision)
        if commit is None:
            from huggingface_hub import constants

            raise UserError(f"{setting}={repo_id!r}: not in the Hugging Face cache ({constants.HF_HUB_CACHE}) at "
                            f"{revision_setting}={revision!r}, and HF_HUB_OFFLINE=1 forbids downloading it; fetch it "
                            f"once online (the same HF_HOME), or give {instead}")
        return commit
    import httpx
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    try:
        info = HfApi(token=token or False).repo_info(repo_id, repo_type=kind, revision=revision,
                                                     timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except (HfHubHTTPError, httpx.HTTPError, OSError, ValueError) as err:
        raise hub_failure(err, kind, repo_id, revision, token) from None
    return info.sha


def record(role: str, kind: str, repo_id: str, revision: str, commit: str) -> None:
    """Remember the commit used, for the run records; online, also the cache's ref for `revision` (as
    huggingface_hub writes it), so that HF_HUB_OFFLINE=1 later finds this commit under the same name."""
    USED[role] = {"repo_id": repo_id, "revision": revision, "commit": commit, "kind": kind}
    if not offline() and not COMMIT.fullmatch(revision):
        from huggingface_hub import constants
        from huggingface_hub.file_download import repo_folder_name

        ref = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type=kind) / "refs" / revision
        if not ref.is_file() or ref.read_text().strip() != commit:
            ref.parent.mkdir(parents=True, exist_ok=True)
            tmp = ref.with_name(f".{ref.name}.{os.getpid()}.tmp")
            tmp.write_text(commit)
            os.replace(tmp, ref)
    moving = "" if COMMIT.fullmatch(revision) else f" ({revision})"
    print(f"{KINDS[kind][0]} {repo_id} at commit {commit}{moving}{', from the cache' if offline() else ''}",
          flush=True)


def commits_for_record(stage_dir: Path) -> dict:
    """The hub commits behind a stage's outputs: those this process resolved, and the dataset's from the data stage
    whose files the stage read (only the data stage fetches the dataset)."""
    used = dict(USED)
    data_record = stage_dir.parent / "data" / "run.json"
    if "dataset" not in used and stage_dir.name != "data" and data_record.is_file():
        try:
            used["dataset"] = json.loads(data_record.read_text()).get("hub_commits", {}).get("dataset")
        except ValueError:
            pass
    return {role: info for role, info in used.items() if info}


# The kinds of a Hub HTTP error (HfHubHTTPError) that classify_hub_error names; "refused" is a 401 or 403 of no
# more particular kind.
HTTP_KINDS = frozenset({"gated", "no_revision", "no_repo", "no_file", "refused", "http_error"})


@dataclass(frozen=True)
class HubError:
    """What kind of failure of the Hub client an exception is: `kind` ("invalid_id", "offline", "timeout",
    "unreachable", one of HTTP_KINDS, or None for anything else), the exception of its cause chain that says so, and
    that exception's HTTP status where it has one."""

    kind: str | None
    error: BaseException
    status: int | None = None


def _kind(err: BaseException) -> str | None:
    """The kind of this one exception, its causes left aside. The order matters: GatedRepoError is a
    RepositoryNotFoundError, and these are HfHubHTTPErrors; OfflineModeIsEnabled is a ConnectionError."""
    import httpx
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, HFValidationError, OfflineModeIsEnabled,
                                        RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)

    if isinstance(err, HFValidationError):
        return "invalid_id"
    if isinstance(err, OfflineModeIsEnabled):
        return "offline"
    if isinstance(err, httpx.TimeoutException):
        return "timeout"
    if isinstance(err, httpx.TransportError):  # DNS, refused, reset, a proxy's refusal, a URL without http://
        return "unreachable"
    if isinstance(err, GatedRepoError):
        return "gated"
    if isinstance(err, RevisionNotFoundError):
        return "no_revision"
    if isinstance(err, RepositoryNotFoundError):
        return "no_repo"
    if isinstance(err, RemoteEntryNotFoundError):
        return "no_file"
    if isinstance(err, HfHubHTTPError):
        return "refused" if _status(err) in (401, 403) else "http_error"
    if isinstance(err, ConnectionError):
        return "unreachable"
    return None


def _status(err: BaseException) -> int | None:
    return getattr(getattr(err, "response", None), "status_code", None)


def classify_hub_error(err: BaseException, explicit_causes_only: bool = False) -> HubError:
    """What kind of Hub client failure `err` is, from one walk down its cause chain.

    By default (downloads: datasets and transformers wrap the client's errors, some without `from`) the walk follows
    __cause__, else __context__, and the first Hub HTTP error or httpx error on it decides (of kind None where it is
    an httpx error of another sort); with none, `err` itself decides, as an invalid id, offline, or None.
    With explicit_causes_only (the client's own calls: it wraps a failed LFS upload as RuntimeError(...) from the
    network error) the walk follows __cause__ only, so that a bug raised while handling a network error stays a bug,
    and the first exception of a known kind decides; with none, kind None."""
    import httpx
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    seen = err
    while seen is not None:
        kind = _kind(seen)
        if explicit_causes_only:
            if kind is not None:
                return HubError(kind, seen, _status(seen))
            seen = seen.__cause__
        else:
            if isinstance(seen, (HfHubHTTPError, httpx.HTTPError)):
                return HubError(kind, seen, _status(seen))
            seen = seen.__cause__ or seen.__context__
    if explicit_causes_only:
        return HubError(None, err, _status(err))
    # A download's own LocalEntryNotFoundError (the cache lacks a file, and no network error said why) is "offline";
    # a ConnectionError of the wrapping library's own (not the client's OfflineModeIsEnabled) is left to the caller.
    kind = "offline" if isinstance(err, LocalEntryNotFoundError) else _kind(err)
    return HubError(kind if kind in ("invalid_id", "offline") else None, err, _status(err))


def _connect_reason(err: BaseException) -> str:
    from urllib.parse import urlsplit

    text = str(err)
    if any(s in text for s in ("Name or service not known", "nodename nor servname", "name resolution",
                               "No address associated")):
        return f"no DNS entry for {urlsplit(endpoint()).hostname}"
    if "Connection refused" in text:
        return "connection refused"
    return text.splitlines()[0] if text else type(err).__name__


def hub_failure(err: BaseException, kind: str, repo_id: str, revision: str, token: str) -> UserError:
    """One line for a failed Hub call: what failed, for which setting, and what to change."""
    from huggingface_hub import constants

    setting, revision_setting, instead = KINDS[kind]
    where = f"{setting}={repo_id!r}"
    url = endpoint()
    page = f"{url}/{'datasets/' if kind == 'dataset' else ''}{repo_id}"
    failure = classify_hub_error(err)
    cause, status = failure.error, failure.status
    offline_hint = "or set HF_HUB_OFFLINE=1 where the Hugging Face cache already holds it"
    if failure.kind == "invalid_id":
        return UserError(f"{where}: not a local {instead.split()[-1]} and not a hub id like user/name ({cause})")
    if failure.kind == "offline":
        return UserError(f"{where}: not in the Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading it; "
                         f"fetch it once online, or give {instead}")
    if failure.kind == "timeout":
        return UserError(f"{where}: the Hub at {url} did not answer within {constants.HF_HUB_ETAG_TIMEOUT} s "
                         f"(HF_HUB_ETAG_TIMEOUT); check the network or HF_ENDPOINT, {offline_hint}")
    if failure.kind == "unreachable":
        return UserError(f"{where}: not a local {instead.split()[-1]}, and the Hub is unreachable at {url} "
                         f"({_connect_reason(cause)}); check the network or HF_ENDPOINT, {offline_hint}, or give "
                         f"{instead}")
    if failure.kind == "gated":
        if not token:
            return UserError(f"{where}: a gated repo, and HF_TOKEN is not set; put HF_TOKEN=hf_... in .env or the "
                             f"environment, the token of an account that accepted its conditions at {page}")
        return UserError(f"{where}: a gated repo, and the account of HF_TOKEN has no access ({status}); accept its "
                         f"conditions at {page}")
    if failure.kind == "no_revision":
        return UserError(f"{revision_setting}={revision!r}: {repo_id} has no such branch, tag or commit on {url}; "
                         f"give one it has ({revision_setting}=main for its main branch)")
    if failure.kind == "no_repo":
        private = "HF_TOKEN is not set" if not token else "HF_TOKEN has no access to it"
        return UserError(f"{where}: no such {kind} repo on the Hub at {url} (or it is private and {private}); "
                         "check the name")
    if failure.kind == "no_file":
        return UserError(f"{where}: a file is missing from it at {revision} ({str(cause).splitlines()[-1]}); the repo "
                         f"is incomplete or not a {kind} repo")
    if failure.kind == "refused" and status == 401:
        return UserError(f"{where}: the Hub refused HF_TOKEN (401); check that the token in .env or the environment "
                         "is valid")
    if failure.kind == "http_error" and status is not None and status >= 500:
        return UserError(f"{where}: the Hub at {url} failed with HTTP {status} (a server error, not your settings); "
                         f"try again later, {offline_hint}")
    if failure.kind in ("refused", "http_error"):
        return UserError(f"{where}: the Hub at {url} refused the request (HTTP {status}); check the name and "
                         f"{revision_setting}")
    if isinstance(cause, OSError):
        return UserError(f"{where}: fetching it failed ({type(cause).__name__}: {cause}); check free disk and the "
                         "permissions of HF_HOME")
    return UserError(f"{where}: fetching it from the Hub at {url} failed ({type(cause).__name__}); {offline_hint}")


def commits_sentence(commits: dict, code=lambda text: f"`{text}`") -> str:
    """"Base model `x` at commit `c` (main); dataset `y` at commit `d` (main)." for reports and model cards ('' when
    both came from local files); `code` marks up names and commits (Markdown backticks by default)."""
    parts = []
    for role, label in (("base_model", "base model"), ("dataset", "dataset")):
        info = commits.get(role)
        if info:
            moving = "" if COMMIT.fullmatch(info["revision"]) else f" ({info['revision']})"
            parts.append(f"{label} {code(info['repo_id'])} at commit {code(info['commit'])}{moving}")
    sentence = "; ".join(parts)
    return sentence[:1].upper() + sentence[1:] + "." if parts else ""
