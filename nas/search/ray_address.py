"""--ray-address checked before Ray is imported: a cluster that is not there is one line
within seconds, not minutes of retries."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from nas.errors import ConfigError

CONNECT_TIMEOUT_S = 10.0
# Ray retries a connection to a GCS for minutes (20 tries of up to 40 s); these bound it to
# seconds. Read when ray is imported and when it connects, so set before either; they
# matter only when attaching to a running cluster, which is when they are set.
_BOUNDED_CONNECT = {"RAY_gcs_server_port_wait_time_s": "1",
                    "RAY_gcs_rpc_server_connect_timeout_s": "2",
                    "RAY_py_gcs_connect_timeout_s": "3",
                    "RAY_CLIENT_INITIAL_CONNECTION_TIMEOUT_S": "2",
                    "RAY_CLIENT_MAX_CONNECTION_TIMEOUT_S": "2"}


def check_address(address: str | None) -> None:
    """Refuse an address where no cluster answers; for one that does, bound Ray's own
    connection attempts."""
    if address in (None, "local"):
        return
    if address == "auto":
        env = os.environ.get("RAY_ADDRESS")
        if env and env != "auto":  # set inside a Ray job: its cluster
            return check_address(env)
        if not Path("/tmp/ray/ray_current_cluster").exists():
            raise ConfigError("--ray-address auto: no Ray cluster runs on this machine; start one "
                              "with 'ray start --head', give its address, or leave --ray-address "
                              "out to run Ray inside this process")
        return _bound()
    scheme, sep, _ = address.partition("://")
    if sep and scheme != "ray":
        raise ConfigError(f"--ray-address {address} (or RAY_ADDRESS) is a {scheme} URL, such as "
                          f"'ray job submit' takes; give the cluster's address HOST:PORT (6379 "
                          f"by default), or auto")
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--ray-address {address!r} is not an address; give HOST:PORT of a "
                          f"cluster's head (as 'ray start --head' prints it), or auto")
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"--ray-address {address}: no Ray cluster answers there ({reason}); "
                          f"start one with 'ray start --head', or leave --ray-address out to run "
                          f"Ray inside this process") from None
    _bound()


def _bound() -> None:
    import sys

    if "ray" in sys.modules:
        return  # too late to bound it; and this process may start clusters of its own
    for key, value in _BOUNDED_CONNECT.items():
        os.environ.setdefault(key, value)
