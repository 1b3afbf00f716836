"""Telemetry off: an offline batch machine must not spend time (or log errors) phoning home.

Set before Prefect is imported; the CLI, the servers it starts and the tests call it.
"""

import os

QUIET_ENV = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "RAY_USAGE_STATS_ENABLED": "0"}


def set_quiet_defaults() -> None:
    """Telemetry off unless the user set these variables."""
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
