"""Operations on a running Patchwork setup: status, scaling, models."""

from __future__ import annotations

import time

from serving.config import APP_NAME


def connect() -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address="auto", logging_level="ERROR", log_to_driver=False)


def status() -> dict:
    """Applications -> deployments -> {status, replicas: {state: count}, message}."""
    from ray import serve

    connect()
    report = {}
    for app_name, app in serve.status().applications.items():
        report[app_name] = {
            "status": app.status.value if hasattr(app.status, "value") else str(app.status),
            "deployments": {
                name: {
                    "status": str(getattr(d.status, "value", d.status)),
                    "replicas": {str(getattr(k, "value", k)): v for k, v in d.replica_states.items()},
                    "message": d.message,
                }
                for name, d in app.deployments.items()
            },
        }
    return report


def running_replicas(deployment: str) -> int:
    return status().get(APP_NAME, {}).get("deployments", {}).get(deployment, {}).get("replicas", {}).get("RUNNING", 0)


def scale(deployment: str, replicas: int, timeout_s: float = 300.0) -> int:
    """Sets a fixed replica count and waits until that many replicas run.
    Ray Serve applies it in place: running replicas keep serving, in-flight
    requests finish (scale-down drains a replica before stopping it)."""
    from serving.deploy import apply, running_config, with_replicas

    connect()
    apply(with_replicas(running_config(), deployment, replicas))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        current = status()[APP_NAME]["deployments"][deployment]
        if current["replicas"].get("RUNNING", 0) == replicas and sum(current["replicas"].values()) == replicas:
            return replicas
        time.sleep(0.5)
    raise TimeoutError(f"{deployment} did not reach {replicas} running replicas in {timeout_s:.0f} s")


def format_status(report: dict) -> str:
    lines = []
    for app_name, app in report.items():
        lines.append(f"application {app_name}: {app['status']}")
        for name, deployment in app["deployments"].items():
            replicas = ", ".join(f"{count} {state}" for state, count in sorted(deployment["replicas"].items()))
            lines.append(f"  {name}: {deployment['status']} ({replicas or 'no replicas'})")
            if deployment["message"]:
                lines.append(f"    {deployment['message']}")
    return "\n".join(lines) or "no applications"
