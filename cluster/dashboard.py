"""Ray's dashboard on local runs: started with the run's own Ray, on 127.0.0.1, behind Ray's token.

A `duet train` without RAY_ADDRESS starts a local Ray. With `run.dashboard: true` (the default) that Ray
starts its dashboard on 127.0.0.1 (port `run.dashboard_port`, or 8265 and up), the run prints the
address once and writes RUN_DIR/dashboard.json. The dashboard serves the Jobs API too (it can run
code), so it only starts with Ray's token authentication on: Ray 2.60 turns it on for a new local
cluster unless RAY_AUTH_MODE says otherwise, and a user who set RAY_AUTH_MODE=disabled gets a run
without a dashboard and a line saying why. The browser asks for the token once ("Authentication
Token Required") and keeps it in a cookie; `ray get-auth-token` prints it. The token itself is never
printed nor written to the run directory.

Runs inside a cluster (RAY_ADDRESS, `duet submit`) use the head's dashboard; its address is printed
and recorded the same way when Ray reports one.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from cluster.config import RunConfig

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
AUTH_MODE_ENV = "RAY_AUTH_MODE"  # Ray's own switch; read by ray.init and by the dashboard process
TOKEN_HINT = "`ray get-auth-token` prints the token"


def ray_init_options(run: RunConfig) -> dict[str, Any]:
    """The dashboard's `ray.init` arguments for a run that starts its own local Ray.

    With RAY_AUTH_MODE unset, Ray 2.60's `ray.init` turns token authentication on for the new cluster
    (and creates ~/.ray/auth_token if there is none). RAY_AUTH_MODE is not set here: Ray caches its
    config in the process, and only its own switch refreshes that cache; a variable set behind its back
    leaves the driver without the token its GCS then demands. `announce` checks the result.
    """
    if not run.dashboard:
        return {"include_dashboard": False}
    mode = os.environ.get(AUTH_MODE_ENV, "").strip().lower()
    if mode and mode != "token":
        print(
            f"duet: no Ray dashboard: {AUTH_MODE_ENV}={os.environ[AUTH_MODE_ENV]} turns Ray's token "
            f"authentication off, and the dashboard (with its Jobs API) is only started behind it. Unset "
            f"{AUTH_MODE_ENV} or set it to token, or set run.dashboard=false to silence this.",
            file=sys.stderr,
            flush=True,
        )
        return {"include_dashboard": False}
    # WARNING: Ray's INFO line "View the dashboard at ..." would give the address a second time,
    # without the token hint; `announce` prints it once.
    return {
        "include_dashboard": True,
        "dashboard_host": HOST,
        "dashboard_port": run.dashboard_port,
        "logging_level": logging.WARNING,
    }


def token_source() -> str:
    """Where Ray takes its token from, in Ray's own order (never the token itself)."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return "the RAY_AUTH_TOKEN environment variable"
    if os.environ.get("RAY_AUTH_TOKEN_PATH", "").strip():
        return os.environ["RAY_AUTH_TOKEN_PATH"]
    return str(Path.home() / ".ray" / "auth_token")


def dashboard_url() -> str | None:
    """The connected Ray's dashboard address as a URL, or None when it has none."""
    try:
        # Ray's public API returns it only from ray.init(); this is what that context reads.
        from ray._private.worker import get_dashboard_url

        address = get_dashboard_url()
    except Exception:
        return None
    if not address:
        return None
    return address if address.startswith(("http://", "https://")) else f"http://{address}"


def announce(run_dir: Path, run: RunConfig, local: bool) -> dict | None:
    """Print the dashboard's address once and write RUN_DIR/dashboard.json; call right after ray.init.

    `local`: this process started the Ray (no RAY_ADDRESS). Returns what was written, or None when
    there is no dashboard to announce.
    """
    if local and not run.dashboard:
        return None
    url = dashboard_url()
    if url is None:
        if local:
            print("duet: the Ray dashboard did not start; see Ray's dashboard.log", file=sys.stderr)
        return None
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    auth = "token" if is_token_auth_enabled() else "none"
    if auth != "token":
        print(
            f"duet: WARNING: the Ray dashboard at {url} has no token authentication: anyone who can "
            "reach it can run code through its Jobs API",
            file=sys.stderr,
            flush=True,
        )
    info = {
        "url": url,
        "local": local,
        "auth": auth,
        "token_from": token_source() if auth == "token" else None,
        "jobs_page": f"{url}/#/jobs",
        "actors_page": f"{url}/#/actors",
    }
    tmp = run_dir / ".dashboard.json"
    tmp.write_text(json.dumps(info, indent=1) + "\n")
    tmp.replace(run_dir / "dashboard.json")
    where = "this run's Ray" if local else "the cluster's"
    token = (
        f"; it asks for the token once: {TOKEN_HINT} (from {info['token_from']})" if auth == "token" else ""
    )
    print(f"Ray dashboard ({where}): {url}{token}", file=sys.stderr, flush=True)
    return info
