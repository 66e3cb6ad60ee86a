"""The deployment files in ``deploy/`` agree with the code they configure.

Every manifest is parsed, and each setting it names is checked against what the code
has: every ``--option`` and ``BALANCECTL_*`` variable is one ``balancectl serve`` takes
(introspected from the Typer command, so a renamed option fails here), probe paths are
routes of the app, ports agree from the container to the Service to the URL in the
Secret, the stop grace covers the node's drain and its lease handoff, the disruption
budget leaves nodes running, and PgBouncer runs in transaction mode with the startup
parameters docs/operations.md requires. The systemd unit is checked the same way, and
by ``systemd-analyze verify`` where that command exists.
"""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import typer
import yaml
from typer.core import TyperGroup, TyperOption

from balancectl.cli import app as cli_app
from balancectl.config import NodeSettings, SchedulerSettings
from balancectl.db import session_settings
from balancectl.errors import ConfigError
from balancectl.workers import STOP_GRACE

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"
UNIT = ROOT / "deploy" / "systemd" / "balancectl@.service"
OPERATIONS = ROOT / "docs" / "operations.md"
Manifest = dict[str, Any]


# ---------------------------------------------------------------- what the code has


def serve_command() -> Any:
    """The ``serve`` command as Typer builds it (Typer carries its own copy of click)."""
    group = typer.main.get_command(cli_app)
    assert isinstance(group, TyperGroup)
    return group.commands["serve"]


def serve_options() -> dict[str, TyperOption]:
    """Every spelling of every ``serve`` option (``--prepare`` and ``--no-prepare`` both)."""
    options: dict[str, TyperOption] = {}
    for param in serve_command().params:
        if isinstance(param, TyperOption):
            for name in [*param.opts, *param.secondary_opts]:
                options[name] = param
    return options


def serve_envvars() -> dict[str, TyperOption]:
    """``BALANCECTL_*`` variable -> the option it sets: each option's own variable, and
    the older ones its help names (``BALANCECTL_NO_PREPARE`` for ``--prepare``)."""
    found: dict[str, TyperOption] = {}
    for param in serve_command().params:
        if isinstance(param, TyperOption):
            own = [param.envvar] if isinstance(param.envvar, str) else list(param.envvar or [])
            older = re.findall(r"BALANCECTL_[A-Z_]+", param.help or "")
            found.update(dict.fromkeys([*own, *older], param))
    return found


def parsed(args: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Any:
    """What ``balancectl serve ARGS`` reads with ``env``: its parameters, or BadParameter.

    Typer's own parser does the work (options and environment variables, their types
    and ranges, the callbacks that read older variables) without running the command.
    """
    for variable in serve_envvars():
        monkeypatch.delenv(variable, raising=False)
    for variable, value in env.items():
        monkeypatch.setenv(variable, value)
    return serve_command().make_context("serve", list(args)).params


def prepares(params: dict[str, Any]) -> bool:
    """Whether the node prepares statements: ``--no-prepare`` or ``--prepare/--no-prepare``."""
    if "no_prepare" in params:
        return not params["no_prepare"]
    return bool(params["prepare"])


POOL_CLOSE = 5.0  # psycopg_pool's AsyncConnectionPool.close() waits this long at most


def handoff_seconds(lease_ttl: float) -> float:
    """The longest a SIGTERM'd scheduler takes to hand its jobs back and close its pools.

    The waits of ``Scheduler.stop``, one after the other, from the scheduler's own bounds:
    the claim in flight (a call + 0.5 s), the runs ending (the stop grace), a stuck run
    recorded (a call) and waited for (a call + 0.5 s), the loops (1 s), the node marked
    stopped (a call); then the scheduler's and the jobs' pools close.
    """
    from balancectl.scheduler.runner import Scheduler

    none: Any = None  # the bounds depend on the settings only
    scheduler = Scheduler(none, [], SchedulerSettings(lease_ttl=lease_ttl), none)
    call, grace = scheduler.call_timeout, scheduler.stop_grace
    return (call + 0.5) + grace + call + (call + 0.5) + 1.0 + call + 2 * POOL_CLOSE


def drain_seconds() -> float:
    """How long uvicorn drains requests in flight on SIGTERM, as the worker configures it."""
    from balancectl.worker import uvicorn_config

    config = uvicorn_config(NodeSettings(database_url="postgresql://localhost/unused"))
    assert config.timeout_graceful_shutdown is not None
    return float(config.timeout_graceful_shutdown)


def app_paths() -> set[str]:
    from balancectl.api import create_app

    app = create_app(NodeSettings(database_url="postgresql://localhost/unused"))
    return {route.path for route in app.routes}


# ---------------------------------------------------------------- the Kubernetes files


def manifests() -> list[Manifest]:
    documents: list[Manifest] = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        documents += [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    return documents


def one(kind: str, name: str) -> Manifest:
    [found] = [m for m in manifests() if m["kind"] == kind and m["metadata"]["name"] == name]
    return found


def container(deployment: Manifest, name: str) -> Manifest:
    containers: list[Manifest] = deployment["spec"]["template"]["spec"]["containers"]
    [found] = [c for c in containers if c["name"] == name]
    return found


def node_container() -> Manifest:
    return container(one("Deployment", "balancectl"), "balancectl")


def env_of(spec: Manifest) -> dict[str, Manifest]:
    return {entry["name"]: entry for entry in spec.get("env", [])}


def arg_options(args: list[str]) -> dict[str, str | None]:
    """``--name value`` pairs of a command line (a flag maps to None)."""
    found: dict[str, str | None] = {}  # --name -> its value
    for index, arg in enumerate(args):
        if arg.startswith("--"):
            following = args[index + 1] if index + 1 < len(args) else None
            is_value = following is not None and not following.startswith("--")
            found[arg] = following if is_value else None
    return found


def env_values(spec: Manifest) -> dict[str, str]:
    """The container's variables as the node would see them; stand-ins for references."""
    values: dict[str, str] = {}
    for name, entry in env_of(spec).items():
        if "value" in entry:
            values[name] = str(entry["value"])
        elif "resourceFieldRef" in entry["valueFrom"]:
            values[name] = "2"  # limits.cpu with divisor 1: a whole number
        elif "secretKeyRef" in entry["valueFrom"]:
            ref = entry["valueFrom"]["secretKeyRef"]
            values[name] = secret_value(ref["name"], ref["key"])
        else:
            values[name] = "pod-name-7d9f8"
    return values


def node_params(monkeypatch: pytest.MonkeyPatch) -> Any:
    spec = node_container()
    return parsed(spec["args"][1:], env_values(spec), monkeypatch)


def secret_value(name: str, key: str) -> str:
    return str(one("Secret", name)["stringData"][key])


def named_port(spec: Manifest, name: str) -> int:
    [port] = [p["containerPort"] for p in spec["ports"] if p["name"] == name]
    return int(port)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    files = {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    kinds = sorted(m["kind"] for m in manifests())
    assert kinds == sorted(["Secret", "Secret", "ConfigMap", "Deployment", "Deployment",
                            "Service", "Service", "PodDisruptionBudget"]), kinds  # fmt: skip


def test_every_option_and_variable_is_one_serve_takes(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = node_container()
    assert spec["command"] == ["balancectl"] and spec["args"][0] == "serve"
    options, envvars = serve_options(), serve_envvars()
    for option in arg_options(spec["args"][1:]):
        assert option in options, f"balancectl serve has no {option}"
    for name in env_of(spec):
        assert name in envvars, f"balancectl serve reads no {name}"
    params = node_params(monkeypatch)  # every value parses, in range
    assert params["host"] == "0.0.0.0" and params["node_id"] == "pod-name-7d9f8"
    assert params["workers"] == 2 and not prepares(params)


def test_node_identity_workers_and_secrets_come_from_the_pod() -> None:
    spec = node_container()
    env = env_of(spec)
    assert env["BALANCECTL_NODE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    cpu = env["BALANCECTL_WORKERS"]["valueFrom"]["resourceFieldRef"]
    assert (cpu["containerName"], cpu["resource"]) == (spec["name"], "limits.cpu")
    assert "cpu" in spec["resources"]["limits"]
    for variable in ("BALANCECTL_API_TOKEN", "BALANCECTL_DATABASE_URL"):
        ref = env[variable]["valueFrom"]["secretKeyRef"]
        assert secret_value(ref["name"], ref["key"]), variable
    # No secret on the command line, where `ps` and the pod spec's readers see it.
    assert not {"--api-token", "--database-url"} & set(spec["args"])
    assert all("postgresql://" not in arg for arg in spec["args"])


def test_a_node_on_all_interfaces_has_its_token(monkeypatch: pytest.MonkeyPatch) -> None:
    params = node_params(monkeypatch)
    assert params["host"] == "0.0.0.0" and params["api_token"] and not params["insecure"]
    with pytest.raises(ConfigError, match="without --api-token"):
        NodeSettings(database_url="postgresql://localhost/x", host="0.0.0.0")


def test_probes_are_routes_on_the_node_port(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = node_container()
    paths = app_paths()
    assert named_port(spec, "http") == node_params(monkeypatch)["port"]
    assert spec["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert spec["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        get = spec[probe]["httpGet"]
        assert get["path"] in paths, f"{probe}: the app has no route {get['path']}"
        assert get["port"] == "http", probe
    service = one("Service", "balancectl")
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert (
        service["spec"]["selector"]
        == one("Deployment", "balancectl")["spec"]["selector"]["matchLabels"]
    )


def test_startup_probe_outlasts_the_wait_for_the_database(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = node_container()
    db_wait = node_params(monkeypatch)["db_wait"]
    startup = spec["startupProbe"]
    budget = startup["periodSeconds"] * startup["failureThreshold"]
    print(f"startup probe budget {budget} s, database wait {db_wait} s")
    assert budget > db_wait


def test_grace_period_covers_the_drain_and_the_lease_handoff(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pod = one("Deployment", "balancectl")["spec"]["template"]["spec"]
    spec = node_container()
    ttl = node_params(monkeypatch)["lease_ttl"]
    command = spec["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    drain = drain_seconds()
    assert STOP_GRACE >= drain  # the supervisor's wait for its workers covers their drain
    worst = pre_stop + handoff_seconds(ttl) + STOP_GRACE
    grace = pod["terminationGracePeriodSeconds"]
    print(f"preStop {pre_stop} + handoff {handoff_seconds(ttl)} (TTL {ttl}) + workers "
          f"{STOP_GRACE} (drain {drain}) = {worst} s < grace {grace} s")  # fmt: skip
    assert grace > worst


def test_disruption_budget_leaves_nodes_running() -> None:
    deployment = one("Deployment", "balancectl")
    replicas = deployment["spec"]["replicas"]
    budget = one("PodDisruptionBudget", "balancectl")["spec"]
    assert budget["selector"] == deployment["spec"]["selector"]
    assert replicas >= 2
    assert 1 <= budget["minAvailable"] < replicas, (budget, replicas)
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def pgbouncer_ini() -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    parser.read_string(one("ConfigMap", "pgbouncer")["data"]["pgbouncer.ini"])
    return parser


def parameters(value: str) -> set[str]:
    return {name.strip() for name in value.split(",") if name.strip()}


def required_startup_parameters() -> set[str]:
    """What docs/operations.md's PgBouncer section lists, and what the pools send."""
    text = OPERATIONS.read_text()
    [listed] = re.findall(r"^ignore_startup_parameters = (.+)$", text, flags=re.M)
    return parameters(listed) | set(session_settings(NodeSettings("postgresql://x/y").pool))


def test_pgbouncer_pools_transactions_and_ignores_what_the_nodes_send(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ini = pgbouncer_ini()["pgbouncer"]
    assert ini["pool_mode"] == "transaction"
    ignored = parameters(ini["ignore_startup_parameters"])
    missing = required_startup_parameters() - ignored
    assert not missing, f"ignore_startup_parameters lacks {sorted(missing)}"
    assert {"extra_float_digits", "options"} <= ignored
    # Transaction pooling before 1.21 cannot route prepared statements: nodes never prepare.
    assert "max_prepared_statements" not in ini
    assert not prepares(node_params(monkeypatch))


def test_pgbouncer_ports_and_the_nodes_url_agree() -> None:
    ini = pgbouncer_ini()
    spec = container(one("Deployment", "pgbouncer"), "pgbouncer")
    service = one("Service", "pgbouncer")
    listen = int(ini["pgbouncer"]["listen_port"])
    assert named_port(spec, "postgres") == listen
    [port] = service["spec"]["ports"]
    assert (port["port"], port["targetPort"]) == (listen, "postgres")
    url = urlsplit(secret_value("balancectl", "database-url"))
    assert (url.hostname, url.port) == (service["metadata"]["name"], port["port"])
    assert url.path.lstrip("/") in ini["databases"], "the URL's database is not in [databases]"
    assert spec["command"][-1] == "/etc/pgbouncer/pgbouncer.ini"
    mounts = {m["mountPath"]: m for m in spec["volumeMounts"]}
    assert mounts["/etc/pgbouncer/pgbouncer.ini"]["subPath"] == "pgbouncer.ini"
    secret_dir = Path(ini["pgbouncer"]["auth_file"]).parent
    assert str(secret_dir) in mounts
    for key in ("userlist.txt", "root.crt"):
        assert one("Secret", "pgbouncer")["stringData"][key]
    assert ini["pgbouncer"]["server_tls_sslmode"] == "verify-full"


# ---------------------------------------------------------------- the systemd unit


def unit_sections(text: str) -> dict[str, dict[str, list[str]]]:
    """``[Section]`` -> key -> every value (keys repeat in systemd units)."""
    sections: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        sections[section][key].append(value)
    return sections


def service_settings() -> dict[str, list[str]]:
    return unit_sections(UNIT.read_text())["Service"]


def environment_assignments(values: list[str]) -> Iterator[tuple[str, str]]:
    for value in values:
        for assignment in value.split():
            name, _, setting = assignment.partition("=")
            yield name, setting


def test_unit_runs_serve_with_options_and_variables_it_has(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    service = service_settings()
    [exec_start] = service["ExecStart"]
    binary, command, *args = exec_start.split()
    assert binary.endswith("/balancectl") and command == "serve"
    options, envvars = serve_options(), serve_envvars()
    for option in arg_options(args):
        assert option in options, option
    env = dict(environment_assignments(service["Environment"]))
    for name in env:
        assert name in envvars, f"balancectl serve reads no {name}"
    # %H and %i are systemd's specifiers (host name, instance): stand-ins here.
    env = {name: value.replace("%H", "host").replace("%i", "1") for name, value in env.items()}
    params = parsed(args, env, monkeypatch)
    assert (params["node_id"], params["host"]) == ("host-1", "0.0.0.0")
    assert any(not f.startswith("-") for f in service["EnvironmentFile"]), "a required env file"
    assert "--api-token" not in args and "--database-url" not in args
    assert "postgresql://" not in exec_start


def test_unit_stops_like_the_node_does(monkeypatch: pytest.MonkeyPatch) -> None:
    service = service_settings()
    assert service["KillSignal"] == ["SIGTERM"]
    assert service["KillMode"] == ["mixed"]  # SIGTERM to the supervisor; it stops its workers
    assert service["Restart"] == ["on-failure"]
    timeout = float(service["TimeoutStopSec"][0])
    ttl = parsed([], {}, monkeypatch)["lease_ttl"]  # the env file may not change it
    worst = handoff_seconds(ttl) + STOP_GRACE
    print(f"TimeoutStopSec {timeout} s > handoff {handoff_seconds(ttl)} + workers "
          f"{STOP_GRACE} (drain {drain_seconds()}) = {worst} s")  # fmt: skip
    assert timeout > worst and STOP_GRACE >= drain_seconds()
    assert "143" in service["SuccessExitStatus"][0].split()
    for hardening in ("NoNewPrivileges", "ProtectSystem", "PrivateTmp", "ProtectHome"):
        assert service[hardening], hardening


def systemd_verify(unit: Path) -> str:
    done = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return f"{done.returncode}\n{done.stdout}{done.stderr}".strip()


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed here (the unit is still parsed above)")
    balancectl = shutil.which("balancectl", path=str(Path(sys.executable).parent))
    assert balancectl is not None
    # verify insists that ExecStart's binary exists: point it at this environment's.
    text = UNIT.read_text().replace("/opt/balancectl/bin/balancectl", balancectl)
    unit = tmp_path / UNIT.name
    unit.write_text(text)
    assert systemd_verify(unit) == "0"
    # verify only warns (status 0) about a bad setting: the check is "nothing printed".
    broken = tmp_path / "broken@.service"
    broken.write_text(text.replace("KillMode=mixed", "KillMode=mixed\nKillMod=mixed"))
    assert "Unknown key" in systemd_verify(broken)
