"""Operations on a running Patchwork setup: status, scaling, models."""

from __future__ import annotations

import logging
import time

from patchwork.serving.config import APP_NAME, GATEWAY


def connect() -> None:
    from patchwork.serving.cluster import connect as connect_to_cluster

    connect_to_cluster(logging_level="ERROR", log_to_driver=False)


PLACEMENT_TIMEOUT_S = 30.0


def status(placement: bool = False) -> dict:
    """Applications -> deployments -> {status, replicas: {state: count},
    message}; with ``placement``, Patchwork's deployments also say which
    models they run (``models``; absent while no gateway replica answers)."""
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
    if placement and APP_NAME in report:
        for deployment, models in models_by_deployment().items():
            report[APP_NAME]["deployments"].get(deployment, {})["models"] = models
    return report


def models_by_deployment() -> dict[str, list[str]]:
    """Which models each deployment runs, as a gateway replica says
    (``GatewayCore.placement``); empty when none answers."""
    from ray import serve

    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # a handle's start-up notes are not the status
    try:
        handle = serve.get_deployment_handle(GATEWAY, APP_NAME)
        return handle.placement.remote().result(timeout_s=PLACEMENT_TIMEOUT_S)
    except Exception:  # no gateway replica running (starting, stopped, failing): the rest of the status stands
        return {}


def replica_counts() -> dict[str, dict[str, int]]:
    """Deployment -> {"target": replicas Ray Serve is heading for (the
    autoscaler's decision, or the fixed count), "running": replicas serving
    now} for the running application; empty when none runs."""
    from ray.serve.context import _get_global_client

    connect()
    details = _get_global_client().get_serve_details()
    deployments = (details.get("applications") or {}).get(APP_NAME, {}).get("deployments", {})
    return {name: {"target": int(deployment["target_num_replicas"]),
                   "running": sum(str(replica["state"]).endswith("RUNNING") for replica in deployment["replicas"])}
            for name, deployment in deployments.items()}


def scale(deployment: str, replicas: int, timeout_s: float = 300.0) -> int:
    """Sets a fixed replica count and waits until that many replicas run.
    Ray Serve applies it in place: running replicas keep serving, in-flight
    requests finish (scale-down drains a replica before stopping it)."""
    from patchwork.serving.deploy import apply, running_config, with_replicas

    connect()
    running = running_config()
    names = [entry["name"] for entry in running["applications"][0].get("deployments", [])]
    if deployment not in names:
        gateway_runs = models_by_deployment().get(GATEWAY, [])
        model = deployment.removeprefix("model-")
        if model in gateway_runs:
            raise KeyError(f"{model} runs in the {GATEWAY}'s replicas (with {', '.join(gateway_runs)}), not in a "
                           f"deployment of its own: scale {GATEWAY} to scale every model it runs, or serve {model} "
                           f"in its own deployment (a model_overrides entry for it, or --gateway-models without it) "
                           "to scale it alone")
    apply(with_replicas(running, deployment, replicas))
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
            runs = "" if "models" not in deployment else (
                f"; runs {', '.join(deployment['models'])}" if deployment["models"] else "; runs no model")
            lines.append(f"  {name}: {deployment['status']} ({replicas or 'no replicas'}){runs}")
            if deployment["message"]:
                lines.append(f"    {deployment['message']}")
    return "\n".join(lines) or "no applications"


def _wait_running(timeout_s: float) -> None:
    """Waits until the application has applied its latest config."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        application = serve.status().applications.get(APP_NAME)
        if application is not None and str(getattr(application.status, "value", application.status)) == "RUNNING":
            return
        time.sleep(0.2)
    raise TimeoutError(f"the application did not apply its new config in {timeout_s:.0f} s")


def drain(grace_s: float, timeout_s: float = 60.0) -> float:
    """Tells every replica of the running application to drain: from now on
    new requests get UNAVAILABLE and health says NOT_SERVING; requests in
    flight go on until ``grace_s`` has passed, then end with UNAVAILABLE; and
    a replica being stopped waits that long for its requests. Ray Serve
    applies it to the running replicas in place. Returns the drain's deadline
    (a Unix time)."""
    from patchwork.serving.deploy import apply, running_config, with_drain

    connect()
    until = time.time() + grace_s
    apply(with_drain(running_config(), until, grace_s))
    _wait_running(timeout_s)
    return until


def resume(timeout_s: float = 60.0) -> None:
    """Ends a drain: the replicas serve new requests again."""
    from patchwork.serving.deploy import apply, running_config, with_drain

    connect()
    apply(with_drain(running_config(), None, drain_grace()))
    _wait_running(timeout_s)


def drain_grace() -> float:
    """The drain grace period of the running setup."""
    from patchwork.serving.deploy import running_config

    return float(running_config()["applications"][0]["args"]["config"]["drain_grace_s"])


def stop(grace_s: float | None = None) -> float:
    """Drains the application (``drain``), waits for Ray Serve to stop its
    replicas once their requests have ended, then stops Ray Serve. Returns
    the seconds it took."""
    from ray import serve

    started = time.monotonic()
    connect()
    if APP_NAME in serve.status().applications:
        try:
            drain(drain_grace() if grace_s is None else grace_s)
        except TimeoutError:  # an application that never came up (no resources, say): nothing to let finish
            pass
        serve.delete(APP_NAME)  # each replica first waits for its requests to end
    serve.shutdown()
    return time.monotonic() - started


def gateway_ports() -> list[int]:
    """The ports the gateway's replicas answer gRPC on themselves (direct
    ingress), lowest first; none without direct ingress or before a replica
    has taken one."""
    from ray.serve.context import _get_global_client

    connect()
    replica = f"{APP_NAME}#{GATEWAY}#"  # Ray Serve names a replica's actor app#deployment#id
    groups = _get_global_client().get_serve_details().get("target_groups") or []
    return sorted({target["port"] for group in groups if group.get("protocol") == "gRPC"
                   and group.get("app_name") == APP_NAME
                   for target in group.get("targets", []) if replica in (target.get("name") or "")})


def wait_gateway_port(timeout_s: float) -> int | None:
    """The lowest port a gateway replica answers on itself, once one has taken
    one (None if none has within ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ports = gateway_ports()
        if ports:
            return ports[0]
        time.sleep(0.5)
    return None


# While nothing listens, gRPC waits longer and longer between attempts to
# connect (up to two minutes); a channel that polls a server still starting
# tries again every second instead.
POLLING_CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
                           ("grpc.max_reconnect_backoff_ms", 1000)]


def polling_channel(target: str):
    """An insecure channel to ``target`` for polling a server that may still be starting."""
    import grpc

    return grpc.insecure_channel(target, options=POLLING_CHANNEL_OPTIONS)


def wait_healthy(target: str, timeout_s: float) -> bool:
    """Polls the standard health check at ``target`` until SERVING (True) or ``timeout_s`` passes (False)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    with polling_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    return False
