"""huggingface_hub's failures as the appliance's errors: one line each, and its fix.

The CLI prints them as `appliance: error: ...` and `hint: ...`; the bring-up's weights step
stops on them with nothing started.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from appliance.errors import ApplianceError, NotFoundError, PreflightError

HUB_URL = "https://huggingface.co"
# A token for gated models, readable by root only; never one in the models dir: it is mounted
# into the backend's container (code run with --trust-remote-code, on the host's network).
TOKEN_FILE = Path("/etc/appliance/hf-token")
TOKEN_HINT = f"set HF_TOKEN to a read token of that account (or put it in {TOKEN_FILE}, mode 0600)"


class GatedModelError(PreflightError):
    """The model's licence must be accepted on the Hub, and a token of that account sent."""


class ModelNotOnHubError(NotFoundError):
    """No such model (or revision) on the Hub, or it is private and no token was sent."""


class HubTokenRefusedError(PreflightError):
    """The Hub refused the token sent (invalid, expired)."""


class HubUnreachableError(PreflightError):
    """The Hub could not be reached, or failed mid-download, or downloads are off."""


class WeightsCorruptError(ApplianceError):
    """A downloaded file does not match the checksum the Hub gave for it."""

    hint = "run the command again: the bad file was removed and is fetched again"


OFFLINE_HINT = (
    "install the weights from an offline bundle (`appliance bundle install`) or copy a connected "
    "host's <models_dir>/hf; for vLLM on the host, inference.vllm.model may name a local model "
    "directory"
)


@contextmanager
def hub_errors(model: str, endpoint: str, *, token_sent: bool) -> Iterator[None]:
    """huggingface_hub's exceptions as ours: one line and the fix."""
    import httpx2

    try:
        yield
    except (OSError, httpx2.HTTPError) as exc:  # the hub's errors are OSErrors; httpx2's not
        raise _translate(exc, model, endpoint, token_sent) from exc


def _translate(exc: BaseException, model: str, endpoint: str, token_sent: bool) -> Exception:
    from huggingface_hub.errors import (
        DryRunError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, (DryRunError, LocalEntryNotFoundError)) and exc.__cause__ is not None:
        return _translate(exc.__cause__, model, endpoint, token_sent)
    page = f"{HUB_URL if endpoint == HUB_URL else endpoint}/{model}"
    if isinstance(exc, GatedRepoError):
        whose = "the token sent has no access" if token_sent else "no token was sent"
        return GatedModelError(
            f"{model} is a gated model: its licence must be accepted first ({whose})",
            hint=f"accept the licence at {page} with your Hugging Face account, then " + TOKEN_HINT,
        )
    status = exc.response.status_code if isinstance(exc, HfHubHTTPError) else None
    refused = status == 401 and not isinstance(exc, RepositoryNotFoundError)
    if refused and token_sent:  # a bad token is refused on every endpoint, public ones too
        return HubTokenRefusedError(
            f"the Hugging Face Hub ({endpoint}) refused the token (HF_TOKEN, {TOKEN_FILE} or "
            "the hub's saved token): invalid or expired",
            hint="create a read token at https://huggingface.co/settings/tokens and set "
            "HF_TOKEN to it",
        )
    if isinstance(exc, (RepositoryNotFoundError, RevisionNotFoundError)):
        private = "" if token_sent else "; a private model needs HF_TOKEN"
        return ModelNotOnHubError(
            f"model {model} was not found on the Hugging Face Hub ({endpoint})",
            hint="check inference.vllm.model (a models.yaml variant, a Hub id ORG/NAME or a "
            f"local directory){private}",
        )
    if isinstance(exc, HfHubHTTPError):
        return HubUnreachableError(
            f"the Hugging Face Hub ({endpoint}) answered {status} while fetching {model}",
            hint="run the command again later: files that finished are kept, the rest are "
            f"fetched; or {OFFLINE_HINT}",
        )
    reason = (str(exc).splitlines() or [type(exc).__name__])[0]
    return HubUnreachableError(
        f"the Hugging Face Hub ({endpoint}) cannot be reached or broke off: {reason}",
        hint=OFFLINE_HINT + "; or run the command again when the network is back",
    )
