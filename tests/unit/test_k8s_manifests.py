"""deploy/k8s/ renders into valid Kubernetes objects that agree with the services.

The production overlay is rendered by real kustomize (`kubectl kustomize`, offline) on a temporary copy
of deploy/k8s whose secrets.env is filled in from the example, as a user's would be. Without kubectl,
`build()` renders it instead: a small kustomize that mirrors what this kustomization uses (resources,
namespace per kustomization level, images, configMapGenerator with `behavior: merge`, secretGenerator,
content-hash name suffixes and the rewriting of references to them only within one namespace), and a
test proves that it agrees with kubectl where kubectl is present. Every object is validated offline
against the Kubernetes API schemas (kubernetes-validate, strict: unknown fields are errors).
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml
from pydantic import SecretStr

from esim_common.settings import _SANDBOX_SECRETS, FundingMode, Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAY = K8S / "overlays" / "production"
KUBECTL = shutil.which("kubectl")
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
WORKLOADS = ("Deployment", "Job")
GENERATED = {"esim-config": "ConfigMap", "esim-secrets": "Secret"}
# Where a pod names a ConfigMap or Secret in `envFrom` entries and `env[].valueFrom`.
REFERENCE_KEYS = {
    "configMapRef": "ConfigMap",
    "secretRef": "Secret",
    "configMapKeyRef": "ConfigMap",
    "secretKeyRef": "Secret",
}
# What a user writes into secrets.env: strong values in the shapes the settings expect.
SPECIAL_SECRETS = {
    "AMQP_URL": "amqps://esim:pw-0123456789@rabbitmq.esim.svc:5671/",
    "DATABASE_URL": "postgresql://postgres:pw-0123456789@db.example.supabase.co:6543/postgres",
    "STRIPE_WEBHOOK_SECRETS": "whsec_0123456789abcdef,whsec_fedcba9876543210",
    "STRIPE_ISSUING_WEBHOOK_SECRETS": "whsec_issuing_0123456789",
}


def read_env_file(path: Path) -> dict[str, str]:
    """kustomize's env-file format: KEY=VALUE lines, `#` comments and blank lines skipped."""
    pairs = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value
    return pairs


def filled_secrets() -> dict[str, str]:
    example = read_env_file(OVERLAY / "secrets.env.example")
    return {key: SPECIAL_SECRETS.get(key, f"{key.lower()}-0123456789abcdef") for key in example}


# --------------------------------------------------------------------------- rendering


def kubectl_kustomize(directory: Path) -> list[dict[str, Any]]:
    assert KUBECTL is not None
    done = subprocess.run(
        [KUBECTL, "kustomize", str(directory)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, f"kubectl kustomize {directory.name}: {done.stderr}"
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def kustomize_hash(obj: dict[str, Any]) -> str:
    """kustomize's name suffix (api/hasher): sha256 of Go's JSON of kind, data (and type), 10 characters
    with 0,1,3,a,e swapped out. Its lookup of `metadata/name` never finds the name, so it hashes ""."""
    encoded: dict[str, Any] = {"kind": obj["kind"], "name": "", "data": obj.get("data") or ""}
    if obj["kind"] == "Secret":
        encoded["type"] = obj.get("type", "")
    text = json.dumps(encoded, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")  # Go escapes
    return hashlib.sha256(text.encode()).hexdigest()[:10].translate(str.maketrans("013ae", "ghkmt"))


def kyaml_base64(value: str) -> str:
    """Secret data as kustomize writes it (kyaml's encodeBase64): 70-character lines, each ending in a
    newline, once the encoding is that long; the hash is taken over exactly this text."""
    encoded = base64.b64encode(value.encode()).decode()
    if len(encoded) < 70:
        return encoded
    return "".join(f"{encoded[i : i + 70]}\n" for i in range(0, len(encoded), 70))


def _build(directory: Path) -> list[dict[str, Any]]:
    """One kustomization level: its resources (and bases), generators, images, then its namespace."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    objects: list[dict[str, Any]] = []
    for resource in kustomization.get("resources", []):
        path = (directory / resource).resolve()
        assert path.exists(), f"{directory}: resource {resource} does not exist"
        objects += _build(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
    for kind, key in (("ConfigMap", "configMapGenerator"), ("Secret", "secretGenerator")):
        for generator in kustomization.get(key, []):
            data: dict[str, str] = {}
            for env in generator.get("envs", []):
                data |= read_env_file(directory / env)
            if kind == "Secret":
                data = {k: kyaml_base64(v) for k, v in data.items()}
            existing = [
                o for o in objects if o["kind"] == kind and o["metadata"]["name"] == generator["name"]
            ]
            if generator.get("behavior") == "merge":
                assert existing, f"{generator['name']}: nothing to merge into"
                existing[0]["data"] |= data
            else:
                assert not existing, f"{generator['name']} is generated twice"
                generated = {"apiVersion": "v1", "kind": kind, "metadata": {"name": generator["name"]}}
                objects.append(generated | {"data": data} | ({"type": "Opaque"} if kind == "Secret" else {}))
    for image in kustomization.get("images", []):
        for container in containers(objects):
            if container["image"] == image["name"]:
                container["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    if "namespace" in kustomization:
        for obj in objects:
            if obj["kind"] in NAMESPACED:
                obj["metadata"]["namespace"] = kustomization["namespace"]
    return objects


def build(directory: Path) -> list[dict[str, Any]]:
    """Render like kustomize: generated names get their content hash, and a reference is rewritten only
    where the generated object is in the referring workload's namespace (elsewhere it is left dangling)."""
    objects = _build(directory)
    renamed: dict[tuple[str, str | None, str], str] = {}
    for obj in objects:
        if GENERATED.get(obj["metadata"]["name"]) == obj["kind"]:
            new_name = f"{obj['metadata']['name']}-{kustomize_hash(obj)}"
            renamed[(obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"])] = new_name
            obj["metadata"]["name"] = new_name
    for obj in objects:
        for kind, ref in references(obj):
            ref["name"] = renamed.get((kind, obj["metadata"].get("namespace"), ref["name"]), ref["name"])
    return objects


def render_production(renderer: Callable[[Path], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The production overlay as a user renders it: on a copy whose secrets.env is filled in."""
    with tempfile.TemporaryDirectory() as tmp:
        copied = Path(tmp) / "k8s"
        shutil.copytree(K8S, copied, ignore=shutil.ignore_patterns("secrets.env"))
        overlay = copied / OVERLAY.relative_to(K8S)
        overlay.joinpath("secrets.env").write_text("".join(f"{k}={v}\n" for k, v in filled_secrets().items()))
        return renderer(overlay)


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["template"]["spec"]


def containers(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every container and init container of every workload."""
    return [
        c
        for o in objects
        if o["kind"] in WORKLOADS
        for c in pod_spec(o)["containers"] + pod_spec(o).get("initContainers", [])
    ]


def references(obj: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(kind, the {"name": ...} mapping) of every ConfigMap and Secret a workload's pods read."""
    if obj["kind"] not in WORKLOADS:
        return []
    found = []
    for container in containers([obj]):
        sources = container.get("envFrom", []) + [
            e["valueFrom"] for e in container.get("env", []) if "valueFrom" in e
        ]
        found += [
            (kind, source[key]) for source in sources for key, kind in REFERENCE_KEYS.items() if key in source
        ]
    for volume in pod_spec(obj).get("volumes", []):
        found += [("ConfigMap", volume["configMap"])] if "configMap" in volume else []
        found += [("Secret", {"name": volume["secret"]["secretName"]})] if "secret" in volume else []
    return found


def index(objects: list[dict[str, Any]]) -> dict[tuple[str, str | None, str], dict[str, Any]]:
    return {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o for o in objects}


def generated(objects: list[dict[str, Any]], base_name: str) -> dict[str, Any]:
    [obj] = [
        o
        for o in objects
        if o["kind"] == GENERATED[base_name] and o["metadata"]["name"].startswith(f"{base_name}-")
    ]
    return obj


PRODUCTION = render_production(kubectl_kustomize if KUBECTL else build)
BY_KIND: dict[str, dict[str, dict[str, Any]]] = {}
for _obj in PRODUCTION:
    BY_KIND.setdefault(_obj["kind"], {})[_obj["metadata"]["name"]] = _obj
DEPLOYMENTS = BY_KIND["Deployment"]
CONFIG = generated(PRODUCTION, "esim-config")["data"]
SECRETS = {k: base64.b64decode(v).decode() for k, v in generated(PRODUCTION, "esim-secrets")["data"].items()}


async def status_of(service: str, path: str) -> int:
    """GET `path` on the service's real app, built as its __main__ does but not started (no broker, no
    database): a route that exists answers (503 while dependencies are down), a missing one is 404."""
    main = importlib.import_module(f"{service}.main")
    app = main.create_app(Settings(_env_file=None))  # type: ignore[call-arg]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://pod") as client:
        return (await client.get(path)).status_code


# --------------------------------------------------------------------------- the tests


def test_the_python_renderer_renders_what_kustomize_does():
    """Without kubectl the suite runs on build(); it must name, place and wire objects as kustomize."""
    # kustomize's own test vectors (api/hasher/hasher_test.go), which hold whether or not kubectl is here.
    assert kustomize_hash({"kind": "ConfigMap"}) == "6ct58987ht"
    assert kustomize_hash({"kind": "ConfigMap", "data": {"one": ""}}) == "9g67k2htb6"
    assert kustomize_hash({"kind": "Secret", "type": "my-type", "data": {"one": ""}}) == "74bd68bm66"
    if KUBECTL:  # CI has it: the whole render, object by object
        assert index(render_production(build)) == index(render_production(kubectl_kustomize))


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
    assert container["command"] == ["esim-migrate"]
    assert pod_spec(job)["restartPolicy"] == "Never"
    assert {"name": "MIGRATIONS_DIR", "value": "/app/deploy/migrations"} in container["env"]
    assert (ROOT / "deploy" / "migrations").is_dir()


@pytest.mark.parametrize("name", sorted(SERVICE_PORTS))
def test_every_new_pod_waits_for_the_schema_the_job_migrates_before_it_starts(name):
    """One `kubectl apply -k` starts the Job and the new pods together: the pods must not run first."""
    [job_container] = pod_spec(BY_KIND["Job"]["esim-migrate"])["containers"]
    spec = pod_spec(DEPLOYMENTS[name])
    [service] = spec["containers"]
    [init] = spec.get("initContainers", [])
    command, mode, seconds = init["command"]
    assert (command, mode) == ("esim-migrate", "--wait") and float(seconds) > 0  # read-only: no DDL here
    assert init["image"] == job_container["image"] == service["image"]  # the migrations of this release
    assert init["envFrom"] == job_container["envFrom"] == service["envFrom"]  # the same database
    assert init["env"] == job_container["env"]  # the same MIGRATIONS_DIR
    assert init["securityContext"] == service["securityContext"]
    assert {"cpu", "memory"} <= set(init["resources"]["limits"])


def test_every_configmap_and_secret_a_pod_reads_is_rendered_in_its_namespace_with_its_hash():
    """kustomize renames generated objects (`esim-secrets-<hash>`) and rewrites references to them, but
    only within one namespace: a reference it could not resolve stays `esim-secrets` and the pod never
    starts. So every reference must name a rendered object in the workload's own namespace."""
    rendered = index(PRODUCTION)
    workloads = [o for o in PRODUCTION if o["kind"] in WORKLOADS]
    assert len(workloads) == len(SERVICE_PORTS) + 1
    for workload in workloads:
        namespace = workload["metadata"].get("namespace")
        assert namespace == "esim"
        refs = references(workload)
        assert {kind for kind, _ in refs} == {"ConfigMap", "Secret"}
        for kind, ref in refs:
            where = f"{workload['kind']}/{workload['metadata']['name']} reads {kind} {ref['name']}"
            assert (kind, namespace, ref["name"]) in rendered, f"{where}: not rendered in {namespace}"
            base_name, _, suffix = ref["name"].rpartition("-")
            assert GENERATED.get(base_name) == kind and suffix == kustomize_hash(
                rendered[(kind, namespace, ref["name"])]
            ), f"{where}: not the generated, content-hashed name"


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
    settings = production_settings()
    assert settings.environment == "production"
    assert len(settings.stripe_webhook_secrets) == 2


def production_settings() -> Settings:
    """What every pod loads: the rendered ConfigMap and Secret (the container `env` adds only ports)."""
    return Settings(_env_file=None, **{k.lower(): v for k, v in (CONFIG | SECRETS).items()})  # type: ignore[call-arg]


def test_production_funds_the_wallet_the_way_that_works_with_real_zendit():
    """Real Zendit has no top-up API: issuing_card would push every short order into a top-up gateway
    that does not exist. Prefunded (an operator tops up, orders wait) is what works."""
    settings = production_settings()
    assert settings.effective_funding_mode is FundingMode.PREFUNDED
    assert settings.zendit_api_base == "https://api.zendit.io/v1"
    assert settings.stripe_api_base == "https://api.stripe.com"


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
