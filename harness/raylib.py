"""Joining or starting Ray the quiet way, with one clear error for an unreachable cluster."""
from __future__ import annotations

import os
import socket

from harness.config import InputError
from harness.logs import ray_logging_level


def _check_reachable(address: str) -> None:
    """A TCP connect to the GCS first: ray.init would retry an unreachable address for a minute."""
    if address == "auto" or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise InputError(f"Ray address {address!r}: expected HOST:PORT, ray://HOST:PORT or auto")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise InputError(f"Ray address {address!r}: cannot connect ({e.strerror or e})") from None


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Start an embedded local Ray (no ``address``) or join the cluster at ``address``."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Workers inherit the driver's environment: TRITON_INTERPRET, SEGREPRO_EXPERIMENTS, and the
    # Hugging Face cache settings under which the backbone weights were resolved
    runtime_env = {"env_vars": {k: v for k, v in os.environ.items()
                                if k.startswith(("SEGREPRO_", "TRITON_", "HF_"))}}
    try:
        if address:
            _check_reachable(address)
            ray.init(address=address, log_to_driver=False, runtime_env=runtime_env,
                     logging_level=ray_logging_level())
        else:
            # "local": a new instance even where `ray start` left a cluster on this machine, which
            # a bare ray.init() would join (and share with whoever started it)
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                     runtime_env=runtime_env, logging_level=ray_logging_level())
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise InputError(f"Ray address {address!r}: cannot connect ({e})") from None
