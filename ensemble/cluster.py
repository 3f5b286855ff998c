"""Starting or joining a Ray cluster: the one place the orchestrators (tune, predict) call ray.init."""

from __future__ import annotations

import contextlib
import io
import os


def start_ray(address: str | None = None, verbose: int = 1) -> None:
    """Join `address` (or $RAY_ADDRESS), else start a fresh local cluster: never a stray one by accident.

    Below verbose 2, Ray's own start-up lines ("Started a local Ray instance.") are not shown."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    quiet = contextlib.redirect_stderr(io.StringIO()) if verbose < 2 else contextlib.nullcontext()
    with quiet:
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False,
                 log_to_driver=verbose > 1, logging_level="INFO" if verbose > 1 else "WARNING")
