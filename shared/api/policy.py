"""KAITO's annotation checks at admission: a ValidatingAdmissionPolicy on Workspaces.

A CRD's own CEL rules see only ``metadata.name`` of the object, so KAITO's ``kaito.sh/*`` annotation
checks (its webhook's ``validateAnnotations`` and ``validateNodeImageFamilyAnnotation``) live in a
ValidatingAdmissionPolicy: CEL over the whole object, run by the apiserver itself (GA in Kubernetes
1.30), no webhook to deploy. KAITO checks them when a Workspace is created; this policy also checks a
value set or changed by an update, so a bad value cannot be added later. A value that was already
there is never re-checked, so an object admitted before the policy existed can still be updated (its
finalizer removed, say).

Run ``python -m shared.api.policy`` to regenerate ``deploy/admission/workspaces.kaito.sh.yaml`` and the
chart's copy; a test fails if they are stale. It is applied wherever the CRD is (``kaiten up``, the
chart, the tests' apiserver).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

from shared.api.crd import GROUP, PLURAL
from shared.api.workspace import NODE_IMAGE_FAMILIES, NODE_IMAGE_FAMILY_ANNOTATION

NAME = f"{PLURAL}.{GROUP}"
POLICY_PATH = Path(__file__).resolve().parents[2] / "deploy" / "admission" / f"{NAME}.yaml"
CHART_POLICY_PATH = POLICY_PATH.parents[1] / "helm" / "kaiten" / "templates" / "admission-policy.yaml"

PERFORMANCE_MODES = ("balanced", "interactivity", "throughput")  # KAITO's PerformanceMode*


def _annotation(key: str, valid: str, problem: str) -> dict[str, str]:
    """A check of annotation ``key``: its value ``{v}`` must satisfy ``valid`` (CEL) unless an update
    left it as it was; ``problem`` (a CEL string over ``{v}``) is KAITO's message, after the field."""
    value = f"variables.annotations['{key}']"
    unchanged = f"('{key}' in variables.old && variables.old['{key}'] == {value})"
    return {
        "expression": f"!('{key}' in variables.annotations) || {unchanged} || {valid.replace('{v}', value)}",
        "messageExpression": f"'metadata.annotations[{key}]: ' + {problem.replace('{v}', value)}",
        "reason": "Invalid",
    }


def _quoted(values: tuple[str, ...]) -> str:
    return "[" + ", ".join(f"'{v}'" for v in values) + "]"


def validations() -> list[dict[str, str]]:
    return [
        _annotation(
            "kaito.sh/performance-mode",
            f"{{v}} in {_quoted(PERFORMANCE_MODES)}",
            "'\"' + {v} + '\" is not a valid performance mode; choose one of: "
            + ", ".join(PERFORMANCE_MODES)
            + "'",
        ),
        _annotation(
            "kaito.sh/use-local-weights",
            "{v} in ['true', 'false']",
            '\'"\' + {v} + \'" must be "true" or "false"\'',
        ),
        _annotation(
            NODE_IMAGE_FAMILY_ANNOTATION,
            f"{{v}}.trim().lowerAscii() in {_quoted(NODE_IMAGE_FAMILIES)}",
            "'unsupported node image family \"' + {v} + '\", supported values are "
            + ", ".join(NODE_IMAGE_FAMILIES)
            + "'",
        ),
    ]


URLS_NAME = f"urls.{PLURAL}.{GROUP}"
METADATA_HOSTS = ("metadata.google.internal", "metadata.google", "instance-data.ec2.internal")
PRIVATE = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")  # Go's net.IP.IsPrivate


def url_validations() -> list[dict[str, str]]:
    """KAITO's ``validateDataSourceURL`` for a tuning Workspace's input URLs, as CEL (Kubernetes' URL and
    IP libraries): no localhost or cloud-metadata name, no loopback, private or link-local address.
    The job checks every address again when it downloads (a name could resolve to anything)."""
    each = "!has(object.tuning) || !has(object.tuning.input.urls) || object.tuning.input.urls.all(u, {})"
    host = "url(u).getHostname().lowerAscii()"
    names = f"!({host} == 'localhost' || {host}.endsWith('.localhost') || {host} in {list(METADATA_HOSTS)})"
    private = " || ".join(f"cidr('{c}').containsIP(ip({host}))" for c in PRIVATE)
    addresses = (
        f"!isIP({host}) || !(ip({host}).isLoopback() || ip({host}).isLinkLocalUnicast() || "
        f"ip({host}).isLinkLocalMulticast() || {private})"
    )
    return [
        {
            "expression": each.format(names),
            "message": "tuning.input.urls: data source URL must not target a local or metadata endpoint",
            "reason": "Invalid",
        },
        {
            "expression": each.format(addresses),
            "message": "tuning.input.urls: data source URL must not target a loopback, private, or "
            "link-local address",
            "reason": "Invalid",
        },
    ]


def _policy_and_binding(
    name: str,
    validations: list[dict[str, str]],
    variables: list[dict[str, str]] | None = None,
    namespaces: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """A ValidatingAdmissionPolicy on Workspace creates and updates, and its denying binding
    (``namespaces``: a namespaceSelector; all namespaces when None)."""
    spec: dict[str, Any] = {
        "failurePolicy": "Fail",
        "matchConstraints": {
            "resourceRules": [
                {
                    "apiGroups": [GROUP],
                    "apiVersions": ["*"],
                    "operations": ["CREATE", "UPDATE"],
                    "resources": [PLURAL],
                }
            ]
        },
    }
    if variables:
        spec["variables"] = variables
    spec["validations"] = validations
    policy = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": name},
        "spec": spec,
    }
    binding: dict[str, Any] = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": name},
        "spec": {"policyName": name, "validationActions": ["Deny"]},
    }
    if namespaces is not None:
        binding["spec"]["matchResources"] = {"namespaceSelector": namespaces}
    return [policy, binding]


def url_documents(namespaces: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The URL policy and its binding (``namespaces``: a namespaceSelector; all namespaces when None).
    A cluster install applies it; ``kaiten up`` does not, since its local examples download from this
    machine (the job's own check admits loopback there: ``KAITEN_ALLOW_LOOPBACK_URLS``)."""
    return _policy_and_binding(URLS_NAME, url_validations(), namespaces=namespaces)


def documents() -> list[dict[str, Any]]:
    """The annotation policy and its binding."""
    variables = [
        {
            "name": "annotations",
            "expression": "has(object.metadata.annotations) ? object.metadata.annotations : {}",
        },
        {  # an update's previous annotations; none on a create
            "name": "old",
            "expression": "request.operation == 'UPDATE' && has(oldObject.metadata.annotations) "
            "? oldObject.metadata.annotations : {}",
        },
    ]
    return _policy_and_binding(NAME, validations(), variables)


def render(*, cluster: bool = False) -> str:
    """The annotation policy; with ``cluster``, the URL policy too (what the chart installs)."""
    header = "# Generated by `python -m shared.api.policy`; do not edit by hand.\n"
    docs = documents() + (url_documents() if cluster else [])
    return header + yaml.safe_dump_all(docs, sort_keys=False, width=120)


if __name__ == "__main__":
    for path, cluster in ((POLICY_PATH, False), (CHART_POLICY_PATH, True)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render(cluster=cluster))
        print(f"wrote {path}", file=sys.stderr)
