"""Where a model comes from: a local folder or a Hugging Face Hub id.

Without a network, huggingface_hub retries every file of a Hub id for about a minute before failing with a message
that does not say why. So a command works offline (HF_HUB_OFFLINE) when the Hub's host cannot be resolved, and a
Hub id that the local cache lacks is refused at once, in one line that names it.
"""
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from urllib.parse import urlparse

from waveft.errors import UserError

OFFLINE_VARIABLE = "HF_HUB_OFFLINE"
# A proxy may reach the Hub although its host does not resolve here: then the libraries decide.
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
RESOLVE_TIMEOUT_S = 3.0  # a DNS server that does not answer counts as no network

_unresolved_host: str | None = None  # set when this process went offline because the Hub's host did not resolve


def _resolves(host: str) -> bool:
    import socket

    pool = ThreadPoolExecutor(max_workers=1)
    try:
        pool.submit(socket.getaddrinfo, host, 443).result(timeout=RESOLVE_TIMEOUT_S)
        return True
    except (OSError, FutureTimeout):
        return False
    finally:
        pool.shutdown(wait=False)


@functools.cache  # once per process
def work_offline_if_the_hub_is_unreachable() -> None:
    """Set HF_HUB_OFFLINE when the Hub's host cannot be resolved (at most RESOLVE_TIMEOUT_S), before any model
    library reads it. Cached Hub ids then load from the cache without retries."""
    global _unresolved_host
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or any(os.environ.get(v) for v in PROXY_VARIABLES):
        return
    host = urlparse(constants.ENDPOINT).hostname
    if host and not _resolves(host):
        _unresolved_host = host
        os.environ[OFFLINE_VARIABLE] = "1"  # for child processes and libraries not imported yet
        constants.HF_HUB_OFFLINE = True  # read once, when huggingface_hub was imported (just now, above)


def looks_like_path(name: str) -> bool:
    """A Hub id is `name` or `owner/name`; anything else names a folder."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1


def check_model_source(name: str | os.PathLike, setting: str, revision: str | None = None) -> None:
    """`name` is a local folder, or a Hub id that can be downloaded or is in the local cache; otherwise a UserError
    naming `setting` (a config key or a CLI option) and `name`. Costs a stat, or offline a look into the cache;
    called before the model libraries are imported, so that a refusal comes in about a second."""
    name = os.fspath(name)
    if os.path.isdir(name):
        return
    if looks_like_path(name):
        raise UserError(f"{setting}: folder not found: {name} (give a local folder or a Hub id)")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    work_offline_if_the_hub_is_unreachable()
    if not constants.HF_HUB_OFFLINE:
        return
    try:
        snapshot_download(name, revision=revision, local_files_only=True)
    except (LocalEntryNotFoundError, ValueError):
        why = f"{_unresolved_host} cannot be resolved, so " if _unresolved_host else ""
        raise UserError(
            f"{setting} {name!r}: no local folder of that name, and this Hub id is not in the local cache "
            f"({why}{OFFLINE_VARIABLE}=1: nothing is downloaded); give a local folder, or download it online first"
        ) from None


def check_model_sources(model_cfg) -> None:
    """check_model_source for a training config's `model:` section (the built-in tiny model is built if missing)."""
    if not model_cfg.builds_tiny_model():
        check_model_source(model_cfg.pretrained, "model.pretrained", model_cfg.revision)
    if model_cfg.vae is not None:
        check_model_source(model_cfg.vae, "model.vae")
