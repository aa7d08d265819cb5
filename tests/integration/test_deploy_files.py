"""The deployment files agree with the code and with each other.

No Docker engine runs here, so docker-compose.yml, deploy/Dockerfile and the Prometheus, Grafana and
RabbitMQ configs are parsed and checked against the workspace: every environment variable is a setting,
every command runs a module that exists with flags it accepts, every port, host name, mount and scrape
target points at something that listens or exists. The sandbox's compose command is run for real.
`promtool` checks the Prometheus config (`make tools` installs it from Debian's `prometheus` package; a
missing promtool fails the test rather than skipping the check). The dashboards themselves are checked in
test_grafana_dashboards.py.
"""

from __future__ import annotations

import ast
import fnmatch
import importlib
import importlib.util
import re
import shlex
import shutil
import signal
import smtplib
import subprocess
import sys
import time
import tomllib
from email.message import EmailMessage
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import httpx
import pytest
import yaml

from esim_common.settings import Settings
from esim_sandbox.serve import free_port

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict] = COMPOSE["services"]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "esim-fulfilment.json"

# Services built from deploy/Dockerfile: their environment is our Settings.
APP_SERVICES = sorted(name for name, service in SERVICES.items() if "build" in service)
# The five services and their default ports (README, "Services"; each `__main__.py` says the same).
SERVICE_PORTS = {"webhook": 8080, "funding": 8081, "provisioning": 8082, "notify": 8083, "reconcile": 8084}
SETTINGS = {name.upper() for name in Settings.model_fields}
LOCALHOST = {"localhost", "127.0.0.1"}
URL_SCHEMES = {"http", "https", "amqp", "amqps", "postgresql", "postgres"}
DEFAULT_SCHEME_PORTS = {"http": 80, "https": 443, "amqp": 5672, "amqps": 5671, "postgresql": 5432}
SANDBOX_STARTUP_SECONDS = 20


# --------------------------------------------------------------------------- reading the files


def command_of(name: str) -> list[str]:
    command = SERVICES[name].get("command", [])
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def environment_of(name: str) -> dict[str, str]:
    env = SERVICES[name].get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def flags_of(command: list[str]) -> dict[str, str]:
    """`--name=value` / `--name value` → {"--name": "value"}."""
    flags: dict[str, str] = {}
    for index, part in enumerate(command):
        if part.startswith("--"):
            name, _, value = part.partition("=")
            if not value and index + 1 < len(command) and not command[index + 1].startswith("--"):
                value = command[index + 1]
            flags[name] = value
    return flags


def port_mappings(name: str) -> list[tuple[str | None, int | None, int]]:
    """(host ip, published port, container port) of each `ports` entry, short or long syntax."""
    mappings = []
    for entry in SERVICES[name].get("ports", []):
        if isinstance(entry, dict):
            published = entry.get("published")
            mappings.append(
                (entry.get("host_ip"), int(published) if published else None, int(entry["target"]))
            )
            continue
        parts = str(entry).split("/")[0].split(":")
        container = int(parts[-1])
        published = int(parts[-2]) if len(parts) >= 2 else None
        host_ip = parts[-3] if len(parts) == 3 else None
        mappings.append((host_ip, published, container))
    return mappings


def listened_ports(name: str) -> set[int]:
    """The ports a service listens on inside the compose network."""
    ports = {container for _, _, container in port_mappings(name)}
    ports |= {int(str(port).split("/")[0]) for port in SERVICES[name].get("expose", [])}
    if "HTTP_PORT" in environment_of(name):
        ports.add(int(environment_of(name)["HTTP_PORT"]))
    return ports


def published_host_ports() -> set[int]:
    return {published for name in SERVICES for _, published, _ in port_mappings(name) if published}


def mounts_of(name: str) -> list[tuple[str, str]]:
    """(source, target) of each volume entry; the source is a path for a bind mount, else a volume name."""
    mounts = []
    for entry in SERVICES[name].get("volumes", []):
        if isinstance(entry, dict):
            mounts.append((entry["source"], entry["target"]))
        else:
            source, target = str(entry).split(":")[:2]
            mounts.append((source, target))
    return mounts


def is_bind(source: str) -> bool:
    return source.startswith((".", "/"))


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    logical, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") and not current:
            continue
        current += line.rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            if current.strip():
                logical.append(current.strip())
            current = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1]) for text in logical]


def copy_sources() -> list[str]:
    sources = []
    for instruction, arguments in dockerfile_instructions():
        if instruction == "COPY":
            parts = [part for part in arguments.split() if not part.startswith("--")]
            sources.extend(parts[:-1])
    return sources


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def dockerignored(path: str) -> bool:
    """Whether .dockerignore leaves `path` (or a folder it is in) out of the build context."""
    parts = PurePosixPath(path.rstrip("/")).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in dockerignore_patterns():
        bare = pattern.removeprefix("**/")
        for candidate in candidates:
            if fnmatch.fnmatch(candidate, pattern) or (
                pattern.startswith("**/") and fnmatch.fnmatch(candidate.rsplit("/", 1)[-1], bare)
            ):
                return True
    return False


def scrape_jobs() -> list[dict]:
    return yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"]


# --------------------------------------------------------------------------- compose: settings and commands


def test_the_compose_file_runs_every_service_the_sandbox_and_the_infrastructure():
    expected = {*SERVICE_PORTS, "sandbox", "migrate", "rabbitmq", "postgres", "prometheus", "grafana"}
    assert expected <= set(SERVICES)


@pytest.mark.parametrize("name", APP_SERVICES)
def test_every_environment_variable_of_our_image_is_a_setting(name):
    unknown = set(environment_of(name)) - SETTINGS
    assert unknown == set(), f"{name} sets variables that are not fields of Settings"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_every_python_module_command_runs_a_workspace_package_with_a_main(name):
    command = command_of(name)
    if command[:2] != ["python", "-m"]:
        assert command[0] == "esim-migrate", f"{name}: neither `python -m <module>` nor esim-migrate"
        return
    module = command[2]
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin, f"{name}: no module {module} in the workspace"
    assert Path(spec.origin).resolve().is_relative_to(ROOT), f"{module} is not one of ours: {spec.origin}"
    assert importlib.util.find_spec(f"{module}.__main__") is not None, f"{module} has no __main__.py"


def test_the_migrate_command_is_the_console_script_of_the_shared_library():
    assert command_of("migrate")[0] == "esim-migrate"
    scripts = tomllib.loads((ROOT / "libs/common/pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["esim-migrate"] == "esim_common.migrate:main"
    assert (Path(sys.executable).parent / "esim-migrate").exists()


@pytest.mark.parametrize("name", [name for name in APP_SERVICES if flags_of(command_of(name))])
def test_every_flag_of_a_command_is_one_the_program_accepts(name):
    command = command_of(name)
    program = (
        [sys.executable, "-m", command[2]]
        if command[:2] == ["python", "-m"]
        else [str(Path(sys.executable).parent / command[0])]
    )
    usage = subprocess.run([*program, "--help"], capture_output=True, text=True, timeout=30, check=True)
    accepted = set(re.findall(r"--[a-z0-9-]+", usage.stdout))
    assert set(flags_of(command)) - accepted == set()


def test_the_sandbox_command_of_compose_serves_every_emulator_on_all_interfaces(tmp_path):
    """Containers reach the sandbox through its container address: loopback-only would be unreachable.
    127.0.0.2 is a loopback address that a server bound to 127.0.0.1 alone does not answer."""
    ports = {
        "--stripe-port": free_port(),
        "--zendit-port": free_port(),
        "--storage-port": free_port(),
        "--smtp-port": free_port(),
    }
    command = []
    for part in command_of("sandbox"):
        flag = part.partition("=")[0]
        if flag in ports:
            part = f"{flag}={ports[flag]}"
        elif flag == "--mail-dir":
            part = f"--mail-dir={tmp_path / 'mail'}"
        command.append(part)
    assert command[:3] == ["python", "-m", "esim_sandbox"]
    process = subprocess.Popen(
        [sys.executable, *command[1:]], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        lines: list[str] = []
        deadline = time.monotonic() + SANDBOX_STARTUP_SECONDS
        while not any("Ctrl-C" in line for line in lines):
            assert time.monotonic() < deadline and process.poll() is None, "".join(lines)
            lines.append(process.stdout.readline())

        other_loopback = "127.0.0.2"
        health = httpx.get(f"http://{other_loopback}:{ports['--stripe-port']}/_sandbox/health", timeout=5)
        assert health.status_code == 200
        offers = httpx.get(
            f"http://{other_loopback}:{ports['--zendit-port']}/v1/esim/offers",
            params={"_limit": 1, "_offset": 0},
            headers={"Authorization": "Bearer sand_test_key"},
            timeout=5,
        )
        assert offers.status_code == 200
        storage = httpx.get(f"http://{other_loopback}:{ports['--storage-port']}/_sandbox/health", timeout=5)
        assert storage.status_code == 200
        mail = EmailMessage()
        mail["From"], mail["To"], mail["Subject"] = "shop@example.com", "ada@example.com", "compose"
        mail.set_content("hi")
        with smtplib.SMTP(other_loopback, ports["--smtp-port"], timeout=5) as smtp:
            smtp.send_message(mail)
        assert len(list((tmp_path / "mail").glob("*.eml"))) == 1

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_the_sandbox_signs_stripe_events_with_a_secret_the_webhook_accepts():
    secret = flags_of(command_of("sandbox"))["--stripe-webhook-secret"]
    accepted = environment_of("webhook")["STRIPE_WEBHOOK_SECRETS"].split(",")
    assert secret in [item.strip() for item in accepted]
    url = urlsplit(flags_of(command_of("sandbox"))["--stripe-webhook-url"])
    assert url.hostname == "webhook" and url.port in listened_ports("webhook")
    assert url.path == "/api/webhooks/stripe"


# --------------------------------------------------------------------------- compose: ports and wiring


@pytest.mark.parametrize("name", sorted(SERVICE_PORTS))
def test_each_service_listens_on_its_default_port_and_publishes_exactly_that(name):
    port = int(environment_of(name)["HTTP_PORT"])
    assert port == SERVICE_PORTS[name]
    assert environment_of(name)["HTTP_HOST"] == "0.0.0.0"
    assert port_mappings(name) == [("127.0.0.1", port, port)]
    healthcheck = " ".join(SERVICES[name]["healthcheck"]["test"])
    assert f"http://127.0.0.1:{port}/healthz" in healthcheck


@pytest.mark.parametrize("name", sorted(SERVICE_PORTS))
def test_the_compose_port_of_a_service_is_the_default_its_main_module_serves(name):
    """`run(..., default_port=X)` in `<service>/__main__.py`: X is a literal or a module-level name."""
    main = ROOT / "services" / name / name / "__main__.py"
    assert main.exists(), f"{main.relative_to(ROOT)} is missing"
    # Importing is safe: `__main__.py` serves only under `if __name__ == "__main__"` or in main().
    module = importlib.import_module(f"{name}.__main__")
    defaults = [
        keyword.value.value if isinstance(keyword.value, ast.Constant) else getattr(module, keyword.value.id)
        for node in ast.walk(ast.parse(main.read_text()))
        if isinstance(node, ast.Call)
        for keyword in node.keywords
        if keyword.arg == "default_port" and isinstance(keyword.value, ast.Constant | ast.Name)
    ]
    assert defaults == [int(environment_of(name)["HTTP_PORT"])]


def test_the_sandbox_publishes_the_ports_its_command_opens():
    flags = flags_of(command_of("sandbox"))
    opened = {
        int(flags[flag]) for flag in ("--stripe-port", "--zendit-port", "--storage-port", "--smtp-port")
    }
    assert flags["--host"] == "0.0.0.0"
    assert {(host, published, container) for host, published, container in port_mappings("sandbox")} == {
        ("127.0.0.1", port, port) for port in opened
    }


def test_every_published_port_is_bound_to_loopback_only_and_used_once():
    """The stack runs with the sandbox's built-in secrets: nothing of it may face the network."""
    mappings = [mapping for name in SERVICES for mapping in port_mappings(name)]
    assert all(host == "127.0.0.1" for host, _, _ in mappings)
    published = [port for _, port, _ in mappings]
    assert len(published) == len(set(published))


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_dependency_is_a_defined_service_that_can_meet_its_condition(name):
    depends_on = SERVICES[name].get("depends_on", {})
    if isinstance(depends_on, list):
        depends_on = {dependency: {"condition": "service_started"} for dependency in depends_on}
    for dependency, spec in depends_on.items():
        assert dependency in SERVICES, f"{name} depends on an undefined service {dependency}"
        if spec["condition"] == "service_healthy":
            assert "healthcheck" in SERVICES[dependency], f"{dependency} has no healthcheck"
        if spec["condition"] == "service_completed_successfully":
            assert SERVICES[dependency].get("restart", "no") == "no", f"{dependency} is not one-shot"


@pytest.mark.parametrize("name", sorted(SERVICE_PORTS))
def test_a_service_starts_after_the_broker_the_migrated_database_and_the_sandbox(name):
    conditions = {dependency: spec["condition"] for dependency, spec in SERVICES[name]["depends_on"].items()}
    assert conditions == {
        "rabbitmq": "service_healthy",
        "postgres": "service_healthy",
        "migrate": "service_completed_successfully",
        "sandbox": "service_healthy",
    }


@pytest.mark.parametrize("name", APP_SERVICES)
def test_every_url_setting_points_at_a_port_that_listens(name):
    for key, value in environment_of(name).items():
        url = urlsplit(value)
        if url.scheme not in URL_SCHEMES or not url.hostname:
            continue
        port = url.port or DEFAULT_SCHEME_PORTS[url.scheme]
        if url.hostname in LOCALHOST:  # seen from the host (links in emails, redirects): published
            assert port in published_host_ports(), f"{name} {key}: nothing is published on {port}"
        else:
            assert url.hostname in SERVICES, f"{name} {key}: no compose service {url.hostname}"
            assert port in listened_ports(url.hostname), f"{name} {key}: {url.hostname} has no port {port}"


def test_the_database_and_broker_urls_name_the_compose_infrastructure():
    for name in (*SERVICE_PORTS, "migrate"):
        env = environment_of(name)
        assert urlsplit(env["DATABASE_URL"]).hostname == "postgres"
        assert (
            urlsplit(env["DATABASE_URL"]).password == SERVICES["postgres"]["environment"]["POSTGRES_PASSWORD"]
        )
        if name != "migrate":
            assert urlsplit(env["AMQP_URL"]).hostname == "rabbitmq"
            assert env["SMTP_HOST"] == "sandbox" and int(env["SMTP_PORT"]) in listened_ports("sandbox")


# --------------------------------------------------------------------------- compose: volumes and paths


def test_every_bind_mount_source_exists_and_every_named_volume_is_declared():
    declared = set(COMPOSE.get("volumes") or {})
    for name in SERVICES:
        for source, _ in mounts_of(name):
            if is_bind(source):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which is not in the repository"
            else:
                assert source in declared, f"{name} mounts an undeclared volume {source}"


def test_provisioning_and_notify_share_one_volume_at_the_qr_storage_dir():
    volumes = []
    for name in ("provisioning", "notify"):
        qr_dir = environment_of(name)["QR_STORAGE_DIR"]
        [volume] = [source for source, target in mounts_of(name) if target == qr_dir]
        assert not is_bind(volume)
        volumes.append(volume)
    assert volumes[0] == volumes[1]


def test_every_container_path_is_in_the_image_or_on_a_volume():
    """A path under the image's WORKDIR must be something the Dockerfile copies or a mounted volume."""
    workdir = PurePosixPath([args for op, args in dockerfile_instructions() if op == "WORKDIR"][-1])
    copied = [PurePosixPath(source.rstrip("/")) for source in copy_sources()]
    for name in APP_SERVICES:
        values = [*environment_of(name).values(), *flags_of(command_of(name)).values()]
        for value in values:
            path = PurePosixPath(value)
            if not path.is_relative_to(workdir):
                continue
            mounted = any(path.is_relative_to(target) for _, target in mounts_of(name))
            relative = path.relative_to(workdir)
            in_image = any(relative.is_relative_to(source) for source in copied)
            assert mounted or in_image, f"{name}: {value} is neither copied into the image nor mounted"
            if in_image:
                assert (ROOT / relative).exists()


# --------------------------------------------------------------------------- the Dockerfile


def test_the_dockerfile_copies_only_paths_that_exist_and_reach_the_build_context():
    sources = copy_sources()
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        assert not dockerignored(source), f"COPY {source}: excluded by .dockerignore"


def test_the_dockerfile_copies_every_workspace_manifest_before_installing_dependencies():
    instructions = dockerfile_instructions()
    first_sync = next(i for i, (op, args) in enumerate(instructions) if op == "RUN" and "uv sync" in args)
    copied_before = [
        part
        for op, args in instructions[:first_sync]
        if op == "COPY"
        for part in args.split()[:-1]
        if not part.startswith("--")
    ]
    manifests = {str(path.relative_to(ROOT)) for path in ROOT.glob("*/*/pyproject.toml")}
    assert manifests == {"libs/common/pyproject.toml", "libs/sandbox/pyproject.toml"} | {
        f"services/{name}/pyproject.toml" for name in SERVICE_PORTS
    }
    assert manifests | {"pyproject.toml", "uv.lock"} <= set(copied_before)


def test_the_image_is_python_311_slim_with_the_makefiles_uv_and_the_frozen_lock():
    instructions = dockerfile_instructions()
    assert [args for op, args in instructions if op == "FROM"] == ["python:3.11-slim"]
    makefile_uv = re.search(r"^UV_VERSION\s*:=\s*(\S+)", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert f"UV_VERSION={makefile_uv.group(1)}" in [args for op, args in instructions if op == "ARG"]
    runs = [args for op, args in instructions if op == "RUN"]
    assert any("pip install" in run and '"uv==${UV_VERSION}"' in run for run in runs)
    assert any(run.split() == "uv sync --frozen --all-packages --no-dev".split() for run in runs)
    copied = copy_sources()
    assert {"libs/", "services/", "deploy/migrations/"} <= set(copied)


def test_the_image_runs_as_an_unprivileged_user():
    instructions = dockerfile_instructions()
    users = [(i, args) for i, (op, args) in enumerate(instructions) if op == "USER"]
    assert users, "no USER: the processes would run as root"
    last_index, user = users[-1]
    assert user not in {"root", "0"} and not user.startswith(("root:", "0:"))
    assert all(op != "RUN" for op, _ in instructions[last_index:]), "RUN after USER: as the app user"


def test_the_dockerignore_keeps_secrets_and_local_state_out_of_the_image():
    for path in (".env", ".env.production", ".venv/bin/python", ".git/config", "var/mail/x.eml"):
        assert dockerignored(path), path
    assert dockerignored("libs/common/esim_common/__pycache__/x.pyc")


# --------------------------------------------------------------------------- Prometheus and RabbitMQ


def test_prometheus_scrapes_every_service_and_rabbitmq_where_they_listen():
    scraped: dict[str, str] = {}
    for job in scrape_jobs():
        for static in job["static_configs"]:
            for target in static["targets"]:
                host, _, port = target.rpartition(":")
                assert host in SERVICES, f"{job['job_name']}: no compose service {host}"
                assert int(port) in listened_ports(host), f"{job['job_name']}: {host} has no port {port}"
                scraped[host] = job.get("metrics_path", "/metrics")
    assert {name: scraped.get(name) for name in SERVICE_PORTS} == dict.fromkeys(SERVICE_PORTS, "/metrics")
    # The dashboard reads per-queue depth: only /metrics/per-object keeps the `queue` label.
    assert scraped.get("rabbitmq") == "/metrics/per-object"
    mounted = dict((target, source) for source, target in mounts_of("prometheus"))
    assert (ROOT / mounted["/etc/prometheus/prometheus.yml"]).resolve() == PROMETHEUS_CONFIG


def test_the_prometheus_config_is_valid():
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert re.fullmatch(r"\d+[smh]", config["global"]["scrape_interval"])
    names = [job["job_name"] for job in config["scrape_configs"]]
    assert len(names) == len(set(names))
    assert all(job.get("metrics_path", "/").startswith("/") for job in config["scrape_configs"])
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: `make tools` installs it (Debian's prometheus package)"
    checked = subprocess.run([promtool, "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True)
    assert checked.returncode == 0, checked.stdout.decode() + checked.stderr.decode()


def test_rabbitmq_loads_the_management_and_prometheus_plugins_from_the_mounted_file():
    text = (ROOT / "deploy/rabbitmq/enabled_plugins").read_text().strip()
    match = re.fullmatch(r"\[([a-z_,\s]*)\]\.", text)
    assert match, "enabled_plugins must be one Erlang list term ending in a full stop"
    plugins = {plugin.strip() for plugin in match.group(1).split(",")}
    assert {"rabbitmq_management", "rabbitmq_prometheus"} <= plugins
    mounted = dict((target, source) for source, target in mounts_of("rabbitmq"))
    assert mounted["/etc/rabbitmq/enabled_plugins"] == "./deploy/rabbitmq/enabled_plugins"
    assert {5672, 15672, 15692} <= listened_ports("rabbitmq")


# --------------------------------------------------------------------------- Grafana


def grafana_mounts() -> dict[str, Path]:
    return {target: (ROOT / source).resolve() for source, target in mounts_of("grafana") if is_bind(source)}


def test_grafana_provisions_the_compose_prometheus_as_its_datasource():
    mounts = grafana_mounts()
    folder = mounts["/etc/grafana/provisioning/datasources"]
    [datasource] = yaml.safe_load((folder / "prometheus.yml").read_text())["datasources"]
    url = urlsplit(datasource["url"])
    assert datasource["type"] == "prometheus"
    assert url.hostname in SERVICES and url.port in listened_ports(url.hostname)
    assert SERVICES[url.hostname]["image"].startswith("prom/prometheus:")


def test_grafana_loads_dashboards_from_the_folder_compose_mounts():
    mounts = grafana_mounts()
    providers_folder = mounts["/etc/grafana/provisioning/dashboards"]
    providers = [
        provider
        for path in providers_folder.glob("*.yml")
        for provider in yaml.safe_load(path.read_text())["providers"]
    ]
    assert providers
    for provider in providers:
        assert mounts[provider["options"]["path"]] == DASHBOARD.parent.resolve()
    home = environment_of("grafana")["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert mounts[str(PurePosixPath(home).parent)] / PurePosixPath(home).name == DASHBOARD.resolve()
