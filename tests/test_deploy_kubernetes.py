"""The Kubernetes example (deploy/kubernetes/), checked without a cluster.

Each manifest is validated offline with kubernetes-validate (the OpenAPI schemas it ships, strict:
unknown fields fail) against the newest version it knows and against 1.29, the first release with
native sidecars on by default. Then the fields the example relies on are checked against the
image and the daemon: the sidecar shape, probes that are real `statefuld` commands, the shared
socket volume, the security context, the Secret, the stop budget. Last, the socket directory is
made the way the kubelet makes it, and a real daemon must start there.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import REPO, Daemon, RedisServer, rpc_call, running, short_tmpdir, wait_for

from statefuld import errors
from statefuld.cli import main as cli
from statefuld.config import PASSWORD_ENV, Config
from statefuld.server import STOP_AFTER_DRAIN_S

kubernetes_validate = pytest.importorskip("kubernetes_validate")
yaml = pytest.importorskip("yaml")

MANIFESTS = sorted((REPO / "deploy" / "kubernetes").glob("*.yaml"))
NATIVE_SIDECAR_MIN_VERSION = "1.29.0"


def load(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def workload() -> dict[str, Any]:
    (statefulset,) = [d for d in load(REPO / "deploy" / "kubernetes" / "deployment.yaml") if d["kind"] == "StatefulSet"]
    return statefulset


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = workload()["spec"]["template"]["spec"]
    return spec


def app() -> dict[str, Any]:
    (container,) = [c for c in pod_spec()["containers"] if c["name"] == "app"]
    return container


def sidecar() -> dict[str, Any]:
    (container,) = [c for c in pod_spec()["initContainers"] if c["name"] == "statefuld"]
    return container


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def dockerfile_user() -> tuple[int, int]:
    users = re.findall(r"(?m)^USER\s+(\d+):(\d+)\s*$", (REPO / "Dockerfile").read_text())
    uid, gid = users[-1]
    return int(uid), int(gid)


@pytest.mark.parametrize("version", [kubernetes_validate.latest_version(), NATIVE_SIDECAR_MIN_VERSION])
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_is_valid(path: Path, version: str) -> None:
    docs = load(path)
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_validation_is_strict() -> None:
    # A typo in a field name must fail, or the test above proves nothing.
    statefulset = workload()
    statefulset["spec"]["template"]["spec"]["initContainers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(statefulset, kubernetes_validate.latest_version(), strict=True)


def test_the_app_holds_the_pod_of_its_ordinal_and_drains_in_pre_stop(redis_for_k8s: RedisServer) -> None:
    from statefuld_client import Client

    env = env_of(app())
    assert env["POD_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['apps.kubernetes.io/pod-index']"
    assert workload()["spec"]["serviceName"] == "game-server"
    command = app()["lifecycle"]["preStop"]["exec"]["command"]
    assert command[:2] == ["python", "-c"]
    ns, service = env["GAME_NS"]["value"], env["GAME_SERVICE"]["value"]
    # The hook, run as the kubelet runs it, against a real daemon holding pod 1 for the app.
    with running(Daemon(redis_for_k8s.url)) as daemon, Client(daemon.socket_path) as client:
        hold = client.hold_pod(ns, service, 1, "Ready", 0)
        client.set_linked_pod(ns, "alice", service, 1, -1)
        hook_env = {"PATH": os.environ["PATH"], "STATEFULD_SOCKET": daemon.socket_path, "GAME_NS": ns,
                    "GAME_SERVICE": service, "POD_ID": "1"}
        done = subprocess.run([sys.executable, *command[1:]], env=hook_env, capture_output=True, text=True,
                              timeout=30)
        assert done.returncode == 0, done.stderr
        assert client.get_service_state(ns, service) == {1: "Draining"}
        assert client.route_user(ns, "alice", service, -1)["outcome"] == "kept"  # its users stay
        assert client.route_user(ns, "bob", service, -1)["outcome"] == "none"  # and it gets no new one
        hold.close()  # the application exits
        wait_for(lambda: client.get_service_state(ns, service) == {1: "Down"}, timeout_s=5, what="Down")


def test_statefuld_is_a_native_sidecar_sharing_the_socket() -> None:
    spec = pod_spec()
    statefuld = sidecar()
    # An init container that keeps running: starts before the app containers, stops after them.
    assert statefuld["restartPolicy"] == "Always"
    socket_path = env_of(statefuld)["STATEFULD_SOCKET"]["value"]
    socket_dir = os.path.dirname(socket_path)
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in statefuld["volumeMounts"]}
    volume = volumes[mounts[socket_dir]]
    # tmpfs: the kubelet mounts it with mode 1777; a disk emptyDir is 0777 without the sticky bit,
    # a socket directory the daemon refuses (see test_daemon_starts_in_the_socket_volume below).
    assert volume["emptyDir"]["medium"] == "Memory"
    assert spec["containers"]
    for app in spec["containers"]:
        app_mounts = {m["mountPath"]: m["name"] for m in app["volumeMounts"]}
        assert app_mounts[socket_dir] == volume["name"], f"{app['name']} must mount the socket volume"
        assert env_of(app)["STATEFULD_SOCKET"]["value"] == socket_path  # the client finds the same socket


def probe_command(probe: dict[str, Any]) -> list[str]:
    command: list[str] = probe["exec"]["command"]
    assert command[0] == "statefuld"
    subcommand = cli.commands[command[1]]
    subcommand.make_context(command[1], list(command[2:]))  # raises on an option the CLI does not have
    timeout = command[command.index("--timeout-s") + 1]
    assert float(timeout) < probe["timeoutSeconds"], "the client gives up before the kubelet kills the probe"
    return command[:2]


def test_probes_are_statefuld_commands() -> None:
    statefuld = sidecar()
    assert probe_command(statefuld["readinessProbe"]) == ["statefuld", "health"]  # ready: Redis reachable
    assert probe_command(statefuld["livenessProbe"]) == ["statefuld", "ping"]  # alive: a Redis outage is no restart
    # The app container starts once this passes, so it never meets a half-ready daemon.
    assert probe_command(statefuld["startupProbe"]) == ["statefuld", "health"]


def test_security_context_matches_the_image() -> None:
    spec = pod_spec()
    uid, gid = dockerfile_user()
    context = sidecar()["securityContext"]
    assert context["runAsNonRoot"] is True and context["runAsUser"] == uid and context["runAsGroup"] == gid
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"] and "add" not in context["capabilities"]
    # The socket volume's group: every container of the pod gets it, so the app may use the 0660 socket.
    assert spec["securityContext"]["fsGroup"] == gid
    assert Config(socket_path="/unused").socket_mode & 0o060 == 0o060


def test_configuration_comes_from_the_environment() -> None:
    env = env_of(sidecar())
    known = {"STATEFULD_SOCKET", PASSWORD_ENV} | {
        "STATEFULD_" + f.name.upper() for f in dataclasses.fields(Config) if "click" in f.metadata
    }
    assert set(env) <= known, set(env) - known
    assert env["STATEFULD_REDIS_URL"]["value"].startswith("redis")  # the image bundles no Redis
    password = env[PASSWORD_ENV]
    assert "value" not in password and password["valueFrom"]["secretKeyRef"]["key"]
    (secret,) = load(REPO / "deploy" / "kubernetes" / "redis-secret.example.yaml")
    assert secret["kind"] == "Secret"
    assert password["valueFrom"]["secretKeyRef"]["name"] == secret["metadata"]["name"]
    assert password["valueFrom"]["secretKeyRef"]["key"] in secret["stringData"]


def test_the_docs_create_the_secret_and_never_apply_the_example() -> None:
    # `kubectl apply -f deploy/kubernetes/` applies every manifest there, the example Secret too:
    # a real Redis password would be replaced with the example's placeholder.
    example = REPO / "deploy" / "kubernetes" / "redis-secret.example.yaml"
    (secret,) = load(example)
    for doc in (REPO / "README.md", REPO / "docs" / "DEPLOYMENT.md"):
        text = doc.read_text()
        applied = [REPO / target for target in re.findall(r"kubectl apply -f (\S+)", text)]
        assert applied, doc
        for target in applied:
            assert target.is_file() and target != example, f"{doc.name}: kubectl apply -f {target}"
        assert f"kubectl create secret generic {secret['metadata']['name']} --from-literal=password=" in text, doc


def test_stop_budget_covers_the_drain() -> None:
    env = env_of(sidecar())
    drain_s = float(env["STATEFULD_DRAIN_TIMEOUT_S"]["value"]) if "STATEFULD_DRAIN_TIMEOUT_S" in env else \
        Config(socket_path="/unused").drain_timeout_s
    # The app stops first, then statefuld drains and finishes stopping (up to STOP_AFTER_DRAIN_S
    # more: cancelled requests, last replies, closing Redis), all within the one grace period;
    # what is left is the app's. Below 15 s an ordinary app shutdown would eat into statefuld's.
    app_budget_s = pod_spec()["terminationGracePeriodSeconds"] - (drain_s + STOP_AFTER_DRAIN_S)
    assert app_budget_s >= 15, app_budget_s


def test_resources_are_set() -> None:
    resources = sidecar()["resources"]
    assert resources["requests"]["memory"] and resources["requests"]["cpu"]
    assert resources["limits"]["memory"]


# --- the socket volume as the kubelet makes it, with a real daemon --------------------------------


@pytest.fixture(scope="module")
def redis_for_k8s() -> Iterator[RedisServer]:
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.mark.parametrize(
    ("medium", "mode", "starts"),
    [
        # emptyDir medium Memory: a tmpfs (root mode 1777) plus fsGroup's setgid -> 3777: served.
        ("Memory", 0o3777, True),
        # default emptyDir: 0777 plus fsGroup's setgid -> 2777: anyone could swap the socket; refused.
        ("disk", 0o2777, False),
    ],
    ids=["medium-Memory", "medium-disk"],
)
def test_daemon_starts_in_the_socket_volume(redis_for_k8s: RedisServer, medium: str, mode: int, starts: bool) -> None:
    volume = short_tmpdir("sfk-")
    os.chmod(volume, mode)
    assert stat.S_IMODE(os.stat(volume).st_mode) == mode, medium
    daemon = Daemon(redis_for_k8s.url, dir=volume)
    try:
        if starts:
            daemon.start()
            assert rpc_call(daemon.socket_path, "ping", []) == (None, "PONG")
            assert daemon.stop() == 0, daemon.log()
        else:
            daemon.start(wait=False)
            assert daemon.wait(20) == errors.EXIT_CONFIG, daemon.log()
            assert "sticky" in daemon.log(), daemon.log()
    finally:
        daemon.stop()
        shutil.rmtree(volume, ignore_errors=True)

