"""Offline checks of the Helm chart, the Dockerfile and the Grafana dashboard.

The chart is linted and rendered by Helm's own Go code (the `helm_python` package bundles it), every
rendered manifest is validated against the Kubernetes 1.33 OpenAPI schemas by `kubernetes-validate`,
and the Dockerfile is linted by hadolint. No cluster, no Docker engine and no network are needed.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import helm_python
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART_DIR = REPO / "helm" / "openrouter-proxy"
DOCKERFILE = REPO / "Dockerfile"
DASHBOARD = CHART_DIR / "dashboards" / "openrouter-proxy.json"
# The venv's console scripts sit next to its interpreter, even when the venv is not activated.
BIN = Path(sys.executable).parent
KUBE_VERSION = "1.33.0"

RELEASE = "orp"
NAMESPACE = "ai"
PROXY = "openrouter-proxy"
ADMIN_PORT = 9090
HTTP_PORT = 8080

METRIC_FAMILIES = {
    "openrouter_requests_total",
    "openrouter_request_latency_seconds",
    "openrouter_time_to_first_byte_seconds",
    "openrouter_tokens_total",
    "openrouter_cost_usd_total",
    "openrouter_active_requests",
    "openrouter_fallbacks_total",
    "openrouter_cache_requests_total",
    "openrouter_config_reloads_total",
    "openrouter_upstream_attempts_total",
    "openrouter_proxy_overhead_seconds",
    "openrouter_upstream_key_up",
    "openrouter_model_cooldown",
    "openrouter_redis_up",
    "openrouter_redis_errors_total",
    "openrouter_cache_tier2_writes_dropped_total",
    "openrouter_budget_spent_usd",
    "openrouter_batch_lines_total",
    "openrouter_batch_queue_depth",
    "openrouter_batches",
    "openrouter_otel_spans_dropped_total",
}

APP = {"image": {"repository": "registry.example.com/shop/api", "tag": "1.4.2"},
       "ports": [{"name": "http", "containerPort": 8000}]}

ROUTES = [
    {
        "name": "fast",
        "match": {"model": "fast", "headers": {"x-team": "search"}},
        "model": "openai/gpt-4o-mini",
        "fallbacks": ["anthropic/claude-3.5-haiku"],
        "cache_ttl": "10m",
        "set_headers": {"X-Title": "fast-lane"},
        "remove_headers": ["x-team"],
    },
    {"name": "everything-else", "match": {"model": "openai/*"}},
]

# OpenRouter with a key pool, Anthropic and OpenAI directly, and an in-cluster vLLM as the last
# fallback.
UPSTREAMS = {
    "anthropic": {"base_url": "https://api.anthropic.com/v1"},
    "openai": {"base_url": "https://api.openai.com/v1", "first_byte_timeout": "30s"},
    "local": {"endpoints": ["http://vllm-0.vllm:8000/v1", "http://vllm-1.vllm:8000/v1"], "auth": "none"},
}

UPSTREAM_ROUTES = [
    {
        "name": "smart",
        "match": {"model": "smart"},
        "model": "anthropic/claude-sonnet-4",
        "fallbacks": ["openai/gpt-4o", {"upstream": "local", "model": "llama-3.1-8b-instruct"}],
        "set_body": {"provider": {"data_collection": "deny", "zdr": True}},
        "default_body": {"max_tokens": 1024},
        "unset_body": ["logit_bias"],
    },
    {"name": "claude", "match": {"model": "claude"}, "upstream": "anthropic",
     "model": "claude-sonnet-4-20250514", "fallbacks": [{"upstream": "openai", "model": "gpt-4o"}]},
]

VALUE_SETS: dict[str, dict] = {
    "default": {},
    "api-key": {"apiKey": "sk-or-test"},
    "sidecar": {"apiKey": "sk-or-test", "app": APP, "sidecar": {"native": False}},
    "native-sidecar": {"apiKey": "sk-or-test", "app": APP, "sidecar": {"native": True}},
    "autoscaling-pdb": {
        "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 6,
                        "targetMemoryUtilizationPercentage": 80},
        "podDisruptionBudget": {"enabled": True, "maxUnavailable": 1},
    },
    "existing-secret": {"existingSecret": "openrouter", "existingSecretKey": "token"},
    "existing-secret-env": {"existingSecret": "openrouter", "existingSecretKey": "token",
                            "apiKeySource": "env"},
    "monitoring": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
                   "dashboard": {"enabled": True, "annotations": {"grafana_folder": "LLM"}}},
    "routes": {
        "apiKey": "sk-or-test",
        "config": {
            "upstream": {"headers": {"HTTP-Referer": "https://example.com", "X-Title": "example-app"}},
            "routes": ROUTES,
        },
    },
    "embedded": {"workload": {"enabled": False}, "apiKey": "sk-or-test"},
    "several-upstreams": {
        "existingSecret": "openrouter-keys",
        "keyPool": [{"name": "team-a", "secretKey": "key-a", "weight": 2},
                    {"name": "team-b", "secretKey": "key-b"}],
        "upstreamSecrets": {
            "anthropic": {"apiKeys": {"api-key": "sk-ant-test"}},
            "openai": {"existingSecret": "openai-keys",
                       "keys": [{"name": "a", "secretKey": "k1"}, {"name": "b", "secretKey": "k2", "weight": 3}]},
        },
        "config": {"upstreams": UPSTREAMS, "routes": UPSTREAM_ROUTES},
    },
    "batch-standalone": {
        "replicaCount": 1,
        "batch": {"enabled": True, "persistence": {"enabled": True, "size": "20Gi", "storageClass": "fast-ssd"}},
        "config": {"batch": {"concurrency": 16, "retention": "3d", "retry_base": "1s"}},
    },
    "batch-sidecar": {"apiKey": "sk-or-test", "app": APP, "batch": {"enabled": True, "emptyDir": {"sizeLimit": "2Gi"}}},
    "created-key-pool": {
        "apiKeys": {"key-a": "sk-or-a", "key-b": "sk-or-b"},
        "keyPool": [{"name": "a", "secretKey": "key-a"}, {"name": "b", "secretKey": "key-b"}],
        "config": {"upstream": {"endpoints": ["https://or-eu.example.com/api/v1", "https://or-us.example.com/api/v1"]}},
    },
}

# Traces to a collector, with the export knobs of config.otel and the pod named on every span.
VALUE_SETS["traced"] = {
    "apiKey": "sk-or-test",
    "otel": {"enabled": True, "endpoint": "http://otel-collector.observability:4318",
             "sampleRatio": 0.25, "serviceName": "gateway",
             "resourceAttributes": {"deployment.environment.name": "production"}},
    "config": {"otel": {"export_timeout": "2s", "max_queue_size": 4096}},
}


# ---------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(scope="session")
def chart():
    with helm_python.Chart.load(CHART_DIR) as loaded:
        yield loaded


def render_raw(chart, values: dict) -> dict[str, str]:
    return chart.render(values, name=RELEASE, namespace=NAMESPACE)


def render(chart, values: dict) -> list[dict]:
    """Every Kubernetes object the chart renders for `values`."""
    docs = []
    for path, text in sorted(render_raw(chart, values).items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[dict], kind: str) -> dict:
    found = find(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def pod_spec(docs: list[dict]) -> dict:
    return one(docs, "Deployment")["spec"]["template"]["spec"]


def proxy_container(spec: dict) -> dict:
    found = [c for c in spec.get("containers", []) + spec.get("initContainers", []) if c["name"] == PROXY]
    assert len(found) == 1
    return found[0]


def proxy_toml_text(docs: list[dict]) -> str:
    configmaps = [d for d in find(docs, "ConfigMap") if "proxy.toml" in d.get("data", {})]
    assert len(configmaps) == 1
    return configmaps[0]["data"]["proxy.toml"]


def proxy_toml(docs: list[dict]) -> dict:
    return tomllib.loads(proxy_toml_text(docs))


def seconds(duration: str) -> float:
    total = 0.0
    for number, unit in re.findall(r"([0-9]+)(ms|h|m|s)", duration):
        total += int(number) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    return total


def walk(node, key: str):
    """Every value stored under `key` anywhere in a nested document."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from walk(v, key)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item, key)


# ---------------------------------------------------------------------------------------------
# lint, render, validate


def test_helm_bundles_its_library():
    # The Go library ships inside the wheel, so rendering works without a helm binary or network.
    assert Path(helm_python.library_path).is_file()
    assert helm_python.helm_sdk_version().startswith("v")


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_lint_is_clean(name):
    report = helm_python.lint(CHART_DIR, VALUE_SETS[name], strict=True, kube_version=f"v{KUBE_VERSION}")
    assert not report["errors"], report
    # Severity 2 is a warning, 3 an error; only informational notes (such as "icon is recommended") pass.
    assert all(m["severity"] < 2 for m in report["messages"]), report
    assert report["total_charts_linted"] == 1


def tool(name: str) -> str:
    found = BIN / name
    return str(found) if found.exists() else (shutil.which(name) or name)


def kubernetes_validate(rendered: dict[str, str], directory: Path) -> None:
    files = []
    for path, text in rendered.items():
        if path.endswith(".yaml") and text.strip():
            target = directory / path.replace("/", "_")
            target.write_text(text)
            files.append(str(target))
    assert files
    result = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "-k", KUBE_VERSION, *files],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for line in result.stdout.splitlines():
        # Only kinds outside core Kubernetes (ServiceMonitor) may lack a schema.
        if line.startswith("WARN"):
            assert "ServiceMonitor" in line, line


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_manifests_validate_against_kubernetes(chart, name, tmp_path):
    kubernetes_validate(render_raw(chart, VALUE_SETS[name]), tmp_path)


def test_validator_rejects_unknown_fields(tmp_path):
    # Guards the check above: strict validation does fail on a misspelt field.
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\ndatta: {}\n")
    result = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "-k", KUBE_VERSION, str(bad)],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode != 0


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_config_reaches_the_proxy_live(chart, name):
    """Hot reload needs directory mounts and no restart-forcing checksum annotation."""
    docs = render(chart, VALUE_SETS[name])
    assert not list(walk(docs, "subPath"))
    assert not list(walk(docs, "subPathExpr"))
    for annotations in walk(docs, "annotations"):
        assert not any(k.startswith("checksum/") for k in annotations or {})


# ---------------------------------------------------------------------------------------------
# the standalone Deployment


def test_default_install_is_a_standalone_deployment_and_service(chart):
    docs = render(chart, {})
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ConfigMap", "Deployment", "Service", "ServiceAccount"]
    spec = pod_spec(docs)
    assert [c["name"] for c in spec["containers"]] == [PROXY]
    assert "initContainers" not in spec
    assert "restartPolicy" not in spec["containers"][0]

    service = one(docs, "Service")
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["http"]["port"] == HTTP_PORT and ports["http"]["targetPort"] == "http"
    assert ports["admin"]["port"] == ADMIN_PORT
    assert service["spec"]["selector"] == one(docs, "Deployment")["spec"]["selector"]["matchLabels"]


def test_standalone_listens_on_all_interfaces(chart):
    config = proxy_toml(render(chart, {}))
    assert config["server"]["listen"] == f"0.0.0.0:{HTTP_PORT}"
    assert config["server"]["admin_listen"] == f"0.0.0.0:{ADMIN_PORT}"


def test_runtime_threads_follow_the_shape(chart):
    # A shared gateway uses every core; a sidecar keeps the proxy's single-thread default.
    assert proxy_toml(render(chart, {}))["server"]["worker_threads"] == 0
    assert "worker_threads" not in proxy_toml(render(chart, VALUE_SETS["native-sidecar"]))["server"]
    chosen = {"config": {"server": {"worker_threads": 2}}}
    assert proxy_toml(render(chart, chosen))["server"]["worker_threads"] == 2


@pytest.mark.parametrize("name", ["default", "native-sidecar", "sidecar"])
def test_probes_use_the_admin_port(chart, name):
    container = proxy_container(pod_spec(render(chart, VALUE_SETS[name])))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": HTTP_PORT, "admin": ADMIN_PORT}
    expected = {"livenessProbe": "/healthz", "readinessProbe": "/readyz", "startupProbe": "/healthz"}
    for probe, path in expected.items():
        assert container[probe]["httpGet"] == {"path": path, "port": "admin"}


@pytest.mark.parametrize("name", ["default", "native-sidecar", "sidecar"])
def test_proxy_container_is_locked_down(chart, name):
    docs = render(chart, VALUE_SETS[name])
    container = proxy_container(pod_spec(docs))
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["runAsUser"] == 65532
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert container["resources"]["requests"]["cpu"]
    assert container["resources"]["limits"]["memory"]
    assert container["args"] == ["--config", "/etc/openrouter-proxy/proxy.toml"]


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({}, 45),
        ({"config": {"server": {"shutdown_grace": "1m30s", "drain_delay": "500ms"}}}, 101),
        ({"terminationGracePeriodSeconds": 120}, 120),
    ],
)
def test_termination_grace_exceeds_the_proxy_drain(chart, values, expected):
    docs = render(chart, values)
    period = pod_spec(docs)["terminationGracePeriodSeconds"]
    server = proxy_toml(docs)["server"]
    assert period == expected
    assert period > seconds(server["shutdown_grace"]) + seconds(server["drain_delay"])


def test_termination_grace_too_short_is_refused(chart):
    with pytest.raises(helm_python.HelmRenderError, match="must exceed"):
        render(chart, {"terminationGracePeriodSeconds": 30})


# ---------------------------------------------------------------------------------------------
# the sidecar shape


def test_native_sidecar_is_an_always_restarting_init_container(chart):
    docs = render(chart, VALUE_SETS["native-sidecar"])
    spec = pod_spec(docs)
    assert spec["initContainers"][0]["name"] == PROXY
    assert spec["initContainers"][0]["restartPolicy"] == "Always"
    assert [c["name"] for c in spec["containers"]] == ["app"]


def test_plain_sidecar_is_a_second_container(chart):
    spec = pod_spec(render(chart, VALUE_SETS["sidecar"]))
    assert "initContainers" not in spec
    assert [c["name"] for c in spec["containers"]] == ["app", PROXY]
    assert "restartPolicy" not in spec["containers"][1]


@pytest.mark.parametrize("name", ["sidecar", "native-sidecar"])
def test_app_is_pointed_at_the_proxy(chart, name):
    docs = render(chart, VALUE_SETS[name])
    app = next(c for c in pod_spec(docs)["containers"] if c["name"] == "app")
    env = {e["name"]: e.get("value") for e in app["env"]}
    assert env["OPENAI_BASE_URL"] == f"http://127.0.0.1:{HTTP_PORT}/v1"
    assert env["OPENAI_API_KEY"] == "unused"
    assert app["image"] == "registry.example.com/shop/api:1.4.2"
    # The key never reaches the application container.
    assert "OPENROUTER_API_KEY" not in env
    assert "volumeMounts" not in app


def test_sidecar_listens_on_loopback_only(chart):
    docs = render(chart, VALUE_SETS["native-sidecar"])
    config = proxy_toml(docs)
    assert config["server"]["listen"] == f"127.0.0.1:{HTTP_PORT}"
    # Kubelet probes and Prometheus reach the admin port on the pod IP.
    assert config["server"]["admin_listen"] == f"0.0.0.0:{ADMIN_PORT}"
    ports = {p["name"]: p["port"] for p in one(docs, "Service")["spec"]["ports"]}
    assert ports == {"http": 8000, "admin": ADMIN_PORT}


def test_app_image_reference(chart):
    pinned = {"app": {"image": {"repository": "registry.example.com/shop/api@sha256:" + "0" * 64}}}
    app = pod_spec(render(chart, pinned))["containers"][0]
    assert app["image"] == pinned["app"]["image"]["repository"]


def test_app_env_can_override_the_defaults(chart):
    values = {"app": {**APP, "env": [{"name": "OPENAI_API_KEY", "value": "placeholder"},
                                     {"name": "LOG_LEVEL", "value": "debug"}]}}
    app = pod_spec(render(chart, values))["containers"][0]
    names = [e["name"] for e in app["env"]]
    assert names == ["OPENAI_BASE_URL", "OPENAI_API_KEY", "LOG_LEVEL"]
    assert app["env"][1]["value"] == "placeholder"


def render_for_kubernetes(chart, values: dict, kube_version: str) -> dict[str, str]:
    # Chart.render() does not forward a target Kubernetes version in helm-python-sdk 0.2.2, but
    # the bundled library takes it (`helm template --kube-version`). Lint cannot stand in: in lint
    # mode Helm logs `fail` instead of failing.
    from helm_python import _native

    options = {"name": RELEASE, "namespace": NAMESPACE, "kube_version": kube_version}
    return json.loads(_native.call_string(
        "helm_render", chart._raw(), json.dumps(values), json.dumps(options)))


def test_native_sidecar_needs_kubernetes_1_29(chart):
    with pytest.raises(helm_python.HelmRenderError, match="sidecar.native needs Kubernetes >= 1.29"):
        render_for_kubernetes(chart, VALUE_SETS["native-sidecar"], "v1.28.0")
    assert render_for_kubernetes(chart, VALUE_SETS["sidecar"], "v1.28.0")
    assert render_for_kubernetes(chart, VALUE_SETS["native-sidecar"], "v1.29.0")


def test_parent_chart_can_include_the_sidecar(tmp_path):
    """The README's example: another chart vendors this one and includes its templates."""
    parent = tmp_path / "shop"
    (parent / "templates").mkdir(parents=True)
    shutil.copytree(CHART_DIR, parent / "charts" / PROXY)
    (parent / "Chart.yaml").write_text(
        "apiVersion: v2\nname: shop\nversion: 1.0.0\n"
        "dependencies:\n  - name: openrouter-proxy\n    version: 0.1.0\n"
    )
    (parent / "values.yaml").write_text(
        "openrouter-proxy:\n  workload:\n    enabled: false\n  apiKey: sk-or-test\n"
    )
    readme = (CHART_DIR / "README.md").read_text()
    example = re.search(r"```yaml\n(# templates/deployment\.yaml.*?)```", readme, re.S)
    assert example, "README.md lacks the parent-chart example"
    (parent / "templates" / "deployment.yaml").write_text(example.group(1))

    report = helm_python.lint(parent)
    assert not report["errors"], report
    with helm_python.Chart.load(parent) as loaded:
        docs = render(loaded, {})
        kubernetes_validate(render_raw(loaded, {}), tmp_path)
    deployment = one(docs, "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    assert spec["initContainers"][0]["name"] == PROXY
    assert spec["initContainers"][0]["restartPolicy"] == "Always"
    env = {e["name"]: e["value"] for e in spec["containers"][0]["env"]}
    assert env["OPENAI_BASE_URL"] == f"http://127.0.0.1:{HTTP_PORT}/v1"
    volumes = {v["name"]: v for v in spec["volumes"]}
    configmap = one([d for d in docs if d["kind"] == "ConfigMap"], "ConfigMap")
    assert volumes["openrouter-proxy-config"]["configMap"]["name"] == configmap["metadata"]["name"]
    assert volumes["openrouter-proxy-api-key"]["secret"]["secretName"] == one(docs, "Secret")["metadata"]["name"]
    assert spec["terminationGracePeriodSeconds"] == 45
    assert proxy_toml(docs)["server"]["listen"] == f"127.0.0.1:{HTTP_PORT}"
    assert not find(docs, "Service")


def test_embedded_renders_only_config_and_secret(chart):
    docs = render(chart, VALUE_SETS["embedded"])
    assert sorted(d["kind"] for d in docs) == ["ConfigMap", "Secret"]


# ---------------------------------------------------------------------------------------------
# proxy.toml and the key


def test_proxy_toml_has_the_documented_keys(chart):
    config = proxy_toml(render(chart, VALUE_SETS["routes"]))
    assert set(config["server"]) >= {"listen", "admin_listen", "max_body_bytes", "shutdown_grace"}
    assert config["server"]["max_body_bytes"] == 10485760
    upstream = config["upstream"]
    assert upstream["base_url"] == "https://openrouter.ai/api/v1"
    assert upstream["connect_timeout"] == "5s" and upstream["first_byte_timeout"] == "60s"
    assert upstream["headers"] == {"HTTP-Referer": "https://example.com", "X-Title": "example-app"}
    assert config["fallback"] == {"on_status": [500, 502, 503, 504], "max_attempts": 3}
    assert config["cache"] == {"max_bytes": 268435456}
    assert config["routes"] == ROUTES


def proxy_binary() -> Path | None:
    """The newest built proxy that can validate a config (`--check`), if the crate has been built."""
    built = [REPO / "target" / profile / "openrouter-proxy" for profile in ("debug", "release")]
    for binary in sorted((b for b in built if b.is_file()), key=lambda b: b.stat().st_mtime, reverse=True):
        usage = subprocess.run([str(binary), "--help"], capture_output=True, text=True, check=False)
        if "--check" in usage.stdout:
            return binary
    return None


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_proxy_accepts_the_rendered_config(chart, name, tmp_path):
    binary = proxy_binary()
    if binary is None:
        pytest.skip("no built openrouter-proxy with --check (cargo build first)")
    path = tmp_path / "proxy.toml"
    path.write_text(proxy_toml_text(render(chart, VALUE_SETS[name])))
    result = subprocess.run([str(binary), "--check", "--config", str(path)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_proxy_toml_numbers_stay_integers(chart):
    config = proxy_toml(render(chart, {"config": {"cache": {"max_bytes": 1073741824}}}))
    assert config["cache"]["max_bytes"] == 1073741824
    assert isinstance(config["fallback"]["max_attempts"], int)


def test_strings_are_escaped(chart):
    tricky = 'a "quoted" \\ value\nwith a newline'
    values = {"config": {"upstream": {"headers": {"X-Title": tricky, "weird key": "v"}}}}
    config = proxy_toml(render(chart, values))
    assert config["upstream"]["headers"] == {"X-Title": tricky, "weird key": "v"}


def test_raw_config_is_used_verbatim(chart):
    raw = '[server]\nlisten = "0.0.0.0:8080"\nadmin_listen = "0.0.0.0:9090"\n'
    docs = render(chart, {"rawConfig": raw})
    assert proxy_toml_text(docs).strip() == raw.strip()


def test_key_file_is_mounted_where_the_config_points(chart):
    docs = render(chart, VALUE_SETS["api-key"])
    key_file = Path(proxy_toml(docs)["upstream"]["api_key_file"])
    assert "api_key_env" not in proxy_toml(docs)["upstream"]
    spec = pod_spec(docs)
    mount = next(m for m in proxy_container(spec)["volumeMounts"] if m["name"] == "openrouter-proxy-api-key")
    assert Path(mount["mountPath"]) == key_file.parent
    volume = next(v for v in spec["volumes"] if v["name"] == "openrouter-proxy-api-key")
    assert volume["secret"]["items"] == [{"key": "api-key", "path": key_file.name}]
    assert volume["secret"]["optional"] is False
    secret = one(docs, "Secret")
    assert secret["metadata"]["name"] == volume["secret"]["secretName"]
    assert base64.b64decode(secret["data"]["api-key"]).decode() == "sk-or-test"


def test_existing_secret_is_referenced_not_created(chart):
    docs = render(chart, VALUE_SETS["existing-secret"])
    assert not find(docs, "Secret")
    volume = next(v for v in pod_spec(docs)["volumes"] if "secret" in v)
    assert volume["secret"]["secretName"] == "openrouter"
    assert volume["secret"]["items"] == [{"key": "token", "path": "api-key"}]


def test_key_from_environment(chart):
    docs = render(chart, VALUE_SETS["existing-secret-env"])
    upstream = proxy_toml(docs)["upstream"]
    assert upstream["api_key_env"] == "OPENROUTER_API_KEY"
    assert "api_key_file" not in upstream
    container = proxy_container(pod_spec(docs))
    env = {e["name"]: e for e in container["env"]}
    assert env["OPENROUTER_API_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "openrouter", "key": "token", "optional": False}
    assert all(v["name"] != "openrouter-proxy-api-key" for v in pod_spec(docs)["volumes"])


def test_without_a_key_the_pod_still_starts(chart):
    docs = render(chart, {})
    assert not find(docs, "Secret")
    volume = next(v for v in pod_spec(docs)["volumes"] if "secret" in v)
    assert volume["secret"]["optional"] is True
    notes = render_raw(chart, {})[f"{PROXY}/templates/NOTES.txt"]
    assert "no API key configured" in notes


def mounted_files(docs: list[dict]) -> dict[str, tuple[str, str]]:
    """Every file a Secret puts in the proxy container: path -> (Secret name, key in it)."""
    spec = pod_spec(docs)
    volumes = {v["name"]: v for v in spec["volumes"]}
    files = {}
    for mount in proxy_container(spec)["volumeMounts"]:
        secret = volumes[mount["name"]].get("secret")
        for item in (secret or {}).get("items", []):
            files[f"{mount['mountPath']}/{item['path']}"] = (secret["secretName"], item["key"])
    return files


def test_several_upstreams_and_their_secrets(chart):
    docs = render(chart, VALUE_SETS["several-upstreams"])
    config = proxy_toml(docs)
    upstream = config["upstream"]
    assert "api_key_file" not in upstream and "api_key_env" not in upstream
    assert upstream["keys"] == [
        {"name": "team-a", "file": "/var/run/secrets/openrouter/key-a", "weight": 2},
        {"name": "team-b", "file": "/var/run/secrets/openrouter/key-b"},
    ]
    upstreams = config["upstreams"]
    assert set(upstreams) == {"anthropic", "openai", "local"}
    anthropic_key = "/var/run/secrets/openrouter-upstreams/anthropic/api-key"
    assert upstreams["anthropic"] == {"base_url": "https://api.anthropic.com/v1", "api_key_file": anthropic_key}
    assert upstreams["openai"]["keys"] == [
        {"name": "a", "file": "/var/run/secrets/openrouter-upstreams/openai/k1"},
        {"name": "b", "file": "/var/run/secrets/openrouter-upstreams/openai/k2", "weight": 3},
    ]
    assert upstreams["openai"]["first_byte_timeout"] == "30s"
    assert upstreams["local"] == UPSTREAMS["local"], "auth = none: no key"
    assert config["routes"] == UPSTREAM_ROUTES

    # Each key file the config names is a key of the right Secret, mounted as a directory.
    files = mounted_files(docs)
    named = [k["file"] for k in upstream["keys"] + upstreams["openai"]["keys"]] + [anthropic_key]
    assert {f: files[f] for f in named} == {
        "/var/run/secrets/openrouter/key-a": ("openrouter-keys", "key-a"),
        "/var/run/secrets/openrouter/key-b": ("openrouter-keys", "key-b"),
        "/var/run/secrets/openrouter-upstreams/openai/k1": ("openai-keys", "k1"),
        "/var/run/secrets/openrouter-upstreams/openai/k2": ("openai-keys", "k2"),
        anthropic_key: (f"{RELEASE}-{PROXY}-anthropic", "api-key"),
    }
    # Only the Secret given as values is created; existing ones are referenced.
    secrets = find(docs, "Secret")
    assert [s["metadata"]["name"] for s in secrets] == [f"{RELEASE}-{PROXY}-anthropic"]
    assert base64.b64decode(secrets[0]["data"]["api-key"]).decode() == "sk-ant-test"


def test_a_key_pool_from_a_created_secret(chart):
    docs = render(chart, VALUE_SETS["created-key-pool"])
    upstream = proxy_toml(docs)["upstream"]
    assert "base_url" not in upstream, "the chart's default base_url gives way to endpoints"
    assert upstream["endpoints"] == ["https://or-eu.example.com/api/v1", "https://or-us.example.com/api/v1"]
    secret = one(docs, "Secret")
    assert {k: base64.b64decode(v).decode() for k, v in secret["data"].items()} == {
        "key-a": "sk-or-a", "key-b": "sk-or-b"}
    files = mounted_files(docs)
    for key in upstream["keys"]:
        assert files[key["file"]] == (secret["metadata"]["name"], Path(key["file"]).name)
    volume = next(v for v in pod_spec(docs)["volumes"] if v["name"] == "openrouter-proxy-api-key")
    assert volume["secret"]["optional"] is False


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"upstreamSecrets": {"nowhere": {"existingSecret": "x"}}}, "config.upstreams has no upstream named nowhere"),
        ({"keyPool": [{"name": "a", "secretKey": "a"}], "apiKeySource": "env"}, "keyPool needs apiKeySource: file"),
        ({"keyPool": [{"name": "a", "secretKey": "a"}],
          "config": {"upstream": {"keys": [{"name": "b", "env": "B"}]}}}, "not both"),
    ],
)
def test_inconsistent_upstream_values_fail_with_a_reason(chart, values, message):
    with pytest.raises(Exception, match=message):
        render_raw(chart, values)


def test_an_own_key_pool_is_left_as_it_is(chart):
    keys = [{"name": "a", "env": "OR_KEY_A"}, {"name": "b", "env": "OR_KEY_B", "weight": 2}]
    upstream = proxy_toml(render(chart, {"config": {"upstream": {"keys": keys}}}))["upstream"]
    assert upstream["keys"] == keys
    assert "api_key_file" not in upstream and "api_key_env" not in upstream


# ---------------------------------------------------------------------------------------------
# scaling and monitoring


def test_autoscaling_and_disruption_budget(chart):
    docs = render(chart, VALUE_SETS["autoscaling-pdb"])
    deployment = one(docs, "Deployment")
    assert "replicas" not in deployment["spec"]
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1", "kind": "Deployment", "name": deployment["metadata"]["name"]}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    assert {m["resource"]["name"] for m in hpa["spec"]["metrics"]} == {"cpu", "memory"}
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]


def test_service_monitor_scrapes_the_admin_port(chart):
    docs = render(chart, VALUE_SETS["monitoring"])
    monitor = one(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["endpoints"][0]["port"] == "admin"
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    service = one(docs, "Service")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert "admin" in {p["name"] for p in service["spec"]["ports"]}


def test_dashboard_configmap_ships_the_dashboard(chart):
    docs = render(chart, VALUE_SETS["monitoring"])
    dashboards = [d for d in find(docs, "ConfigMap") if "openrouter-proxy.json" in d.get("data", {})]
    assert len(dashboards) == 1
    assert dashboards[0]["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboards[0]["metadata"]["annotations"] == {"grafana_folder": "LLM"}
    shipped = json.loads(dashboards[0]["data"]["openrouter-proxy.json"])
    assert shipped == json.loads(DASHBOARD.read_text())


def test_monitoring_is_off_by_default(chart):
    docs = render(chart, {})
    assert not find(docs, "ServiceMonitor")
    assert all("openrouter-proxy.json" not in d.get("data", {}) for d in find(docs, "ConfigMap"))


# ---------------------------------------------------------------------------------------------
# the Batch API's store


BATCH_MOUNT = "/var/lib/openrouter-proxy/batches"


def batch_volume(docs: list[dict]) -> dict:
    """The volume mounted where [batch] store points, checked to be the proxy's only writable one."""
    spec = pod_spec(docs)
    store = proxy_toml(docs)["batch"]["store"]
    mounts = [m for m in proxy_container(spec)["volumeMounts"] if m["mountPath"] == store]
    assert len(mounts) == 1 and not mounts[0].get("readOnly"), mounts
    volumes = [v for v in spec["volumes"] if v["name"] == mounts[0]["name"]]
    assert len(volumes) == 1
    return volumes[0]


def test_batch_is_off_by_default(chart):
    docs = render(chart, {"config": {"batch": {"concurrency": 4}}})
    assert "batch" not in proxy_toml(docs)
    assert not find(docs, "PersistentVolumeClaim")
    assert "strategy" not in one(docs, "Deployment")["spec"]


def test_standalone_batch_store_on_a_claim(chart):
    docs = render(chart, VALUE_SETS["batch-standalone"])
    batch = proxy_toml(docs)["batch"]
    assert batch == {"store": BATCH_MOUNT, "concurrency": 16, "retention": "3d", "retry_base": "1s"}
    claim = one(docs, "PersistentVolumeClaim")
    assert claim["spec"]["resources"]["requests"]["storage"] == "20Gi"
    assert claim["spec"]["storageClassName"] == "fast-ssd"
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert batch_volume(docs) == {"name": "openrouter-proxy-batches",
                                  "persistentVolumeClaim": {"claimName": claim["metadata"]["name"]}}
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    # The non-root proxy can write the volume.
    assert pod_spec(docs)["securityContext"]["fsGroup"] == 65532


def test_standalone_batch_store_on_an_existing_claim(chart):
    values = {"replicaCount": 1, "batch": {"enabled": True,
                                           "persistence": {"enabled": True, "existingClaim": "batches"}}}
    docs = render(chart, values)
    assert not find(docs, "PersistentVolumeClaim")
    assert batch_volume(docs)["persistentVolumeClaim"] == {"claimName": "batches"}


def test_batch_without_persistence_is_an_empty_dir(chart):
    docs = render(chart, {"batch": {"enabled": True, "mountPath": "/data/batches"}})
    assert proxy_toml(docs)["batch"] == {"store": "/data/batches"}
    assert batch_volume(docs)["emptyDir"] == {}
    assert not find(docs, "PersistentVolumeClaim")


def test_sidecar_batch_store_is_an_empty_dir(chart):
    docs = render(chart, VALUE_SETS["batch-sidecar"])
    assert batch_volume(docs)["emptyDir"] == {"sizeLimit": "2Gi"}
    assert not find(docs, "PersistentVolumeClaim")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"batch": {"enabled": True, "persistence": {"enabled": True}}}, "replicaCount: 1"),
        ({"replicaCount": 1, "autoscaling": {"enabled": True},
          "batch": {"enabled": True, "persistence": {"enabled": True}}}, "replicaCount: 1"),
        ({"app": APP, "batch": {"enabled": True, "persistence": {"enabled": True}}}, "standalone shape"),
    ],
)
def test_batch_persistence_refuses_what_cannot_work(chart, values, message):
    with pytest.raises(Exception, match=message):
        render_raw(chart, values)


# ---------------------------------------------------------------------------------------------
# the values schema


@pytest.mark.parametrize(
    "values",
    [
        {"replicaCount": -1},
        {"replicaCount": "two"},
        {"apiKeySource": "vault"},
        {"unknownTopLevel": True},
        {"image": {"pullPolicy": "Sometimes"}},
        {"ports": {"http": 0, "admin": 9090}},
        {"ports": {"http": "8080", "admin": 9090}},
        {"service": {"type": "Ingress"}},
        {"sidecar": {"native": "yes"}},
        {"autoscaling": {"enabled": True, "minReplicas": 0}},
        {"podDisruptionBudget": {"enabled": True, "minAvailable": 1, "maxUnavailable": 1}},
        {"config": {"server": {"shutdown_grace": "thirty seconds"}}},
        {"config": {"server": {"listen": "0.0.0.0:1"}}},
        {"config": {"upstream": {"api_key_env": "OTHER"}}},
        {"config": {"fallback": {"max_atempts": 3}}},
        {"config": {"fallback": {"on_status": [700]}}},
        {"config": {"log": {"format": "xml"}}},
        {"config": {"routes": [{"model": "openai/gpt-4o"}]}},
        {"config": {"routes": [{"name": "r", "cache_ttl": 600}]}},
        {"terminationGracePeriodSeconds": -5},
        {"app": {"image": {"repository": "x"}, "ports": [{"containerPort": 80}]}},
        {"config": {"upstream": {"auth": "sometimes"}}},
        {"config": {"upstream": {"keys": [{"name": "a"}]}}},
        {"config": {"upstream": {"keys": [{"name": "a", "env": "A", "file": "/k"}]}}},
        {"config": {"upstreams": {"default": {"base_url": "https://x.example.com/v1"}}}},
        {"config": {"upstreams": {"has space": {"base_url": "https://x.example.com/v1"}}}},
        {"config": {"upstreams": {"x": {"base_url": "https://x.example.com/v1",
                                        "endpoints": ["https://y.example.com/v1"]}}}},
        {"config": {"upstreams": {"x": {"endpoints": ["ftp://y.example.com/v1"]}}}},
        {"config": {"upstreams": {"x": {"base_ur": "https://x.example.com/v1"}}}},
        {"config": {"routes": [{"name": "r", "fallbacks": [{"upstream": "x"}]}]}},
        {"config": {"routes": [{"name": "r", "fallbacks": [{"model": "m", "upstrem": "x"}]}]}},
        {"config": {"routes": [{"name": "r", "set_body": ["provider"]}]}},
        {"config": {"routes": [{"name": "r", "default_body": 5}]}},
        {"config": {"routes": [{"name": "r", "unset_body": ["model"]}]}},
        {"keyPool": [{"name": "a"}]},
        {"keyPool": [{"name": "a", "secretKey": "a/b"}]},
        {"apiKeys": {"key-a": 5}},
        {"upstreamSecrets": {"x": {"existingSecret": "s", "apiKeys": {"api-key": "k"}}}},
        {"upstreamSecrets": {"x": {"existingSecret": "s", "keys": [{"name": "a"}]}}},
        {"batch": {"enabled": "yes"}},
        {"batch": {"mountPath": "relative/dir"}},
        {"batch": {"persistence": {"size": "lots"}}},
        {"batch": {"persistence": {"accessModes": ["ReadOnlyMany"]}}},
        {"config": {"batch": {"store": "/elsewhere"}}},
        {"config": {"batch": {"concurrency": 0}}},
        {"config": {"batch": {"retention": "a week"}}},
        {"config": {"batch": {"workers": 3}}},
    ],
)
def test_schema_rejects_bad_values(chart, values):
    with pytest.raises(helm_python.HelmValuesError):
        render_raw(chart, values)


def test_schema_accepts_every_value_set(chart):
    for values in VALUE_SETS.values():
        chart.validate_schema(values)


# ---------------------------------------------------------------------------------------------
# Dockerfile


def test_hadolint_is_clean():
    result = subprocess.run(
        [tool("hadolint"), "--no-color", str(DOCKERFILE)],
        capture_output=True, text=True, check=False, cwd=REPO,
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def test_dockerfile_shape():
    instructions = dockerfile_instructions()
    froms = [rest for kw, rest in instructions if kw == "FROM"]
    assert len(froms) == 2
    assert froms[0].startswith("rust:1.95")
    assert froms[1].startswith("gcr.io/distroless/cc-debian12:nonroot")
    runtime = instructions[[kw for kw, _ in instructions].index("FROM", 1):]
    assert ("USER", "65532:65532") in runtime
    assert not any(kw == "RUN" for kw, _ in runtime), "the runtime stage has no shell"
    exposed = {p for kw, rest in runtime if kw == "EXPOSE" for p in rest.split()}
    assert exposed == {"8080", "9090"}
    entrypoint = json.loads(next(rest for kw, rest in runtime if kw == "ENTRYPOINT"))
    cmd = json.loads(next(rest for kw, rest in runtime if kw == "CMD"))
    assert entrypoint == ["/usr/local/bin/openrouter-proxy"]
    assert cmd == ["--config", "/etc/openrouter-proxy/proxy.toml"]

    # Dependencies build from the manifest alone before the sources arrive.
    copies = [rest for kw, rest in instructions if kw == "COPY"]
    assert copies.index("Cargo.toml Cargo.lock ./") < copies.index("src ./src")
    builds = [i for i, (kw, rest) in enumerate(instructions) if kw == "RUN" and "cargo build --release --locked" in rest]
    assert len(builds) == 2
    assert instructions.index(("COPY", "src ./src")) > builds[0]


def dockerfile_run(marker: str) -> str:
    return next(rest for kw, rest in dockerfile_instructions() if kw == "RUN" and marker in rest)


CONTRACT_EXAMPLE = """\
[server]
listen = "127.0.0.1:8080"        # the OpenAI-compatible API, under /v1
admin_listen = "127.0.0.1:9090"  # /metrics, /healthz, /readyz
max_body_bytes = 10485760
shutdown_grace = "30s"

[upstream]
base_url = "https://openrouter.ai/api/v1"
api_key_env = "OPENROUTER_API_KEY"
"""


@pytest.mark.parametrize("source", ["contract", "repo"])
def test_image_config_listens_on_all_interfaces(tmp_path, source):
    """Runs the Dockerfile's own command that derives the image's config from proxy.toml."""
    if source == "repo":
        if not (REPO / "proxy.toml").exists():
            pytest.skip("no proxy.toml at the repository root yet")
        example = (REPO / "proxy.toml").read_text()
    else:
        example = CONTRACT_EXAMPLE
    (tmp_path / "proxy.toml").write_text(example)
    command = dockerfile_run("proxy.container.toml")
    subprocess.run(["sh", "-c", command], cwd=tmp_path, check=True)
    derived = tomllib.loads((tmp_path / "proxy.container.toml").read_text())
    original = tomllib.loads(example)
    assert derived["server"]["listen"] == original["server"]["listen"].replace("127.0.0.1", "0.0.0.0")
    assert derived["server"]["admin_listen"].startswith("0.0.0.0:")
    original["server"].pop("listen"), original["server"].pop("admin_listen")
    derived["server"].pop("listen"), derived["server"].pop("admin_listen")
    assert derived == original
    binary = proxy_binary()
    if binary is not None:
        check = subprocess.run([str(binary), "--check", "--config", "proxy.container.toml"],
                               cwd=tmp_path, capture_output=True, text=True, check=False)
        assert check.returncode == 0, check.stdout + check.stderr


def test_dependency_layer_drops_only_bench_and_test_targets(tmp_path):
    manifest = (
        '[package]\nname = "x"\nversion = "0.1.0"\n\n[[bin]]\nname = "x"\npath = "src/main.rs"\n\n'
        '[[bench]]\nname = "load"\nharness = false\n\n[dependencies]\nserde = "1"\n\n'
        '[[test]]\nname = "it"\npath = "tests/it.rs"\n\n[profile.release]\nlto = "fat"\n'
    )
    (tmp_path / "Cargo.toml").write_text(manifest)
    awk = dockerfile_run("cargo build").split("&&")[0]
    subprocess.run(["sh", "-c", awk], cwd=tmp_path, check=True)
    stripped = tomllib.loads((tmp_path / "Cargo.image.toml").read_text())
    full = tomllib.loads(manifest)
    del full["bench"], full["test"]
    assert stripped == full


def test_dockerignore_admits_what_the_build_copies():
    allowed = {line[1:].rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    assert allowed == {"Cargo.toml", "Cargo.lock", "src", "proxy.toml"}


# ---------------------------------------------------------------------------------------------
# Grafana dashboard


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panel_exprs(dashboard: dict) -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]


def test_repo_root_dashboard_is_the_chart_copy():
    root_copy = REPO / "dashboards" / "openrouter-proxy.json"
    assert root_copy.is_symlink()
    assert root_copy.resolve() == DASHBOARD.resolve()


def test_dashboard_uses_a_datasource_variable(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    assert dashboard["uid"] and dashboard["title"]


def test_dashboard_queries_use_only_known_metrics(dashboard):
    queries = [expr for _, expr in panel_exprs(dashboard)]
    queries += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    used = set()
    for query in queries:
        for name in re.findall(r"\bopenrouter_[a-z0-9_]+", query):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            assert base in METRIC_FAMILIES, f"{name} in {query}"
            used.add(base)
    assert used == METRIC_FAMILIES


def test_dashboard_has_the_expected_panels(dashboard):
    exprs = panel_exprs(dashboard)
    text = " ".join(f"{title} {expr}" for title, expr in exprs).lower()
    for quantile in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (le) (rate(openrouter_request_latency_seconds_bucket" in text
        assert f"histogram_quantile({quantile}, sum by (le) (rate(openrouter_time_to_first_byte_seconds_bucket" in text
    assert 'status!~"2.."' in text
    assert 'result="hit"' in text
    assert "sum by (model, type) (rate(openrouter_tokens_total" in text
    assert "rate(openrouter_cost_usd_total" in text and "* 3600" in text
    # Per upstream: attempts by outcome, the keys of each pool, cool-downs.
    assert "sum by (upstream, outcome) (rate(openrouter_upstream_attempts_total" in text
    assert "min by (upstream, key) (openrouter_upstream_key_up" in text
    assert "max by (upstream, model) (openrouter_model_cooldown" in text
    titles = {title for title, _ in exprs}
    for wanted in ("Fallbacks", "Cache hit ratio", "Active requests", "Config reloads",
                   "Tokens/s by model", "Cost/hour by model", "Attempts by upstream and outcome",
                   "Keys in rotation", "Models in cool-down", "Redis up by replica",
                   "Cache hits by tier", "Budget spent (USD)", "Batch lines by status"):
        assert wanted in titles
    # Shared state: Redis per replica, hits per tier.
    assert "min by (pod) (openrouter_redis_up" in text
    assert 'sum by (tier) (rate(openrouter_cache_requests_total' in text


def test_dashboard_panels_do_not_overlap(dashboard):
    cells = set()
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, panel["title"]
                cells.add((x, y))
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


# ---------------------------------------------------------------------------------------------
# traces


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def test_traces_are_off_by_default(chart):
    docs = render(chart, VALUE_SETS["api-key"])
    assert "otel" not in proxy_toml(docs)
    assert not [n for n in env_of(proxy_container(pod_spec(docs))) if n.startswith("OTEL_")]


def test_otel_values_become_the_otel_table(chart):
    config = proxy_toml(render(chart, VALUE_SETS["traced"]))
    assert config["otel"] == {
        "endpoint": "http://otel-collector.observability:4318",
        "sample_ratio": 0.25,
        "service_name": "gateway",
        "capture_content": False,
        "export_timeout": "2s",
        "max_queue_size": 4096,
    }
    values = {"apiKey": "k", "otel": {"enabled": True}}
    otel = proxy_toml(render(chart, values))["otel"]
    assert otel["endpoint"] == "http://otel-collector.observability:4318"
    assert otel["sample_ratio"] == 1 and otel["service_name"] == "openrouter-proxy"


def test_own_otel_table_is_kept_when_the_values_are_off(chart):
    values = {"apiKey": "k", "config": {"otel": {"endpoint": "http://c:4318", "sample_ratio": 0.5}}}
    docs = render(chart, values)
    assert proxy_toml(docs)["otel"] == {"endpoint": "http://c:4318", "sample_ratio": 0.5}
    assert "OTEL_RESOURCE_ATTRIBUTES" not in env_of(proxy_container(pod_spec(docs)))


@pytest.mark.parametrize("shape", ["standalone", "sidecar"])
def test_spans_name_the_pod(chart, shape):
    values = dict(VALUE_SETS["traced"])
    if shape == "sidecar":
        values["app"] = APP
    env_list = proxy_container(pod_spec(render(chart, values)))["env"]
    names = [e["name"] for e in env_list]
    env = {e["name"]: e for e in env_list}
    assert env["OTEL_K8S_POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["OTEL_K8S_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    # Kubernetes expands $(NAME) only from variables defined earlier in the list.
    assert names.index("OTEL_RESOURCE_ATTRIBUTES") > names.index("OTEL_K8S_NAMESPACE")
    assert env["OTEL_RESOURCE_ATTRIBUTES"]["value"] == (
        "k8s.pod.name=$(OTEL_K8S_POD_NAME),k8s.namespace.name=$(OTEL_K8S_NAMESPACE),"
        "deployment.environment.name=production"
    )


@pytest.mark.parametrize(
    "values",
    [
        {"otel": {"enabled": "yes"}},
        {"otel": {"endpoint": "otel-collector:4318"}},
        {"otel": {"endpoint": "http://user:secret@collector:4318"}},
        {"otel": {"sampleRatio": 1.5}},
        {"otel": {"sampleRatio": -0.1}},
        {"otel": {"serviceName": ""}},
        {"otel": {"endpont": "http://c:4318"}},
        {"otel": {"resourceAttributes": {"team": "a,b"}}},
        {"otel": {"resourceAttributes": {"a=b": "c"}}},
        {"config": {"otel": {"max_queue_size": 0}}},
        {"config": {"otel": {"export_timeout": "soon"}}},
        {"config": {"otel": {"sample_rate": 0.5}}},
    ],
)
def test_schema_rejects_bad_otel_values(chart, values):
    with pytest.raises(helm_python.HelmValuesError):
        render_raw(chart, values)


def test_batch_on_redis_takes_no_claim_and_allows_replicas(chart):
    # The store lives in Redis, shared by the replicas: no claim, no Recreate, any replica count.
    values = {"replicaCount": 3, "autoscaling": {"enabled": True},
              "redis": {"url": "redis://redis:6379/0"},
              "batch": {"enabled": True, "persistence": {"enabled": True}}}
    docs = render(chart, values)
    assert "batch" in proxy_toml(docs) and "redis" in proxy_toml(docs)
    assert not find(docs, "PersistentVolumeClaim")
    assert one(docs, "Deployment")["spec"].get("strategy") != {"type": "Recreate"}
