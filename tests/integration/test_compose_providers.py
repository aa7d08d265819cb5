"""docker-compose.providers.yml turns the sandbox stack into one that talks to the real providers.

No Docker here, so the two files are merged the way Compose does (mappings merge key by key, sequences
append, `command`/`entrypoint`/`healthcheck.test` are replaced) and the ${...} are interpolated from
.env.example with its blanks filled in, as a user's .env would be. Then, for every service: nothing
points at the sandbox any more, it does not wait for it, and the environment it would get (`environment`
wins over `env_file`) is a valid production Settings.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from pydantic import SecretStr

from esim_common.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
BASE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
OVERRIDE_TEXT = (ROOT / "docker-compose.providers.yml").read_text()
OVERRIDE = yaml.safe_load(OVERRIDE_TEXT)
EXAMPLE = ROOT / ".env.example"
SERVICES = ("webhook", "funding", "provisioning", "notify", "reconcile")
SETTINGS = {name.upper() for name in Settings.model_fields}
SECRET_SETTINGS = {
    name.upper() for name, f in Settings.model_fields.items() if "SecretStr" in str(f.annotation)
}
REPLACED = {"command", "entrypoint"}
INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def merge(base: Any, override: Any, key: str = "") -> Any:
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for name, value in override.items():
            merged[name] = merge(base[name], value, name) if name in base else value
        return merged
    if isinstance(base, list) and isinstance(override, list) and key not in REPLACED | {"test"}:
        return base + override
    return override


def read_env_file(path: Path) -> dict[str, str]:
    pairs = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            pairs[name.strip()] = value
    return pairs


def filled_example() -> dict[str, str]:
    """The example with every blank filled as a user would: strong, non-sandbox values."""
    env = read_env_file(EXAMPLE)
    return {k: v or f"{k.lower()}-0123456789abcdef" for k, v in env.items()}


def interpolate(value: str, env: dict[str, str]) -> str:
    def one(match: re.Match[str]) -> str:
        name, op, arg = match["name"], match["op"], match["arg"]
        found = env.get(name, "")
        if op in (":-", "-") and not found:
            return arg
        if op in (":?", "?") and not found:
            raise AssertionError(f"compose would stop: {arg}")
        return found

    return INTERPOLATION.sub(one, value)


def effective_environment(service: dict[str, Any], dotenv: dict[str, str]) -> dict[str, str]:
    """What the container gets: env_file entries, then `environment` on top."""
    env: dict[str, str] = {}
    for entry in service.get("env_file", []):
        path = entry["path"] if isinstance(entry, dict) else entry
        assert path == ".env", f"unexpected env_file {path}"
        env |= dotenv
    env |= {k: interpolate(str(v), dotenv) for k, v in service.get("environment", {}).items()}
    return env


MERGED = merge(BASE, OVERRIDE)


def test_every_interpolated_variable_is_a_setting_and_every_required_one_is_in_the_example():
    used = {m["name"]: m["op"] for m in INTERPOLATION.finditer(OVERRIDE_TEXT)}
    assert used and set(used) <= SETTINGS
    required = {name for name, op in used.items() if op and op.endswith("?")}
    assert required <= set(read_env_file(EXAMPLE))


def test_the_example_names_only_settings_and_holds_no_secret_value():
    example = read_env_file(EXAMPLE)
    assert set(example) <= SETTINGS
    assert {k: v for k, v in example.items() if k in SECRET_SETTINGS and v} == {}
    assert ".env" in (ROOT / ".gitignore").read_text().split()


def test_the_sandbox_is_not_started_and_no_service_waits_for_it():
    assert MERGED["services"]["sandbox"].get("profiles"), "the sandbox would still start"
    for name, service in MERGED["services"].items():
        dependency = service.get("depends_on", {}).get("sandbox")
        if dependency is not None:
            assert dependency.get("required") is False, f"{name} would refuse to start without the sandbox"


def test_no_service_points_at_the_sandbox_any_more():
    dotenv = filled_example()
    for name in SERVICES:
        env = effective_environment(MERGED["services"][name], dotenv)
        for key, value in env.items():
            host = urlsplit(value).hostname if "://" in value else value
            assert host != "sandbox", f"{name}: {key} still points at the sandbox"


def test_every_service_gets_a_valid_production_configuration():
    dotenv = filled_example()
    for name in SERVICES:
        env = effective_environment(MERGED["services"][name], dotenv)
        settings = Settings(_env_file=None, **{k.lower(): v for k, v in env.items()})  # type: ignore[call-arg]
        assert settings.environment == "production"
        assert settings.stripe_api_base == "https://api.stripe.com"
        # The infrastructure of docker-compose.yml stays: a .env made for `make run` cannot redirect it.
        assert urlsplit(settings.database_url).hostname == "postgres"
        assert urlsplit(settings.amqp_url).hostname == "rabbitmq"
        assert isinstance(settings.stripe_api_key, SecretStr)


def test_a_dotenv_written_for_make_run_cannot_move_the_infrastructure():
    dotenv = filled_example() | {"DATABASE_URL": "postgresql://me@127.0.0.1/esim", "HTTP_PORT": "9999"}
    env = effective_environment(MERGED["services"]["funding"], dotenv)
    assert urlsplit(env["DATABASE_URL"]).hostname == "postgres" and env["HTTP_PORT"] == "8081"
