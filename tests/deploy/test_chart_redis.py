"""Offline checks of the chart's Redis values: redis.url / redis.existingSecret become REDIS_URL
from a Secret and [redis] url_env in proxy.toml (the URL never in the ConfigMap), for the
standalone and the sidecar shapes, validated by Helm, the Kubernetes schemas and the proxy."""

from __future__ import annotations

import base64
import subprocess

import pytest

import helm_python
from test_chart import (  # noqa: F401  (chart is a fixture)
    APP,
    CHART_DIR,
    KUBE_VERSION,
    chart,
    find,
    kubernetes_validate,
    one,
    pod_spec,
    proxy_binary,
    proxy_container,
    proxy_toml,
    proxy_toml_text,
    render,
    render_raw,
)

URL = "redis://:s3cret-password@redis-master.data:6379/0"
REPLICAS = {
    "replicaCount": 3,
    "apiKey": "sk-or-test",
    "redis": {"url": URL},
    "config": {
        "redis": {"op_timeout": "100ms"},
        "routes": [{"name": "chat", "match": {"model": "chat"}, "model": "openai/gpt-4o-mini",
                    "cache_ttl": "10m", "requests_per_minute": 600,
                    "budget": {"usd_per_day": 50.0, "usd_per_month": 1000.0}}],
    },
}
EXISTING = {"apiKey": "sk-or-test", "redis": {"existingSecret": "redis-auth", "existingSecretKey": "uri"}}
SIDECAR = {"apiKey": "sk-or-test", "app": APP, "redis": {"existingSecret": "redis-auth"}}
VALUE_SETS = {"replicas": REPLICAS, "existing": EXISTING, "sidecar": SIDECAR}


def redis_env(docs: list[dict]) -> dict:
    env = {e["name"]: e for e in proxy_container(pod_spec(docs)).get("env", [])}
    return env.get("REDIS_URL")


def test_a_url_goes_into_a_secret_and_reaches_the_proxy_as_redis_url(chart):
    docs = render(chart, REPLICAS)
    config = proxy_toml(docs)
    assert config["redis"] == {"url_env": "REDIS_URL", "op_timeout": "100ms"}
    assert config["cache"]["tier2"] == "redis"
    assert config["routes"][0]["budget"] == {"usd_per_day": 50.0, "usd_per_month": 1000.0}
    assert "s3cret" not in proxy_toml_text(docs), "the password stays out of the ConfigMap"
    secret = next(s for s in find(docs, "Secret") if s["metadata"]["name"].endswith("-redis"))
    assert base64.b64decode(secret["data"]["url"]).decode() == URL
    assert redis_env(docs)["valueFrom"]["secretKeyRef"] == {
        "name": secret["metadata"]["name"], "key": "url", "optional": False}
    assert one(docs, "Deployment")["spec"]["replicas"] == 3


def test_an_existing_secret_is_referenced_not_created(chart):
    docs = render(chart, EXISTING)
    assert not [s for s in find(docs, "Secret") if s["metadata"]["name"].endswith("-redis")]
    assert redis_env(docs)["valueFrom"]["secretKeyRef"] == {
        "name": "redis-auth", "key": "uri", "optional": False}
    assert proxy_toml(docs)["redis"] == {"url_env": "REDIS_URL"}


def test_the_sidecar_gets_redis_too(chart):
    docs = render(chart, SIDECAR)
    assert redis_env(docs)["valueFrom"]["secretKeyRef"]["name"] == "redis-auth"
    assert proxy_toml(docs)["cache"]["tier2"] == "redis"


def test_without_redis_nothing_of_it_is_rendered(chart):
    docs = render(chart, {"apiKey": "sk-or-test"})
    config = proxy_toml(docs)
    assert "redis" not in config and "tier2" not in config["cache"]
    assert redis_env(docs) is None
    assert [s["metadata"]["name"] for s in find(docs, "Secret")] == ["orp-openrouter-proxy"]


def test_the_cache_tier_can_stay_in_memory(chart):
    values = {"redis": {"url": URL, "cacheTier2": False}}
    config = proxy_toml(render(chart, values))
    assert config["redis"] == {"url_env": "REDIS_URL"}
    assert "tier2" not in config["cache"]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"redis": {"url": URL, "existingSecret": "x"}}, "set url or existingSecret, not both"),
        ({"config": {"redis": {"op_timeout": "100ms"}}}, "config.redis needs redis.url or redis.existingSecret"),
    ],
)
def test_inconsistent_redis_values_fail_with_a_reason(chart, values, message):
    with pytest.raises(Exception, match=message):
        render_raw(chart, values)


@pytest.mark.parametrize(
    "values",
    [
        {"redis": {"url": "http://redis:6379"}},
        {"redis": {"host": "redis"}},
        {"redis": {"existingSecretKey": "a/b"}},
        {"redis": {"cacheTier2": "yes"}},
        {"config": {"redis": {"url": URL}}},
        {"config": {"redis": {"op_timeout": 50}}},
        {"config": {"redis": {"pool_size": 0}}},
        {"config": {"redis": {"key_prefix": "has space"}}},
        {"config": {"cache": {"tier2": "memcached"}}},
        {"config": {"routes": [{"name": "r", "budget": {}}]}},
        {"config": {"routes": [{"name": "r", "budget": {"usd_per_day": 0}}]}},
        {"config": {"routes": [{"name": "r", "budget": {"usd_per_week": 1.0}}]}},
        {"config": {"server": {"tokens": [{"name": "t", "sha256": "0" * 64, "budget": {"usd_per_day": -1}}]}}},
    ],
)
def test_schema_rejects_bad_redis_values(chart, values):
    with pytest.raises(helm_python.HelmValuesError):
        render_raw(chart, values)


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_redis_values_lint_and_validate(chart, name, tmp_path):
    report = helm_python.lint(CHART_DIR, VALUE_SETS[name], strict=True, kube_version=f"v{KUBE_VERSION}")
    assert not report["errors"], report
    assert all(m["severity"] < 2 for m in report["messages"]), report
    chart.validate_schema(VALUE_SETS[name])
    kubernetes_validate(render_raw(chart, VALUE_SETS[name]), tmp_path)


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_proxy_accepts_the_rendered_redis_config(chart, name, tmp_path):
    binary = proxy_binary()
    if binary is None:
        pytest.skip("no built openrouter-proxy with --check (cargo build first)")
    path = tmp_path / "proxy.toml"
    path.write_text(proxy_toml_text(render(chart, VALUE_SETS[name])))
    result = subprocess.run([str(binary), "--check", "--config", str(path)],
                            capture_output=True, text=True, check=False, env={"REDIS_URL": URL})
    assert result.returncode == 0, result.stdout + result.stderr
