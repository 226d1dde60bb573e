"""Pushing a folder to the Hugging Face Hub: the token (resolved before any work), one commit, retries.

`push_folder` uploads every file of a folder in a single `HfApi.create_commit`, creating the repository if
needed and retrying transient errors (connection problems, HTTP 408/429/5xx) with exponential backoff.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from sd_plugin.cli import UsageError
from sd_plugin.model_card import is_hub_id


class PublishError(UsageError):
    """A problem found before anything is merged or written: bad inputs, no token, offline mode.
    `sd-plugin merge` prints it as one line on stderr and exits with status 2 (`sd_plugin.cli.main`)."""


class PushError(Exception):
    """The upload failed after its retries (or for good: bad token, no write access); the files are on disk."""


def format_size(size: int | None) -> str:
    if size is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def list_folder_files(folder: str | os.PathLike) -> list[tuple[str, int]]:
    """Every file under `folder` (hidden folders such as .cache skipped), as (relative path, bytes)."""
    folder = Path(folder)
    found = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts):
            found.append((relative.as_posix(), path.stat().st_size))
    return found


def resolve_hub_token(token: str | None = None) -> tuple[str | None, str | None]:
    """(token, where it came from): the argument, HF_TOKEN, then huggingface_hub's stored login."""
    if token:
        return token, "passed in"
    if os.environ.get("HF_TOKEN"):
        return os.environ["HF_TOKEN"], "HF_TOKEN"
    import huggingface_hub

    stored = huggingface_hub.get_token()
    return (stored, "huggingface_hub.get_token() (stored login)") if stored else (None, None)


def require_push_ready(repo_id: str, token: str | None = None, api=None) -> str:
    """The token to push with; raises PublishError (before any merging) when there is none or the Hub is off."""
    if not is_hub_id(repo_id):
        raise PublishError(f"--push-to-hub needs a repository id like 'your-name/model-name', got {repo_id!r}")
    token, _ = resolve_hub_token(token)
    if token is None:
        raise PublishError(
            f"pushing to {repo_id} needs a Hugging Face token with write access, and none was found: set HF_TOKEN "
            "or run `hf auth login` (or drop --push-to-hub). Nothing was merged or written.")
    if api is None:
        import huggingface_hub.constants

        if huggingface_hub.constants.is_offline_mode():
            raise PublishError(f"pushing to {repo_id} needs the network, but HF_HUB_OFFLINE is set: unset it to push. "
                               "Nothing was merged or written.")
    return token


def is_transient_hub_error(error: BaseException) -> bool:
    """Connection problems, timeouts, HTTP 408/429 and 5xx are worth retrying; anything else is not."""
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    try:
        import httpx

        if isinstance(error, httpx.TransportError):
            return True
    except ImportError:
        pass
    status = getattr(getattr(error, "response", None), "status_code", None)
    return isinstance(status, int) and (status >= 500 or status in (408, 429))


def with_retries(action, what: str, retries: int, backoff_seconds: float, log=print):
    """Run `action()`, retrying transient Hub errors `retries` times with exponential backoff."""
    for attempt in range(retries + 1):
        try:
            return action()
        except Exception as error:
            if attempt == retries or not is_transient_hub_error(error):
                raise
            delay = backoff_seconds * 2**attempt
            log(f"{what} failed ({type(error).__name__}: {error}); retry {attempt + 1} of {retries} in {delay:.0f} s")
            time.sleep(delay)


def push_folder(folder: str | os.PathLike, repo_id: str, *, token: str | None = None, private: bool = False,
                commit_message: str = "Upload model trained with sd-plugin", api=None, retries: int = 3,
                backoff_seconds: float = 2.0, log=print):
    """Upload every file of `folder` to `repo_id` in one commit; returns the CommitInfo.

    The repository is created if missing (`private` applies to a new repository only). Transient errors
    are retried around each call; the operations are reused, so files already uploaded are not sent again.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    token = require_push_ready(repo_id, token, api)
    api = api or HfApi(token=token)
    files = list_folder_files(folder)
    if not files:
        raise PublishError(f"{folder} has no files to push")
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(Path(folder) / name)) for name, _ in files]
    try:
        with_retries(lambda: api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model"),
                     f"creating {repo_id}", retries, backoff_seconds, log)
        log(f"pushing {len(files)} files ({format_size(sum(size for _, size in files))}) to {repo_id} in one commit")
        return with_retries(lambda: api.create_commit(repo_id, operations, commit_message=commit_message, repo_type="model"),
                            f"commit to {repo_id}", retries, backoff_seconds, log)
    except Exception as error:
        raise PushError(f"push to {repo_id} failed ({type(error).__name__}: {error}); the files are in {folder}: "
                        f"upload them with `hf upload {repo_id} {folder}`{' --private' if private else ''}") from error
