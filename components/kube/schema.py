"""Validate Kubernetes objects offline against the API's OpenAPI schemas (no cluster needed).

Uses the schemas that the `kubernetes-validate` package ships (generated from the Kubernetes
OpenAPI spec), in their strict form: an unknown field is an error, as `kubectl apply
--validate=strict` makes it on a cluster. Custom resources (a TrainJob, say) have no schema there;
they are reported unless the caller names their kinds in `custom_kinds` (validate those against
their CRD's own schema instead).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

KUBERNETES_VERSION = "1.33"  # the oldest API version our manifests must be valid for


def describe(obj: Mapping[str, Any]) -> str:
    """`Kind/name` of an object, for messages."""
    return f"{obj.get('kind', '?')}/{obj.get('metadata', {}).get('name', '?')}"


def validate_objects(objects: Iterable[Mapping[str, Any]], kubernetes_version: str = KUBERNETES_VERSION,
                     custom_kinds: Iterable[str] = ()) -> list[str]:
    """Problems of `objects` against the Kubernetes schemas (empty when all are valid).

    Each problem names the object, the JSON path of the offending field and the reason.
    """
    import kubernetes_validate

    custom = set(custom_kinds)
    problems = []
    for obj in objects:
        if obj.get("kind") in custom:
            continue
        try:
            kubernetes_validate.validate(dict(obj), kubernetes_version, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = "/".join(str(p) for p in error.absolute_path) or "(object)"
            problems.append(f"{describe(obj)}: {path}: {error.message[:300]}")
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(f"{describe(obj)}: no Kubernetes {kubernetes_version} schema for "
                            f"{obj.get('apiVersion')}/{obj.get('kind')} (a typo, or a custom resource)")
    return problems


def _structural(node: Any) -> Any:
    """A CRD schema as the API server applies it: fields it does not define are pruned, so treat them
    as errors; int-or-string fields already carry their anyOf."""
    if isinstance(node, dict):
        node = {key: _structural(value) for key, value in node.items()}
        if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            node.setdefault("additionalProperties", False)
        return node
    if isinstance(node, list):
        return [_structural(value) for value in node]
    return node


def validate_custom(objects: Iterable[Mapping[str, Any]], crds: Iterable[Mapping[str, Any]]) -> list[str]:
    """Problems of custom resources against their CRDs' openAPIV3Schema (objects of other kinds are skipped)."""
    import jsonschema

    validators = {}
    for crd in crds:
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            validators[(f"{group}/{version['name']}", kind)] = jsonschema.Draft7Validator(
                _structural(version["schema"]["openAPIV3Schema"]))
    problems = []
    for obj in objects:
        validator = validators.get((obj.get("apiVersion"), obj.get("kind")))
        if validator is None:
            continue
        for error in validator.iter_errors(dict(obj)):
            problems.append(f"{describe(obj)}: {'/'.join(map(str, error.absolute_path)) or '(object)'}: "
                            f"{error.message[:300]}")
    return problems
