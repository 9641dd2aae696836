"""What operators install next to the relay (deploy/monitoring/): alert rules unit-tested with
promtool, the PrometheusRule kept identical to them, every alert documented in the runbook, the
dashboard's queries parsed by promtool and naming only metrics a real relay exports, and the
ServiceMonitor component selecting the relay's Service."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from pushrelay.v1 import relay_pb2 as pb
from relay.client import RelayClient
from relay.config import Limits
from relay.server import RelayServer
from relay.testing.configs import apns_app, local_config
from relay.testing.credentials import ApnsKey
from relay.testing.fake_apns import FakeAPNs
from relay.testing.tls import TestPKI
from tests.support import apns_token, request
from tests.test_promtool import cert_app, require_tool, scrape

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "deploy" / "monitoring"
RULES = MONITORING / "rules.yaml"
RUNBOOK = ROOT / "docs" / "operations.md"
DASHBOARD = MONITORING / "dashboard.json"
# Grafana's variables, as a query would see them after substitution.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$instance": ".*", "$app": ".*"}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_tool("promtool", "prometheus"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def rules() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def dashboard_exprs() -> list[str]:
    exprs = [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]
    assert exprs
    return exprs


def substituted(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, expr
    return expr


# -- alert rules ---------------------------------------------------------------------------------


def test_rules_pass_promtool_check() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_fire_and_stay_quiet_as_their_unit_tests_say() -> None:
    result = promtool("test", "rules", str(ROOT / "tests" / "monitoring" / "rules.test.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_unit_tested_firing() -> None:
    tests = yaml.safe_load((ROOT / "tests" / "monitoring" / "rules.test.yaml").read_text())
    fired = {
        case["alertname"]
        for test in tests["tests"]
        for case in test.get("alert_rule_test", [])
        if case["exp_alerts"]
    }
    assert fired == {rule["alert"] for rule in rules()}


def test_promtool_test_fails_on_a_wrong_expectation(tmp_path: Path) -> None:
    """The unit tests can fail: the same file, expecting a different summary, does."""
    tests = (ROOT / "tests" / "monitoring" / "rules.test.yaml").read_text()
    broken = tests.replace("summary: push-relay instance a:9464 is down", "summary: all fine")
    assert broken != tests
    (tmp_path / "rules.yaml").write_text(RULES.read_text())
    (tmp_path / "t.yaml").write_text(
        broken.replace("../../deploy/monitoring/rules.yaml", "rules.yaml")
    )
    assert promtool("test", "rules", str(tmp_path / "t.yaml")).returncode != 0


def test_the_prometheusrule_carries_the_same_rules() -> None:
    (resource,) = [d for d in yaml.safe_load_all((MONITORING / "prometheusrule.yaml").read_text())]
    assert (resource["apiVersion"], resource["kind"]) == (
        "monitoring.coreos.com/v1",
        "PrometheusRule",
    )
    assert resource["spec"] == yaml.safe_load(RULES.read_text())


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", markdown, re.M)
    return {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("rule", rules(), ids=lambda rule: rule["alert"])
def test_every_alert_explains_itself_and_links_its_runbook_section(rule: dict[str, Any]) -> None:
    annotations = rule["annotations"]
    assert annotations["summary"].strip() and annotations["description"].strip()
    assert rule["labels"]["severity"] in ("warning", "critical")
    document, anchor = annotations["runbook_url"].split("#")
    assert document == "docs/operations.md"
    assert anchor == rule["alert"].lower()
    assert anchor in _anchors(RUNBOOK.read_text())


# -- dashboard -----------------------------------------------------------------------------------


def test_dashboard_takes_its_datasource_from_a_variable() -> None:
    board = dashboard()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in board["panels"]:
        for holder in [panel, *panel.get("targets", [])]:
            if "datasource" in holder:
                assert holder["datasource"]["uid"] == "${datasource}", panel["title"]
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """Each query becomes a recording rule, which promtool parses as PromQL."""
    recorded = [
        {"record": f"dashboard:query_{i}", "expr": substituted(expr)}
        for i, expr in enumerate(dashboard_exprs())
    ]
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": recorded}]}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    path.write_text(
        yaml.safe_dump({"groups": [{"name": "d", "rules": [{"record": "x:y", "expr": "sum(("}]}]})
    )
    assert promtool("check", "rules", str(path)).returncode != 0  # the check can fail


def _names_in(exprs: list[str]) -> set[str]:
    names: set[str] = set()
    for expr in exprs:
        for name in re.findall(r"\b([a-z_][a-z0-9_]*)\s*(?=[{\[(])", expr):
            if name.startswith(("pushrelay_", "process_")) or name == "up":
                names.add(name)
    return names


async def test_dashboard_and_rules_name_only_metrics_the_relay_exports(  # type: ignore[no-untyped-def]
    start_relay, fake_apns: FakeAPNs, apns_key: ApnsKey, pki: TestPKI, tmp_path: Path
) -> None:
    # A certificate-auth app too: only those export pushrelay_credential_expiry_*.
    apps = [apns_app(fake_apns, apns_key), cert_app(fake_apns, pki, tmp_path / "cert.pem")]
    server: RelayServer = await start_relay(local_config(apps))
    exported = {
        line.split("{")[0].split(" ")[0]
        for line in (await scrape(server)).splitlines()
        if line and not line.startswith("#")
    }
    wanted = _names_in(dashboard_exprs()) | _names_in([rule["expr"] for rule in rules()])
    assert "pushrelay_app_notifications_total" in wanted  # the per-app view
    # `up` is Prometheus's own series for every target, not the relay's.
    missing = {name for name in wanted - {"up"} if name not in exported}
    assert not missing, f"not in a real scrape: {sorted(missing)}"


# -- the Prometheus Operator component -------------------------------------------------------


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_servicemonitor_scrapes_the_relays_metrics_port_as_job_push_relay() -> None:
    (monitor,) = _docs(MONITORING / "servicemonitor.yaml")
    (service,) = _docs(ROOT / "deploy" / "service.yaml")
    labels = service["metadata"]["labels"]
    assert monitor["kind"] == "ServiceMonitor"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    port_names = {port["name"] for port in service["spec"]["ports"]}
    assert {endpoint["port"] for endpoint in monitor["spec"]["endpoints"]} <= port_names
    job = labels[monitor["spec"]["jobLabel"]]
    assert job == "push-relay"
    assert all(f'job="{job}"' in rule["expr"] for rule in rules() if "up{" in rule["expr"])


def test_component_lists_files_that_exist() -> None:
    (component,) = _docs(MONITORING / "kustomization.yaml")
    assert component["kind"] == "Component"
    files = component["resources"] + [
        f for g in component["configMapGenerator"] for f in g["files"]
    ]
    for name in files:
        assert (MONITORING / name).is_file(), name


async def test_inflight_requests_and_their_limit_are_exported(  # type: ignore[no-untyped-def]
    start_relay, fake_apns: FakeAPNs, apns_key: ApnsKey
) -> None:
    config = local_config([apns_app(fake_apns, apns_key)], limits=Limits(max_inflight_requests=7))
    server: RelayServer = await start_relay(config)
    fake_apns.delay(0.5)
    async with RelayClient(f"127.0.0.1:{server.port}") as client:
        calls = [
            asyncio.ensure_future(client.send(request(apns_token()), timeout=5)) for _ in range(3)
        ]
        await until(lambda: len(fake_apns.received) == 3)
        during = _samples(await scrape(server))
        results = await asyncio.gather(*calls)
    after = _samples(await scrape(server))
    assert during["pushrelay_inflight_requests"] == 3
    assert during["pushrelay_inflight_requests_limit"] == 7
    assert after["pushrelay_inflight_requests"] == 0
    assert all(r.results[0].outcome == pb.DELIVERED for r in results)
    delivered = 'pushrelay_app_notifications_total{app="chat-ios",outcome="DELIVERED"}'
    assert after[delivered] == 3


def _samples(exposition: str) -> dict[str, float]:
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in exposition.splitlines()
        if line and not line.startswith("#")
    }


async def until(predicate: Callable[[], bool]) -> None:
    for _ in range(1000):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("never happened")
