"""The Hugging Face Hub: model files and dataset repos in (``--data hf://datasets/OWNER/NAME``), a run's LoRA out.

Everything goes through huggingface_hub's own client, so its cache (``HF_HOME`` / ``HF_HUB_CACHE``), its
offline mode (``HF_HUB_OFFLINE=1``), its endpoint (``HF_ENDPOINT``) and its token (``HF_TOKEN``, or the one
``hf auth login`` stored) work as they do for every other tool. The token is read by that client alone:
cogvx never takes it as a setting, never writes it anywhere and never puts it in a message.

Errors the user can fix (a malformed URL or repo id, a repo that does not exist or needs a login, no
network and nothing downloaded) are one-line ``InputError``s (``ModelError``s for a model's files); anything
else keeps its traceback. Where a model file is not cached, one request without retries tells whether the
endpoint can be reached, so no network means one line at once rather than the client's half minute of retries.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from cogvx import runs
from cogvx.errors import InputError, ModelError, RunError

SCHEME = "hf://"
DATASET_FORM = "hf://datasets/OWNER/NAME[@REVISION][/FOLDER]"
# Revisions that hold a "/" (pull requests, conversions); any other revision ends at the first "/".
_SLASHED_REVISION = re.compile(r"^refs/(?:pr/\d+|convert/[\w.-]+)")
_LOGIN = "log in with `hf auth login` (or `huggingface-cli login`) or set HF_TOKEN"


@dataclass(frozen=True)
class DatasetURL:
    """A parsed ``hf://datasets/...`` URL; ``folder`` is "" for the repo's root."""

    url: str
    repo_id: str
    revision: str | None
    folder: str


def hub_url(data: str | Path) -> str | None:
    """``data`` as an ``hf://`` URL, or None when it names a local path.

    A ``Path`` built from ``hf://...`` has lost a slash (``hf:/...``): that form is read back as the URL.
    """
    text = str(data)
    if isinstance(data, Path) and text.startswith(SCHEME[:-1]) and not text.startswith(SCHEME):
        text = SCHEME + text[len(SCHEME) - 1 :]
    return text if text.startswith(SCHEME) else None


def parse_dataset_url(url: str) -> DatasetURL:
    """``hf://datasets/OWNER/NAME[@REVISION][/FOLDER]`` split into its parts; a malformed one is an InputError."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    def bad(why: str) -> InputError:
        return InputError(f"--data {url}: {why}; write it as {DATASET_FORM}.")

    kind, _, rest = url[len(SCHEME) :].partition("/")
    if kind != "datasets":
        raise bad("cogvx reads dataset repos only")
    owner, _, rest = rest.partition("/")
    name, slash, folder = rest.partition("/")
    revision = None
    if "@" in name:
        name, _, revision_and_folder = f"{name}{slash}{folder}".partition("@")
        special = _SLASHED_REVISION.match(revision_and_folder)
        if special:
            revision, folder = special.group(0), revision_and_folder[special.end() :]
        else:
            revision, _, folder = revision_and_folder.partition("/")
        revision = unquote(revision)
        if not revision:
            raise bad("the revision after '@' is empty")
    if not owner or not name:
        raise bad("it needs both the owner and the dataset name")
    repo_id = f"{owner}/{name}"
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise bad(f"{repo_id!r} is not a valid repo id ({_first_line(err)})") from err
    folder = folder.strip("/")
    if folder and any(part in ("", ".", "..") for part in folder.split("/")):
        raise bad(f"the folder {folder!r} has an empty, '.' or '..' part")
    return DatasetURL(url, repo_id, revision, folder)


def resolve_dataset(data: str | Path) -> Path:
    """The local folder ``--data`` names: a Hub dataset is downloaded first (into huggingface_hub's cache).

    Anything else (a folder or metadata file, an already-downloaded snapshot folder included) is returned as a
    Path unchanged. With a FOLDER, only that folder is downloaded and its local copy is returned.
    """
    url = hub_url(data)
    if url is None:
        return Path(data)
    where = parse_dataset_url(url)
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f" at revision {where.revision!r}" if where.revision else ""
    try:
        snapshot = snapshot_download(
            where.repo_id,
            repo_type="dataset",
            revision=where.revision,
            allow_patterns=[f"{where.folder}/"] if where.folder else None,
        )
    except GatedRepoError as err:
        raise InputError(
            f"--data {where.url}: the dataset is gated; accept its terms on its Hub page, then {_LOGIN}."
        ) from err
    except RepositoryNotFoundError as err:
        raise InputError(
            f"--data {where.url}: no dataset {where.repo_id} on {constants.ENDPOINT}, or it is private and you are not "
            f"logged in; check the name, or {_LOGIN}."
        ) from err
    except RevisionNotFoundError as err:
        raise InputError(
            f"--data {where.url}: the dataset {where.repo_id} has no revision {where.revision!r}; name a branch, tag "
            "or commit it has."
        ) from err
    except LocalEntryNotFoundError as err:  # no network (or HF_HUB_OFFLINE=1) and no complete snapshot in the cache
        raise InputError(
            f"--data {where.url}: cannot reach {constants.ENDPOINT} and no complete download{at} is in the cache "
            f"{constants.HF_HUB_CACHE}; connect and run again (once downloaded, HF_HUB_OFFLINE=1 works without "
            "network), or point --data at a downloaded snapshot folder."
        ) from err
    except HfHubHTTPError as err:
        if _status(err) not in (401, 403):
            raise
        raise InputError(
            f"--data {where.url}: {constants.ENDPOINT} refused access to {where.repo_id} ({_status(err)}); "
            f"use a token that can read it: {_LOGIN}."
        ) from err
    folder = Path(snapshot) / where.folder
    if not folder.is_dir():
        raise InputError(
            f"--data {where.url}: the dataset {where.repo_id}{at} has no folder {where.folder!r}; check the path "
            f"(the downloaded files are in {snapshot})."
        )
    return folder


def model_file(repo_id: str, filename: str, revision: str | None = None) -> Path:
    """One file of hub model ``repo_id``, from huggingface_hub's cache or downloaded into it.

    A file not in the cache costs one request first: an endpoint that cannot be reached, or HF_HUB_OFFLINE=1,
    is a one-line ModelError at once, where the client alone would retry for about half a minute and then raise.
    """
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        hf_hub_download(repo_id, filename, revision=revision, local_files_only=True)
    except LocalEntryNotFoundError:
        why = unreachable(repo_id, filename, revision)
        if why:
            raise ModelError(model_not_cached(repo_id, revision, why)) from None
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision))
    except GatedRepoError as err:
        raise ModelError(f"model {repo_id} is gated; accept its terms on its Hub page, then {_LOGIN}.") from err
    except RepositoryNotFoundError as err:
        raise ModelError(
            f"model {repo_id}: no such model on {constants.ENDPOINT}, or it is private and you are not logged in; "
            f"check the name (or pass a local diffusers folder), or {_LOGIN}."
        ) from err
    except RevisionNotFoundError as err:
        raise ModelError(
            f"model {repo_id} has no revision {revision!r}; pass a branch, tag or commit it has to --model-revision."
        ) from err
    except LocalEntryNotFoundError as err:  # the endpoint went away between the request above and this one
        raise ModelError(model_not_cached(repo_id, revision, f"cannot reach {constants.ENDPOINT}")) from err
    except EntryNotFoundError as err:
        at = f" at revision {revision!r}" if revision else ""
        raise ModelError(
            f"model {repo_id}{at} has no {filename}: it is not a CogVideoX model in diffusers format; pass one that "
            "is (such as THUDM/CogVideoX-2b) or a local diffusers folder."
        ) from err


def unreachable(repo_id: str, filename: str, revision: str | None = None) -> str | None:
    """Why hub model files cannot be downloaded now (HF_HUB_OFFLINE, or no answer to one request for
    ``filename``), or None when the endpoint answers, whatever the answer."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, OfflineModeIsEnabled

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, filename, revision=revision))
    except (HfHubHTTPError, EntryNotFoundError):
        return None  # it answered: the download says what the answer means
    except OfflineModeIsEnabled:
        return "HF_HUB_OFFLINE is set"
    except _network_errors() as err:
        return f"cannot reach {constants.ENDPOINT} ({_first_line(err)})"
    return None


def model_not_cached(repo_id: str, revision: str | None, why: str, part: str = "") -> str:
    """The one line for a hub model (or ``part`` of it, e.g. "transformer") missing from the cache."""
    from huggingface_hub import constants

    pinned = f" --revision {revision}" if revision else ""
    model = f"model {repo_id}" + (f" at revision {revision!r}" if revision else "")
    missing = f"the {part} files of {model} are" if part else f"{model} is"
    return (
        f"{missing} not in the local Hugging Face cache "
        f"({constants.HF_HUB_CACHE}) and {why}: download it on a machine with network (`hf download "
        f"{repo_id}{pinned}`, or `huggingface-cli download {repo_id}{pinned}`) into this cache and run with "
        "HF_HUB_OFFLINE=1, or point --model at a local diffusers folder."
    )


def _network_errors() -> tuple[type[BaseException], ...]:
    """What huggingface_hub's HTTP client raises when the endpoint cannot be reached, for each client it has
    used (requests before 1.0, httpx, httpx2); status codes come as HfHubHTTPError, which is none of these."""
    kinds: list[type[BaseException]] = []
    for module, name in (("requests", "RequestException"), ("httpx", "TransportError"), ("httpx2", "TransportError")):
        try:
            kinds.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue  # that client is not installed: huggingface_hub does not use it here
    return tuple(kinds)


def push_run(
    run: Path, repo_id: str, *, private: bool = False, commit_message: str, checkpoint: Path | None = None
) -> str:
    """Upload a run's LoRA, model card, loss curve and config.toml to model repo ``repo_id`` in one commit.

    The repo is created if it does not exist (``private`` applies only then). With ``checkpoint`` (a
    ``checkpoint-NNNNNN`` folder of the run), that checkpoint's LoRA goes under ``checkpoint-NNNNNN/`` instead
    of the run's final LoRA. The card, curve and config go when present. Returns the commit's URL.
    """
    from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    run = Path(run)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise InputError(
            f"the Hub model id {repo_id!r} is not a valid repo id ({_first_line(err)}); write it as OWNER/NAME."
        ) from err
    files = {path.relative_to(run).as_posix(): path for path in _run_files(run, checkpoint)}
    if get_token() is None:
        raise InputError(f"pushing to {repo_id}: no Hugging Face token found; {_LOGIN} (a token with write access).")

    api = HfApi()
    additions = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in files.items()]
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.create_commit(repo_id, repo_type="model", operations=additions, commit_message=commit_message)
    except OfflineModeIsEnabled as err:
        raise InputError(f"pushing to {repo_id}: HF_HUB_OFFLINE is set; unset it to upload.") from err
    except HfHubHTTPError as err:
        status = _status(err)
        if status == 401:
            raise InputError(
                f"pushing to {repo_id}: {constants.ENDPOINT} did not accept the token (401); {_LOGIN} with a valid "
                "token that has write access."
            ) from err
        if status == 403:
            raise InputError(
                f"pushing to {repo_id}: {constants.ENDPOINT} refused the write (403); use a token with write access "
                "to that repo's owner, or push to a repo id under your own name."
            ) from err
        raise
    return str(commit.commit_url)


def _run_files(run: Path, checkpoint: Path | None) -> list[Path]:
    """The files one push uploads, each named by its path in the run folder (which is its path in the repo)."""
    if not run.is_dir():
        raise RunError(f"{run} is not a run folder; point at the --output folder of `cogvx train`.")
    if checkpoint is None:
        weights = runs.lora_weights(run)
        if not weights.is_file():
            raise RunError(f"{run} holds no {runs.LORA_WEIGHTS}: the run has not finished; push a checkpoint of it.")
    else:
        checkpoint = Path(checkpoint)
        if runs.checkpoint_step(checkpoint) is None or checkpoint.resolve().parent != run.resolve():
            raise RunError(f"{checkpoint} is not a checkpoint folder of {run}; name one of the run's checkpoints.")
        weights = runs.checkpoint_lora(run / checkpoint.name)
        if not weights.is_file():
            raise RunError(f"{checkpoint} holds no {runs.CHECKPOINT_LORA}; it is incomplete, push another checkpoint.")
    extras = [runs.model_card(run), runs.loss_curve(run), runs.config_toml(run)]
    return [weights, *(path for path in extras if path.is_file())]


def _status(err: Exception) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
