"""Downloads from the Hugging Face Hub, with one readable line when the hub cannot be reached.

The download rules run where there is network (login nodes on a cluster). Where there is none,
or the repository is missing or gated, the user gets the hub id and the config entry to write
instead (a local copy), not a chain of connection tracebacks.
"""

from __future__ import annotations

from contextlib import contextmanager

from entroflow.errors import EntroflowError

LOCAL_ENTRY = {
    "datasets": "{source: local, path: /your/copy.jsonl, problem_field: ..., answer_field: ...}",
    "models": "{source: local, path: /your/from_pretrained_folder}",
}


class HubError(EntroflowError):
    pass


@contextmanager
def hub_download(section: str, name: str, repo_id: str):
    """Turn the hub's connection and not-found errors inside the block into one `HubError`
    naming `section.name`, `repo_id` and the local entry that replaces it."""
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        yield
    except (HfHubHTTPError, LocalEntryNotFoundError, ConnectionError, TimeoutError) as err:
        reason = _reason(err)
        raise HubError(
            f"{section}.{name}: cannot download '{repo_id}' from the Hugging Face Hub ({reason}). "
            f"Run this rule where the hub is reachable, or point the config at a local copy: "
            f"{section}.{name}: {LOCAL_ENTRY[section]}"
        ) from None


def _reason(err: Exception) -> str:
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if isinstance(err, GatedRepoError):
        return "gated: accept its licence on the hub and log in with `hf auth login`"
    if isinstance(err, RepositoryNotFoundError):
        return "no such repository, or private: check the id, log in with `hf auth login`"
    return f"no connection: {type(err).__name__}"


def download_model(name: str, repo_id: str, revision: str | None, folder: str) -> None:
    """A hub model's files into `folder` (the rule's output), once."""
    from huggingface_hub import snapshot_download

    with hub_download("models", name, repo_id):
        snapshot_download(repo_id=repo_id, revision=revision, local_dir=folder)
