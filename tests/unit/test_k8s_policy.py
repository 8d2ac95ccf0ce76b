"""Each policy rule fails on a manifest that breaks it (and passes the one that doesn't)."""

from __future__ import annotations

import copy

import pytest

from components.kube.policy import check

GOOD_POD = {
    "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
    "spec": {"selector": {"matchLabels": {"a": "b"}}, "template": {"metadata": {"labels": {"a": "b"}}, "spec": {
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{"name": "web", "image": "ghcr.io/x/web@sha256:" + "c" * 64,
                        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
                        "env": [{"name": "DB_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "db", "key": "pw"}}}]}],
    }}},
}


def _broken(change) -> dict:
    obj = copy.deepcopy(GOOD_POD)
    change(obj["spec"]["template"]["spec"])
    return obj


def test_a_compliant_deployment_passes() -> None:
    assert check([GOOD_POD]) == []


@pytest.mark.parametrize("change, rule, says", [
    (lambda s: s["containers"][0].update(image="ghcr.io/x/web:1.0"), "image-digest", "not pinned by digest"),
    (lambda s: s["securityContext"].pop("seccompProfile"), "restricted", "seccompProfile"),
    (lambda s: s["securityContext"].pop("runAsNonRoot"), "restricted", "runAsNonRoot"),
    (lambda s: s["containers"][0]["securityContext"].update(allowPrivilegeEscalation=True), "restricted",
     "allowPrivilegeEscalation"),
    (lambda s: s["containers"][0]["securityContext"].pop("capabilities"), "restricted", "drop ALL"),
    (lambda s: s["containers"][0]["env"].append({"name": "API_TOKEN", "value": "abc123"}), "literal-secret",
     "API_TOKEN has a literal value"),
    (lambda s: s["containers"][0]["env"].append({"name": "AWS_KEY", "value": "AKIAIOSFODNN7EXAMPLE"}),
     "literal-secret", "AWS access key"),
    (lambda s: s["containers"][0].update(args=["--backend-store-uri=postgresql://mlflow:hunter2@db:5432/mlflow"]),
     "literal-secret", "URI with a password"),
])
def test_each_pod_rule_fails_on_its_violation(change, rule: str, says: str) -> None:
    violations = check([_broken(change)])
    assert [v.rule for v in violations] == [rule] and says in violations[0].message
    assert violations[0].object == "Deployment/web"


def test_committed_secret_values_and_private_keys_are_refused() -> None:
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "db"}, "stringData": {"pw": "x"}}
    config = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "tls"},
              "data": {"key.pem": "-----BEGIN RSA PRIVATE KEY-----\nMIIB..."}}
    assert {(v.object, v.rule) for v in check([secret, config])} == {("Secret/db", "literal-secret"),
                                                                     ("ConfigMap/tls", "literal-secret")}


def test_wildcard_rbac_is_refused() -> None:
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "r"},
            "rules": [{"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get"]},
                      {"apiGroups": [""], "resources": ["*"], "verbs": ["get"]}]}
    (violation,) = check([role])
    assert violation.rule == "rbac-wildcard" and violation.path == "/rules/1/resources"


def test_a_namespace_without_the_restricted_label_is_refused() -> None:
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ml",
                                                                      "labels": {"pod-security.kubernetes.io/enforce": "baseline"}}}
    assert [v.rule for v in check([namespace])] == ["namespace-pss"]
