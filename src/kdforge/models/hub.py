"""Hub ids without waiting on the network: answer from the local Hugging Face cache when offline,
and say in one line when a model can be neither found locally nor downloaded.

Without these checks, ``from_pretrained`` on an unreachable hub retries for about half a minute
and prints a line per retry before failing. Online users keep the ordinary hub code path
(downloads, revision checks); only a failed reachability probe or ``HF_HUB_OFFLINE`` changes it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from kdforge.errors import KDForgeError

log = logging.getLogger("kdforge")

_TRUE = ("1", "ON", "YES", "TRUE")


def hub_offline() -> bool:
    """Whether the user asked for offline mode (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``), read
    now rather than when huggingface_hub was imported."""
    from huggingface_hub import constants

    asked = any(os.environ.get(k, "").strip().upper() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return asked or bool(constants.HF_HUB_OFFLINE)


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT") or constants.ENDPOINT


def hub_reachable(timeout: float = 5.0) -> bool:
    """One HEAD request to the hub (through huggingface_hub's own session, so proxies apply), no retry."""
    from huggingface_hub.utils import get_session

    try:
        get_session().head(hub_endpoint(), timeout=timeout)
    except Exception:  # any transport failure (DNS, refused, timeout, proxy) means unreachable
        return False
    return True


def cached_snapshot(repo_id: str) -> Path | None:
    """The folder of ``repo_id``'s cached snapshot (of its main revision) if it holds a config.json."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except (ValueError, OSError):
        return None
    return Path(found).parent if isinstance(found, str) else None


def resolve_hub_id(repo_id: str, config_key: str = "teacher.model") -> str:
    """What to load for a hub id: the id itself when the hub is reachable, its cached snapshot folder
    when offline, else one line saying what is missing and how to fix it."""
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except ValueError:
        raise KDForgeError(f"`{config_key}`: {repo_id!r} is not a local folder, an installed package "
                           "(package:NAME) or a valid hub id; fix the model in the config") from None
    cached = cached_snapshot(repo_id)
    not_here = (f"`{config_key}`: {repo_id!r} is not a local folder, an installed package (package:NAME) "
                "or a model in the local Hugging Face cache")
    if hub_offline():
        if cached is not None:
            return str(cached)
        raise KDForgeError(f"{not_here}, and the hub is offline (HF_HUB_OFFLINE is set); download it while "
                           f"online or point {config_key} at a local folder")
    if not hub_reachable():
        if cached is not None:
            log.info("the hub (%s) cannot be reached: using the cached %s", hub_endpoint(), repo_id)
            return str(cached)
        raise KDForgeError(f"{not_here}, and the hub ({hub_endpoint()}) cannot be reached; connect to the "
                           f"network or point {config_key} at a local folder")
    return repo_id
