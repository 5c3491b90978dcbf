"""Pushing a finished Sleep run's model folder to the Hub (`push_to_hub`, `hub_model_id`, `hub_private_repo`).

`check_can_push` runs before anything else (a run that trains for an hour and then cannot upload is a wasted hour):
the Hub must be reachable (`HF_HUB_OFFLINE` unset) and a token known. `push_model_folder` creates the repository
if needed (in the token's namespace when `hub_model_id` has none) and uploads the folder in one commit.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import HfApi, constants, get_token

from ..errors import SleepTrlError


class HubError(SleepTrlError):
    """`push_to_hub` cannot work as configured (offline, no token) or the upload failed."""


def repo_name(config) -> str:
    """The repository a run pushes to: `hub_model_id`, else the name of `output_dir`."""
    return config.hub_model_id or Path(config.output_dir).resolve().name


def hub_offline() -> bool:
    return bool(constants.HF_HUB_OFFLINE)


def check_can_push(config) -> None:
    """Refuse `push_to_hub` early, with the fix, when it cannot work."""
    if not config.push_to_hub:
        return
    if hub_offline():
        raise HubError(
            "`push_to_hub: true` needs the Hub, but HF_HUB_OFFLINE is set: unset it, or set `push_to_hub: false` "
            "and upload the run's `model/` folder later (re-running the finished run with `push_to_hub: true` "
            "uploads it without training again)."
        )
    if get_token() is None:
        raise HubError(
            "`push_to_hub: true` needs a Hub token: run `hf auth login` or set HF_TOKEN (a token with write access)."
        )


def push_model_folder(folder: str | Path, config, commit_message: str) -> dict:
    """Create the repository (if needed) and upload `folder` in one commit; returns {repo_id, commit_url}."""
    api = HfApi()
    try:
        repo = api.create_repo(repo_name(config), private=config.hub_private_repo, exist_ok=True)
        commit = api.upload_folder(repo_id=repo.repo_id, folder_path=str(folder), commit_message=commit_message)
    except Exception as err:  # network, permissions, quota: the run itself is finished and kept
        raise HubError(
            f"Uploading {folder} to {repo_name(config)!r} failed ({type(err).__name__}: {err}). The run is finished "
            "and kept; re-run the same command to try the upload again."
        ) from err
    return {"repo_id": repo.repo_id, "commit_url": str(getattr(commit, "commit_url", commit))}
