"""deploy/k8s/ renders into valid Kubernetes objects that agree with the services.

No kustomize or kubectl here: `build()` renders what this kustomization uses (resources, namespace,
images, configMapGenerator with `behavior: merge`, secretGenerator from env files; generated names keep
their base name, without kustomize's hash suffix). secrets.env is not committed, so the production
overlay is rendered with secrets.env.example in its place. Every object is validated offline against
the Kubernetes API schemas (kubernetes-validate, strict: unknown fields are errors).
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml
from pydantic import SecretStr

from esim_common.settings import _SANDBOX_SECRETS, Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAY = K8S / "overlays" / "production"
# The oldest Kubernetes release these manifests are for, and the newest the validator knows.
K8S_VERSIONS = ("1.34.0", "1.37.0")
SERVICE_PORTS = {"webhook": 8080, "funding": 8081, "provisioning": 8082, "notify": 8083, "reconcile": 8084}
# Every service consumes a queue (or, for webhook, takes Stripe's deliveries): none may be a single pod.
MIN_REPLICAS = 2
IMAGE_UID = 10001  # deploy/Dockerfile: useradd --uid 10001 esim
SETTINGS = {name.upper() for name in Settings.model_fields}
SECRET_SETTINGS = {
    name.upper()
    for name, field in Settings.model_fields.items()
    if SecretStr.__name__ in str(field.annotation)  # SecretStr, SecretStr | None, list[SecretStr] | None
    or name in ("amqp_url", "database_url")  # URLs that carry passwords
}
QUANTITY = re.compile(r"\d+(\.\d+)?(m|k|M|G|Ki|Mi|Gi)?")
NAMESPACED = {"Deployment", "Service", "PodDisruptionBudget", "Job", "ConfigMap", "Secret"}


# --------------------------------------------------------------------------- a small kustomize


def read_env_file(path: Path) -> dict[str, str]:
    """kustomize's env-file format: KEY=VALUE lines, `#` comments and blank lines skipped."""
    pairs = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value
    return pairs


def env_source(directory: Path, name: str) -> Path:
    path = directory / name
    if not path.exists() and (directory / f"{name}.example").exists():
        return directory / f"{name}.example"
    assert path.exists(), f"{path.relative_to(ROOT)} is referenced but missing"
    return path


def build(directory: Path) -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    objects: list[dict[str, Any]] = []
    for resource in kustomization.get("resources", []):
        path = (directory / resource).resolve()
        assert path.exists(), f"{directory.relative_to(ROOT)}: resource {resource} does not exist"
        objects += build(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
    for kind, key in (("ConfigMap", "configMapGenerator"), ("Secret", "secretGenerator")):
        for generator in kustomization.get(key, []):
            data: dict[str, str] = {}
            for env in generator.get("envs", []):
                data |= read_env_file(env_source(directory, env))
            existing = [
                o for o in objects if o["kind"] == kind and o["metadata"]["name"] == generator["name"]
            ]
            if generator.get("behavior") == "merge":
                assert existing, f"{generator['name']}: nothing to merge into"
                existing[0]["data"] |= data
            else:
                assert not existing, f"{generator['name']} is generated twice"
                objects.append(
                    {"apiVersion": "v1", "kind": kind, "metadata": {"name": generator["name"]}, "data": data}
                )
    for image in kustomization.get("images", []):
        for container in containers(objects):
            if container["image"] == image["name"]:
                container["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    if "namespace" in kustomization:
        for obj in objects:
            if obj["kind"] in NAMESPACED:
                obj["metadata"]["namespace"] = kustomization["namespace"]
    return objects


def containers(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c for o in objects if o["kind"] in ("Deployment", "Job") for c in pod_spec(o)["containers"]]


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["template"]["spec"]


PRODUCTION = build(OVERLAY)
BY_KIND: dict[str, dict[str, dict[str, Any]]] = {}
for _obj in PRODUCTION:
    BY_KIND.setdefault(_obj["kind"], {})[_obj["metadata"]["name"]] = _obj
DEPLOYMENTS = BY_KIND["Deployment"]
CONFIG = BY_KIND["ConfigMap"]["esim-config"]["data"]
SECRETS = BY_KIND["Secret"]["esim-secrets"]["data"]


async def status_of(service: str, path: str) -> int:
    """GET `path` on the service's real app, built as its __main__ does but not started (no broker, no
    database): a route that exists answers (503 while dependencies are down), a missing one is 404."""
    main = importlib.import_module(f"{service}.main")
    app = main.create_app(Settings(_env_file=None))  # type: ignore[call-arg]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://pod") as client:
        return (await client.get(path)).status_code


# --------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_rendered_object_is_valid_for_the_stated_kubernetes_versions(version):
    assert len(PRODUCTION) >= 1 + 1 + 3 * len(SERVICE_PORTS)  # namespace, job, 3 per service
    for obj in PRODUCTION:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} on {version}: {exc.message} at {exc.path}")


def test_every_committed_manifest_file_is_used_by_a_kustomization():
    used = set()
    for kustomization in K8S.rglob("kustomization.yaml"):
        resources = yaml.safe_load(kustomization.read_text()).get("resources", [])
        used |= {(kustomization.parent / r).resolve() for r in resources}
    manifests = {p.resolve() for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml"}
    assert manifests - used == set()


def test_there_is_one_deployment_per_service_running_it_on_its_port():
    assert set(DEPLOYMENTS) == set(SERVICE_PORTS)
    for name, deployment in DEPLOYMENTS.items():
        [container] = pod_spec(deployment)["containers"]
        assert container["command"] == ["python", "-m", name]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"http": SERVICE_PORTS[name]}
        assert {"name": "HTTP_PORT", "value": str(SERVICE_PORTS[name])} in container["env"]
        assert CONFIG["HTTP_HOST"] == "0.0.0.0"  # a pod is reached on its pod IP, not loopback
        assert container["image"].startswith("registry.example.com/esim-fulfillment:")


@pytest.mark.parametrize("name", sorted(SERVICE_PORTS))
async def test_every_probe_asks_a_path_the_service_serves_on_its_port(name):
    [container] = pod_spec(DEPLOYMENTS[name])["containers"]
    kinds = ("startupProbe", "readinessProbe", "livenessProbe")
    probes = {kind: container[kind]["httpGet"] for kind in kinds}
    for kind, probe in probes.items():
        status = await status_of(name, probe["path"])
        assert status != 404, f"{name} {kind}: {probe['path']} is not a route of the service"
        assert probe["port"] in ("http", SERVICE_PORTS[name])
    # Not started: readiness reports the missing broker and database, liveness does not care.
    assert await status_of(name, probes["readinessProbe"]["path"]) == 503
    assert await status_of(name, probes["livenessProbe"]["path"]) == 200
    # Liveness must not depend on RabbitMQ or Postgres (an outage would restart every replica);
    # readiness must (a pod that cannot publish should get no traffic).
    assert probes["livenessProbe"]["path"] == "/livez"
    assert probes["readinessProbe"]["path"] == ("/readyz" if name == "webhook" else "/healthz")


@pytest.mark.parametrize("name", sorted(SERVICE_PORTS))
def test_every_deployment_is_replicated_bounded_unprivileged_and_protected_from_drains(name):
    deployment = DEPLOYMENTS[name]
    assert deployment["spec"]["replicas"] >= MIN_REPLICAS
    spec = pod_spec(deployment)
    [container] = spec["containers"]
    for bound in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][bound]), f"{name}: {bound}"
        for quantity in container["resources"][bound].values():  # the schema takes any string
            assert QUANTITY.fullmatch(str(quantity)), f"{name}: {bound} {quantity!r} is not a quantity"
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == IMAGE_UID
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    labels = deployment["spec"]["selector"]["matchLabels"]
    assert labels.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    budget = BY_KIND["PodDisruptionBudget"][name]
    assert budget["spec"]["selector"]["matchLabels"] == labels
    assert budget["spec"]["minAvailable"] < deployment["spec"]["replicas"], "a drain could never proceed"
    service = BY_KIND["Service"][name]
    assert service["spec"]["selector"] == labels
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(SERVICE_PORTS[name], "http")]


def test_the_migration_job_runs_the_migrate_command_with_the_same_configuration():
    job = BY_KIND["Job"]["esim-migrate"]
    [container] = pod_spec(job)["containers"]
    assert container["command"][0] == "esim-migrate"
    assert pod_spec(job)["restartPolicy"] == "Never"
    assert {"name": "MIGRATIONS_DIR", "value": "/app/deploy/migrations"} in container["env"]
    assert (ROOT / "deploy" / "migrations").is_dir()


def test_every_pod_reads_the_configmap_and_the_secret_that_the_overlay_generates():
    for container in containers(PRODUCTION):
        sources = container["envFrom"]
        assert {"configMapRef": {"name": "esim-config"}} in sources
        assert {"secretRef": {"name": "esim-secrets"}} in sources


def test_every_variable_is_a_setting_and_secrets_are_only_in_the_secret():
    names = set(CONFIG) | set(SECRETS)
    names |= {env["name"] for container in containers(PRODUCTION) for env in container.get("env", [])}
    assert names - SETTINGS == set()
    assert set(CONFIG) & SECRET_SETTINGS == set(), "a secret setting in the ConfigMap"
    assert set(SECRETS) <= SECRET_SETTINGS


def test_every_secret_the_sandbox_defaults_is_supplied_and_production_settings_start():
    """Settings refuse the sandbox's built-in secrets outside ENVIRONMENT=sandbox: each must come from
    the Secret. With the example's blanks filled in, the rendered configuration is a valid Settings."""
    defaults = Settings(_env_file=None)  # type: ignore[call-arg]
    sandboxed = {
        name.split("[")[0].upper()
        for name, value in defaults.secret_values().items()
        if value in _SANDBOX_SECRETS
    }
    assert sandboxed <= set(SECRETS)
    assert CONFIG["ENVIRONMENT"] != "sandbox"
    filled = {key: f"{key.lower()}-0123456789abcdef" for key in SECRETS}
    filled |= {
        "AMQP_URL": "amqps://esim:pw-0123456789@rabbitmq.esim.svc:5671/",
        "DATABASE_URL": "postgresql://postgres:pw-0123456789@db.example.supabase.co:6543/postgres",
        "STRIPE_WEBHOOK_SECRETS": "whsec_0123456789abcdef,whsec_fedcba9876543210",
        "STRIPE_ISSUING_WEBHOOK_SECRETS": "whsec_issuing_0123456789",
    }
    settings = Settings(_env_file=None, **{k.lower(): v for k, v in (CONFIG | filled).items()})  # type: ignore[call-arg]
    assert settings.environment == "production"
    assert len(settings.stripe_webhook_secrets) == 2


def test_no_secret_value_is_committed_and_the_real_file_is_ignored():
    example = OVERLAY / "secrets.env.example"
    assert all(value == "" for value in read_env_file(example).values()), "the example must hold no values"
    ignored = (OVERLAY / ".gitignore").read_text().split()
    assert "secrets.env" in ignored
    for path in K8S.rglob("*"):
        if path.is_file() and path.name != "secrets.env":
            text = path.read_text()
            assert not re.search(r"\b(sk|rk)_(live|test)_[A-Za-z0-9]{8,}", text), path
            assert not re.search(r"whsec_[A-Za-z0-9]{8,}", text), path
            # A URL with a password; `<user>:<password>` placeholders are fine.
            assert not re.search(r"://(?!<)[^/\s:@]+:(?!<)[^@\s]+@", text), f"{path}: a URL with a password"
    assert "Secret" not in {
        doc["kind"] for p in K8S.rglob("*.yaml") for doc in yaml.safe_load_all(p.read_text()) if doc
    }
