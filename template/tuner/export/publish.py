"""Push an export folder to the Hugging Face Hub, with its model card as README.md, in one commit.

The token is read from the HF_TOKEN environment variable only, never written anywhere (no
`huggingface-cli login`, no token file) and never printed. HF_ENDPOINT (a private Hub, a mirror)
is honoured by huggingface_hub itself. Every way the push fails is one line (ExportError).
"""

from __future__ import annotations

import os
from pathlib import Path

from tuner.export import ExportError

TOKENS_PAGE = "https://huggingface.co/settings/tokens"


def push(folder: Path, repo_id: str, card: str, private: bool = False) -> str:
    """Create the model repo `repo_id` if it does not exist, upload every file of `folder` and
    `card` as README.md (replacing a README.md of the folder) in one commit; returns the repo's URL."""
    token = os.environ.get("HF_TOKEN", "").strip()
    if not token:
        raise ExportError(f"--push-to-hub needs a write token in HF_TOKEN (create one at {TOKENS_PAGE})")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() != "README.md")
    if not files:
        raise ExportError(f"nothing to push: {folder} has no files")

    import httpx2  # huggingface_hub 2.x's HTTP client (a dependency of it)
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    api = HfApi(token=token)
    operations = [CommitOperationAdd(p.relative_to(folder).as_posix(), p) for p in files]
    operations.append(CommitOperationAdd("README.md", card.encode("utf-8")))
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.create_commit(
            repo_id, operations, commit_message=f"Upload {folder.name} with its model card", repo_type="model"
        )
    except HfHubHTTPError as err:
        raise ExportError(_http_message(err, repo_id)) from None
    except OfflineModeIsEnabled:
        raise ExportError("cannot push to the Hub while HF_HUB_OFFLINE is set: unset it and run again") from None
    except (httpx2.HTTPError, OSError) as err:  # the Hub unreachable: DNS, refused, timed out, proxy
        message = f"cannot reach the Hub at {api.endpoint} to push {repo_id}: {_first_line(err)}"
        if "xet-write-token" in str(err):  # large files go to Xet storage, which this endpoint does not offer
            message += " (a Hub without Xet storage: set HF_HUB_DISABLE_XET=1 to upload through Git LFS)"
        raise ExportError(message) from None
    except RuntimeError as err:  # an LFS upload that failed: huggingface_hub wraps the HTTP error in it
        cause = err.__cause__
        if isinstance(cause, HfHubHTTPError):
            raise ExportError(_http_message(cause, repo_id)) from None
        raise ExportError(f"push to {repo_id} failed: {_first_line(cause or err)}") from None
    except ValueError as err:  # a bad repo id, or model card metadata the Hub refused
        raise ExportError(f"push to {repo_id} refused: {_first_line(err, joined=True)}") from None
    return str(url)


def _first_line(err: BaseException, joined: bool = False) -> str:
    """The message on one line: its first line, or (joined) all its lines."""
    lines = [line.strip(" -") for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    if joined and len(lines) > 1:  # "Invalid metadata in README.md." and one line per problem
        return lines[0].rstrip(".:") + ": " + "; ".join(lines[1:])
    return lines[0]


def _http_message(err: Exception, repo_id: str) -> str:
    response = getattr(err, "response", None)
    status = getattr(response, "status_code", 0)
    said = (getattr(err, "server_message", None) or "").strip()
    said = f": {said.splitlines()[0]}" if said else ""
    if status == 401:
        return f"the Hub refused HF_TOKEN (401{said}): check the token, or create a new one at {TOKENS_PAGE}"
    if status == 403:
        return f"HF_TOKEN may not write to {repo_id} (403{said}): it needs the write permission on that namespace"
    if status == 404:
        return f"{repo_id} was not found on the Hub (404{said}): check the name, user or organisation"
    return f"push to {repo_id} failed: the Hub answered {status or '?'}{said}: {_first_line(err)}"
