"""The Workspace API at admission: the real apiserver with our CRD, driven by the real kubectl."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from typing import Any

import pytest
import yaml

from shared.api.crd import (
    CHART_CRD_PATH,
    CRD_PATH,
    SchemaDrift,
    _model_in,
    crd,
    describe,
    render,
    workspace_schema,
)
from shared.api.policy import CHART_POLICY_PATH, POLICY_PATH, url_documents
from shared.api.policy import render as render_policy
from shared.api.workspace import Workspace, WorkspaceV1Alpha1, WorkspaceV1Beta1
from tests.conftest import SEEDS, Kubectl

pytestmark = pytest.mark.controlplane

Obj = dict[str, Any]


def inference_ws(name: str = "ws") -> Obj:
    return {
        "apiVersion": "kaito.sh/v1alpha1",
        "kind": "Workspace",
        "metadata": {"name": name},
        "resource": {"instanceType": "Standard_NC6s_v3", "labelSelector": {"matchLabels": {"apps": "x"}}},
        "inference": {
            "preset": {"name": "phi-3-mini-4k-instruct"},
            "adapters": [{"source": {"name": "a1", "image": "reg.example/a1:1"}, "strength": "0.5"}],
        },
    }


def tuning_ws(name: str = "ws") -> Obj:
    return {
        "apiVersion": "kaito.sh/v1beta1",
        "kind": "Workspace",
        "metadata": {"name": name},
        "resource": {"instanceType": "Standard_NC6s_v3", "labelSelector": {"matchLabels": {"app": "t"}}},
        "tuning": {
            "preset": {"name": "phi-3-mini-128k-instruct"},
            "method": "qlora",
            "input": {"urls": ["https://data.example/train.parquet"]},
            "output": {"image": "reg.example/out:1", "imagePushSecret": "push"},
        },
    }


def edit(base: Callable[[], Obj], change: Callable[[Obj], None]) -> Obj:
    obj = copy.deepcopy(base())
    change(obj)
    return obj


def drop(path: str) -> Callable[[Obj], None]:
    def run(obj: Obj) -> None:
        *parents, last = path.split(".")
        for part in parents:
            obj = obj[int(part)] if part.isdigit() else obj[part]
        del obj[last]

    return run


def setv(path: str, value: Any) -> Callable[[Obj], None]:
    def run(obj: Obj) -> None:
        *parents, last = path.split(".")
        for part in parents:
            obj = obj[int(part)] if part.isdigit() else obj.setdefault(part, {})
        obj[last] = value

    return run


def both(*changes: Callable[[Obj], None]) -> Callable[[Obj], None]:
    def run(obj: Obj) -> None:
        for change in changes:
            change(obj)

    return run


# (id, manifest, a piece of the message kubectl must print)
INVALID: list[tuple[str, Obj, str]] = [
    (
        "neither-inference-nor-tuning",
        edit(inference_ws, drop("inference")),
        "exactly one of inference or tuning",
    ),
    (
        "both-inference-and-tuning",
        edit(inference_ws, setv("tuning", tuning_ws()["tuning"])),
        "exactly one of inference or tuning",
    ),
    ("no-resource", edit(inference_ws, drop("resource")), "resource: Required value"),
    (
        "no-label-selector",
        edit(inference_ws, drop("resource.labelSelector")),
        "labelSelector: Required value",
    ),
    (
        "empty-label-selector",
        edit(inference_ws, setv("resource.labelSelector", {})),
        "labelSelector must select something",
    ),
    (
        "partition-mig-with-count",  # KAITO's validatePartition, from here on
        edit(inference_ws, setv("resource.partition", {"mode": "mig", "profile": "1g.10gb", "count": 2})),
        "count is only valid for accelerator mode",
    ),
    (
        "partition-mig-unknown-profile",
        edit(inference_ws, setv("resource.partition", {"mode": "mig", "profile": "9g.1tb"})),
        "unknown MIG profile: must be one of 1g.10gb",
    ),
    (
        "partition-accelerator-with-profile",
        edit(inference_ws, setv("resource.partition", {"mode": "accelerator", "profile": "x", "count": 2})),
        "profile is not valid for accelerator mode",
    ),
    (
        "partition-accelerator-without-count",
        edit(inference_ws, setv("resource.partition", {"mode": "accelerator"})),
        "partition.count: Required value",
    ),
    (
        "partition-unknown-mode",
        edit(inference_ws, setv("resource.partition", {"mode": "mps"})),
        'Unsupported value: "mps"',
    ),
    (
        "partition-for-tuning",
        edit(tuning_ws, setv("resource.partition", {"mode": "accelerator", "count": 1})),
        "GPU partitioning is not supported for tuning workloads",
    ),
    (
        "selector-of-reserved-labels-only",  # KAITO's rule: they are ignored, so it would select nothing
        edit(inference_ws, setv("resource.labelSelector.matchLabels", {"kaito.sh/workspace": "other"})),
        "matchLabels must contain at least one non-reserved label",
    ),
    (
        "selector-of-reserved-expressions-only",  # dropped, they would leave a selector of every node
        edit(
            inference_ws,
            setv(
                "resource.labelSelector",
                {"matchExpressions": [{"key": "kaito.sh/workspace", "operator": "In", "values": ["other"]}]},
            ),
        ),
        "must select something besides the labels Kaiten and KAITO put on their own nodes",
    ),
    (
        "selector-in-without-values",
        edit(inference_ws, setv("resource.labelSelector.matchExpressions", [{"key": "a", "operator": "In"}])),
        "operators In/NotIn need values",
    ),
    (
        "selector-exists-with-values",
        edit(
            inference_ws,
            setv(
                "resource.labelSelector.matchExpressions",
                [{"key": "a", "operator": "Exists", "values": ["x"]}],
            ),
        ),
        "Exists/DoesNotExist take none",
    ),
    (
        "selector-bad-operator",
        edit(
            inference_ws,
            setv(
                "resource.labelSelector.matchExpressions", [{"key": "a", "operator": "Near", "values": ["x"]}]
            ),
        ),
        'Unsupported value: "Near"',
    ),
    ("count-zero", edit(inference_ws, setv("resource.count", 0)), "should be greater than or equal to 1"),
    ("count-not-a-number", edit(inference_ws, setv("resource.count", "two")), "must be of type integer"),
    ("count-too-large", edit(inference_ws, setv("resource.count", 1000)), "less than or equal to 64"),
    (
        "instance-type-with-spaces",
        edit(inference_ws, setv("resource.instanceType", "Standard NC6s")),
        "resource.instanceType must look like Standard_NC6s_v3",
    ),
    (
        "preferred-nodes-duplicate",
        edit(inference_ws, setv("resource.preferredNodes", ["n1", "n1"])),
        "Duplicate value",
    ),
    (
        "preset-and-template",
        edit(inference_ws, setv("inference.template", {"spec": {"containers": []}})),
        "inference needs exactly one of preset or template",
    ),
    (
        "neither-preset-nor-template",
        edit(inference_ws, both(drop("inference.preset"), drop("inference.adapters"))),
        "inference needs exactly one of preset or template",
    ),
    (
        "adapters-with-template",
        edit(inference_ws, both(drop("inference.preset"), setv("inference.template", {"spec": {}}))),
        "inference.adapters apply to a preset model",
    ),
    ("empty-preset-name", edit(inference_ws, setv("inference.preset.name", "")), "at least 1 chars long"),
    (
        "preset-name-with-spaces",
        edit(inference_ws, setv("inference.preset.name", "phi 3")),
        "inference.preset.name must be a preset name",
    ),
    (
        "private-preset-without-image",
        edit(inference_ws, setv("inference.preset.accessMode", "private")),
        "accessMode private needs presetOptions.image",
    ),
    (
        "bad-access-mode",
        edit(inference_ws, setv("inference.preset.accessMode", "secret")),
        'Unsupported value: "secret"',
    ),
    (
        "strength-above-one",
        edit(inference_ws, setv("inference.adapters.0.strength", "1.5")),
        "strength must be a number between 0 and 1",
    ),
    (
        "strength-not-a-number",
        edit(inference_ws, setv("inference.adapters.0.strength", "high")),
        "strength must be a number between 0 and 1",
    ),
    (
        "strength-negative",
        edit(inference_ws, setv("inference.adapters.0.strength", "-0.1")),
        "strength must be a number between 0 and 1",
    ),
    (
        "adapter-without-image",  # KAITO's "Either Image or Volume must be specified"
        edit(inference_ws, drop("inference.adapters.0.source.image")),
        "inference.adapters[].source needs exactly one of image or volumeSource",
    ),
    (
        "adapter-with-image-and-volume",
        edit(inference_ws, setv("inference.adapters.0.source.volumeSource", {"emptyDir": {}})),
        "inference.adapters[].source needs exactly one of image or volumeSource",
    ),
    (
        "adapter-bad-name",
        edit(inference_ws, setv("inference.adapters.0.source.name", "My Adapter")),
        "source.name must be lowercase letters",
    ),
    (
        "adapter-names-not-unique",
        edit(
            inference_ws,
            setv(
                "inference.adapters",
                [{"source": {"name": "a", "image": "r/a:1"}}, {"source": {"name": "a", "image": "r/b:1"}}],
            ),
        ),
        "source.name must be unique",
    ),
    (
        "adapter-image-with-spaces",
        edit(inference_ws, setv("inference.adapters.0.source.image", "r/a 1")),
        "must be an image reference without spaces",
    ),
    (
        "bad-workspace-name",
        edit(inference_ws, setv("metadata.name", "ws.with.dots")),
        "metadata.name must be a DNS label",
    ),
    (
        "unknown-field-typo",
        edit(inference_ws, setv("resource.instancetype", "Standard_NC6s_v3")),
        'unknown field "resource.instancetype"',
    ),
    ("tuning-bad-method", edit(tuning_ws, setv("tuning.method", "full")), 'Unsupported value: "full"'),
    ("tuning-without-preset", edit(tuning_ws, drop("tuning.preset")), "preset: Required value"),
    ("tuning-without-input", edit(tuning_ws, drop("tuning.input")), "input: Required value"),
    (
        "tuning-input-urls-and-image",
        edit(tuning_ws, setv("tuning.input.image", "r/data:1")),
        "tuning.input needs exactly one of urls, image or volumeSource",
    ),
    (
        "tuning-input-empty",
        edit(tuning_ws, setv("tuning.input", {})),
        "tuning.input needs exactly one of urls, image or volumeSource",
    ),
    (
        "tuning-input-ftp-url",
        edit(tuning_ws, setv("tuning.input.urls", ["ftp://data.example/x.parquet"])),
        "tuning.input.urls must be http:// or https:// URLs",
    ),
    (
        "tuning-input-file-url",
        edit(tuning_ws, setv("tuning.input.urls", ["file:///etc/passwd"])),
        "tuning.input.urls must be http:// or https:// URLs",
    ),
    ("tuning-input-no-urls", edit(tuning_ws, setv("tuning.input.urls", [])), "should have at least 1 items"),
    (
        "tuning-output-image-without-secret",
        edit(tuning_ws, drop("tuning.output.imagePushSecret")),
        "tuning.output.image needs tuning.output.imagePushSecret",
    ),
    (
        "tuning-output-image-and-volume",
        edit(tuning_ws, setv("tuning.output.volumeSource", {"emptyDir": {}})),
        "tuning.output needs exactly one of image or volumeSource",
    ),
    (
        "tuning-output-empty",
        edit(tuning_ws, setv("tuning.output", {})),
        "tuning.output needs exactly one of image or volumeSource",
    ),
    ("tuning-multi-node", edit(tuning_ws, setv("resource.count", 2)), "tuning runs on a single node"),
    (
        "pull-secret-with-space",
        edit(inference_ws, setv("inference.preset.presetOptions.imagePullSecrets", ["has space"])),
        "must be a Secret name without spaces",
    ),
]

# (id, first manifest, changed manifest, message)
TEMPLATE_WS = edit(
    inference_ws,
    both(
        drop("inference.adapters"),
        drop("inference.preset"),
        setv("inference.template", {"spec": {"containers": [{"name": "m", "image": "r/m:1"}]}}),
    ),
)

IMMUTABLE: list[tuple[str, Obj, Obj, str]] = [
    (
        "instance-type",
        inference_ws(),
        edit(inference_ws, setv("resource.instanceType", "Standard_NC12s_v3")),
        "resource.instanceType is immutable",
    ),
    (
        "instance-type-removed",
        inference_ws(),
        edit(inference_ws, drop("resource.instanceType")),
        "resource.instanceType is immutable",
    ),
    (
        "partition",
        edit(inference_ws, setv("resource.partition", {"mode": "accelerator", "count": 2})),
        edit(inference_ws, setv("resource.partition", {"mode": "accelerator", "count": 4})),
        "resource.partition: field is immutable",
    ),
    (
        "partition-added",
        inference_ws(),
        edit(inference_ws, setv("resource.partition", {"mode": "mig", "profile": "1g.10gb"})),
        "resource.partition: field is immutable",
    ),
    (
        "label-selector",
        inference_ws(),
        edit(inference_ws, setv("resource.labelSelector.matchLabels", {"apps": "y"})),
        "resource.labelSelector is immutable",
    ),
    (
        "inference-preset",
        inference_ws(),
        edit(inference_ws, setv("inference.preset.name", "mistral-7b")),
        "inference.preset.name is immutable",
    ),
    (
        "tuning-preset",
        tuning_ws(),
        edit(tuning_ws, setv("tuning.preset.name", "phi-4")),
        "tuning.preset.name is immutable",
    ),
    ("inference-to-tuning", inference_ws(), tuning_ws(), "cannot switch between inference and tuning"),
    # KAITO's update rules (issue 18): the whole preset, the template's presence, tuning's method and
    # input name
    (
        "preset-options",
        inference_ws(),
        edit(inference_ws, setv("inference.preset.presetOptions", {"modelAccessSecret": "hf"})),
        "inference.preset is immutable (presetOptions, accessMode)",
    ),
    (
        "template-to-preset",
        TEMPLATE_WS,
        edit(inference_ws, drop("inference.adapters")),
        "inference.template cannot be set or unset",
    ),
    (
        "tuning-method",
        tuning_ws(),
        edit(tuning_ws, setv("tuning.method", "lora")),
        "tuning.method is immutable",
    ),
    (
        "tuning-input-name",
        edit(tuning_ws, setv("tuning.input.name", "first")),
        edit(tuning_ws, setv("tuning.input.name", "second")),
        "tuning.input.name is immutable",
    ),
]


def test_there_are_at_least_30_invalid_manifests() -> None:
    assert len(INVALID) >= 30
    assert len({case[0] for case in INVALID}) == len(INVALID)


@pytest.mark.parametrize(("case", "manifest", "message"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_manifest_is_rejected_with_its_message(
    kubectl: Kubectl, namespace: str, case: str, manifest: Obj, message: str
) -> None:
    result = kubectl.run("apply", "-n", namespace, "-f", "-", stdin=json.dumps(manifest))
    assert result.returncode != 0, f"{case} was accepted"
    assert message in result.stderr, f"{case}: expected {message!r} in:\n{result.stderr}"
    # nothing half-created
    assert kubectl.run("get", "workspace", "-n", namespace, "-o", "name").stdout.strip() == ""


@pytest.mark.parametrize(("case", "first", "changed", "message"), IMMUTABLE, ids=[c[0] for c in IMMUTABLE])
def test_immutable_fields_cannot_change(
    kubectl: Kubectl, namespace: str, case: str, first: Obj, changed: Obj, message: str
) -> None:
    kubectl.run("apply", "-n", namespace, "-f", "-", stdin=json.dumps(first), check=True)
    result = kubectl.run("apply", "-n", namespace, "-f", "-", stdin=json.dumps(changed))
    assert result.returncode != 0, f"{case}: change was accepted"
    assert message in result.stderr, result.stderr


VALID: list[tuple[str, Obj]] = [
    ("inference-base", inference_ws()),
    (
        "adapter-from-a-volume",
        edit(
            inference_ws,
            both(
                drop("inference.adapters.0.source.image"),
                setv("inference.adapters.0.source.volumeSource", {"hostPath": {"path": "/srv/a"}}),
            ),
        ),
    ),
    ("partition-mig", edit(inference_ws, setv("resource.partition", {"mode": "mig", "profile": "3g.40gb"}))),
    (
        "partition-accelerator",
        edit(inference_ws, setv("resource.partition", {"mode": "accelerator", "count": 2})),
    ),
    ("no-instance-type", edit(inference_ws, drop("resource.instanceType"))),
    (
        "match-expressions-only",
        edit(
            inference_ws,
            setv("resource.labelSelector", {"matchExpressions": [{"key": "a", "operator": "Exists"}]}),
        ),
    ),
    (
        "template-instead-of-preset",
        edit(
            inference_ws,
            both(
                drop("inference.adapters"),
                drop("inference.preset"),
                setv("inference.template", {"spec": {"containers": [{"name": "m", "image": "r/m:1"}]}}),
            ),
        ),
    ),
    ("strength-zero", edit(inference_ws, setv("inference.adapters.0.strength", "0"))),
    ("strength-one-point-zero", edit(inference_ws, setv("inference.adapters.0.strength", "1.0"))),
    ("strength-fraction", edit(inference_ws, setv("inference.adapters.0.strength", ".25"))),
    (
        "private-with-image",
        edit(
            inference_ws,
            setv(
                "inference.preset",
                {
                    "name": "phi-3-mini-4k-instruct",
                    "accessMode": "private",
                    "presetOptions": {"image": "r/p:1"},
                },
            ),
        ),
    ),
    ("tuning-base", tuning_ws()),
    ("tuning-http-url", edit(tuning_ws, setv("tuning.input.urls", ["http://127.0.0.1:8000/d.parquet"]))),
    ("tuning-input-image", edit(tuning_ws, setv("tuning.input", {"image": "r/data:1"}))),
    ("tuning-output-volume", edit(tuning_ws, setv("tuning.output", {"volumeSource": {"emptyDir": {}}}))),
    ("v1beta1-inference", edit(inference_ws, setv("apiVersion", "kaito.sh/v1beta1"))),
]


@pytest.mark.parametrize(("case", "manifest"), VALID, ids=[c[0] for c in VALID])
def test_valid_variant_is_accepted(kubectl: Kubectl, namespace: str, case: str, manifest: Obj) -> None:
    result = kubectl.run("apply", "-n", namespace, "-f", "-", stdin=json.dumps(manifest))
    assert result.returncode == 0, f"{case}: {result.stderr}"
    stored = kubectl.json("get", "workspace", manifest["metadata"]["name"], "-n", namespace)
    model = Workspace.model_validate(stored)
    assert model.metadata.name == manifest["metadata"]["name"]
    if "tuning" in manifest:
        assert model.tuning is not None and model.tuning.method == manifest["tuning"].get("method", "lora")


def test_tuning_method_defaults_to_lora(kubectl: Kubectl, namespace: str) -> None:
    kubectl.run(
        "apply",
        "-n",
        namespace,
        "-f",
        "-",
        stdin=json.dumps(edit(tuning_ws, drop("tuning.method"))),
        check=True,
    )
    assert kubectl.json("get", "workspace", "ws", "-n", namespace)["tuning"]["method"] == "lora"


def test_allowed_updates_bump_generation(kubectl: Kubectl, namespace: str) -> None:
    kubectl.run("apply", "-n", namespace, "-f", "-", stdin=json.dumps(inference_ws()), check=True)
    kubectl.run(
        "apply",
        "-n",
        namespace,
        "-f",
        "-",
        check=True,
        stdin=json.dumps(edit(inference_ws, setv("inference.adapters.0.strength", "0.7"))),
    )
    assert kubectl.json("get", "workspace", "ws", "-n", namespace)["metadata"]["generation"] == 2


def test_a_template_may_change_as_in_kaito(kubectl: Kubectl, namespace: str) -> None:
    kubectl.run("apply", "-n", namespace, "-f", "-", stdin=json.dumps(TEMPLATE_WS), check=True)
    changed = copy.deepcopy(TEMPLATE_WS)
    changed["inference"]["template"]["spec"]["containers"][0]["image"] = "r/m:2"
    kubectl.run("apply", "-n", namespace, "-f", "-", stdin=json.dumps(changed), check=True)
    assert kubectl.json("get", "workspace", "ws", "-n", namespace)["metadata"]["generation"] == 2


def test_seed_manifests_apply_unchanged_and_show_seed_columns(kubectl: Kubectl, namespace: str) -> None:
    seeds = sorted(SEEDS.glob("*.yaml"))
    assert len(seeds) == 3
    for path in seeds:
        result = kubectl.run("apply", "-n", namespace, "-f", str(path))
        assert result.returncode == 0, f"{path.name}: {result.stderr}"
    header = kubectl.run("get", "workspace", "-n", namespace, check=True).stdout.splitlines()[0].split()
    assert header == ["NAME", "INSTANCE", "RESOURCEREADY", "INFERENCEREADY", "WORKSPACEREADY", "AGE"]
    wide = (
        kubectl.run("get", "workspace", "-n", namespace, "-o", "wide", check=True)
        .stdout.splitlines()[0]
        .split()
    )
    assert wide[:6] == header and "JOBSTARTED" in wide
    for path in seeds:
        doc = yaml.safe_load(path.read_text())
        stored = kubectl.json("get", "workspace", doc["metadata"]["name"], "-n", namespace)
        assert (
            WorkspaceV1Alpha1.model_validate(
                {**stored, "apiVersion": "kaito.sh/v1alpha1"}
            ).resource.instance_type
            == "Standard_NC6s_v3"
        )
        beta = kubectl.json("get", f"workspaces.v1beta1.kaito.sh/{doc['metadata']['name']}", "-n", namespace)
        assert (
            WorkspaceV1Beta1.model_validate(beta).preset_name
            == (doc.get("inference") or doc["tuning"])["preset"]["name"]
        )


ANNOTATED = [  # (annotation, a value KAITO refuses, KAITO's message gist, a value it takes)
    ("kaito.sh/performance-mode", "fast", '"fast" is not a valid performance mode; choose one of: balanced, '
     "interactivity, throughput", "throughput"),
    ("kaito.sh/use-local-weights", "yes", '"yes" must be "true" or "false"', "false"),
    ("kaito.sh/node-image-family", "windows", 'unsupported node image family "windows", supported values are '
     "ubuntu, azurelinux", " AzureLinux "),
]  # fmt: skip


def annotated(name: str, **annotations: str) -> str:
    doc = inference_ws(name)
    doc["metadata"]["annotations"] = annotations
    return json.dumps(doc)


def admission_policy_active(kubectl: Kubectl, namespace: str) -> None:
    """The apiserver takes a new policy up within a second or so: wait until a dry run is refused."""
    deadline = time.monotonic() + 30
    probe = annotated("probe", **{"kaito.sh/use-local-weights": "x"})
    while kubectl.run("apply", "--dry-run=server", "-n", namespace, "-f", "-", stdin=probe).returncode == 0:
        assert time.monotonic() < deadline, "the ValidatingAdmissionPolicy never took effect"
        time.sleep(0.3)
    status = kubectl.json("get", "validatingadmissionpolicy", "workspaces.kaito.sh").get("status", {})
    assert not status.get("typeChecking", {}).get("expressionWarnings"), status  # CEL type-checks clean


@pytest.mark.parametrize(("key", "bad", "message", "good"), ANNOTATED, ids=[a[0] for a in ANNOTATED])
def test_kaitos_annotation_values_are_checked_at_admission(
    kubectl: Kubectl, namespace: str, key: str, bad: str, message: str, good: str
) -> None:
    """KAITO's webhook checks these values on create; the ValidatingAdmissionPolicy does, and also a
    value an update sets or changes. An update that leaves the value alone is not re-checked."""
    admission_policy_active(kubectl, namespace)
    refused = kubectl.run("apply", "-n", namespace, "-f", "-", stdin=annotated("bad", **{key: bad}))
    assert refused.returncode != 0, refused.stdout
    assert f"metadata.annotations[{key}]: {message}" in refused.stderr, refused.stderr
    assert "ValidatingAdmissionPolicy 'workspaces.kaito.sh'" in refused.stderr
    kubectl.run("apply", "-n", namespace, "-f", "-", stdin=annotated("good", **{key: good}), check=True)
    changed = kubectl.run("annotate", "workspace", "good", "-n", namespace, "--overwrite", f"{key}={bad}")
    assert changed.returncode != 0 and message in changed.stderr, changed.stderr
    kubectl.run("label", "workspace", "good", "-n", namespace, "team=a", check=True)  # value untouched
    got = kubectl.json("get", "workspace", "good", "-n", namespace)["metadata"]["annotations"]
    assert got[key] == good


def test_committed_admission_policy_is_generated_from_the_definition() -> None:
    assert POLICY_PATH.read_text() == render_policy(), "run: python -m shared.api.policy"
    assert CHART_POLICY_PATH.read_text() == render_policy(cluster=True), "run: python -m shared.api.policy"


@pytest.mark.parametrize(
    ("address", "refused"),
    [
        ("localhost:8080", "local or metadata endpoint"),
        ("data.localhost", "local or metadata endpoint"),
        ("metadata.google.internal", "local or metadata endpoint"),
        ("127.0.0.1:8310", "loopback, private, or link-local address"),
        ("[::1]", "loopback, private, or link-local address"),
        ("169.254.169.254", "loopback, private, or link-local address"),  # the cloud metadata address
        ("10.1.2.3", "loopback, private, or link-local address"),
        ("172.20.0.5", "loopback, private, or link-local address"),
        ("192.168.1.10", "loopback, private, or link-local address"),
        ("[fd00::1]", "loopback, private, or link-local address"),
        ("data.example", None),
        ("8.8.8.8", None),
        ("[2001:db8::1]", None),
    ],
)
def test_kaitos_tuning_url_rules_at_admission_in_a_cluster(
    kubectl: Kubectl, namespace: str, address: str, refused: str | None
) -> None:
    """KAITO's validateDataSourceURL as a ValidatingAdmissionPolicy, which the chart installs
    (``kaiten up`` does not: its examples download from this machine). Bound here to this test's
    namespace only, as the session's apiserver is shared."""
    docs = url_documents({"matchLabels": {"kubernetes.io/metadata.name": namespace}})
    kubectl.run("apply", "-f", "-", stdin=yaml.safe_dump_all(docs), check=True)
    try:
        ws = edit(tuning_ws, setv("tuning.input.urls", [f"http://{address}/train.parquet"]))
        deadline = time.monotonic() + 30
        while True:  # the apiserver takes a new policy up within a second or so
            probe = edit(tuning_ws, setv("tuning.input.urls", ["http://localhost/x"]))
            if kubectl.run(
                "apply", "--dry-run=server", "-n", namespace, "-f", "-", stdin=json.dumps(probe)
            ).returncode:
                break
            assert time.monotonic() < deadline, "the URL policy never took effect"
            time.sleep(0.3)
        result = kubectl.run("apply", "--dry-run=server", "-n", namespace, "-f", "-", stdin=json.dumps(ws))
        if refused is None:
            assert result.returncode == 0, result.stderr
        else:
            assert (
                result.returncode != 0
                and f"tuning.input.urls: data source URL must not target a {refused}" in result.stderr
            ), result.stderr
    finally:
        kubectl.run("delete", "-f", "-", stdin=yaml.safe_dump_all(docs), check=True)


def test_committed_crd_is_generated_from_the_definition() -> None:
    assert CRD_PATH.read_text() == render(), "run: python -m shared.api.crd"
    assert CHART_CRD_PATH.read_text() == render(), "run: python -m shared.api.crd (the chart's copy)"


def _model_description(path: str) -> str:
    """The description of a dotted field path in the pydantic models (the CRD's one source)."""
    model: Any = Workspace
    description = ""
    for key in path.split("."):
        field = next(f for name, f in model.model_fields.items() if (f.alias or name) == key)
        description = field.description or ""
        model = _model_in(field.annotation)
    return " ".join(description.split())


@pytest.mark.parametrize(
    "path",
    [
        "inference.adapters",
        "inference.adapters.strength",
        "inference.preset.presetOptions.modelAccessSecret",
        "resource.labelSelector.matchExpressions.operator",
        "tuning.input.urls",
        "status.state",
    ],
)
def test_kubectl_explain_describes_nested_fields(kubectl: Kubectl, path: str) -> None:
    out = kubectl.run("explain", f"workspaces.{path}", check=True).stdout
    expected = _model_description(path)
    assert len(expected) > 20
    assert expected in " ".join(out.split()), out


def test_short_names_and_kaitos_category_list_workspaces(kubectl: Kubectl, namespace: str) -> None:
    kubectl.run("apply", "-n", namespace, "-f", "-", check=True, stdin=json.dumps(inference_ws("short")))
    for resource in ("wk", "wks", "workspace"):  # "workspace" is also KAITO's category
        names = kubectl.run("get", resource, "-n", namespace, "-o", "name", check=True).stdout.split()
        assert names == ["workspace.kaito.sh/short"], (resource, names)
    assert "workspace.kaito.sh/short" in kubectl.run("get", "kaito", "-n", namespace, "-o", "name").stdout


def test_every_crd_field_is_described_from_the_models() -> None:
    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    undescribed: list[str] = []

    def walk(node: Obj, path: str) -> None:
        for key, sub in (node.get("properties") or {}).items():
            if not sub.get("description") and path + key != "metadata":  # Kubernetes' own, not ours
                undescribed.append(path + key)
            walk(sub.get("items", sub), f"{path}{key}.")

    walk(schema, "")
    assert undescribed == []
    broken = copy.deepcopy(workspace_schema())
    broken["properties"]["resource"]["properties"]["newField"] = {"type": "string"}
    with pytest.raises(SchemaDrift, match="only in the CRD: \\['newField'\\]"):
        describe(broken, Workspace)
