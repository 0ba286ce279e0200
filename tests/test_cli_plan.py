"""``kaiten plan``: the dry run a user types, through the installed console script; and what every
command has (``--version``, shell completion)."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import yaml

from tests.conftest import SEEDS

KAITEN = Path(sys.executable).parent / "kaiten"


def kaiten(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(KAITEN), *args], input=stdin, capture_output=True, text=True, timeout=60)


def test_plan_prints_a_table_for_the_seeds() -> None:
    files = sorted(SEEDS.glob("*.yaml"))
    result = kaiten("plan", *(arg for f in files for arg in ("-f", str(f))))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.count("1 × Standard_NC6s_v3  ($3.06/h)") == 3
    assert "fits 1 × V100 16 GiB" in out and "float16 (V100 has no bfloat16)" in out
    assert "workspace-tuning-phi-3: tuning of phi-3-mini-128k-instruct" in out
    assert "--load_in_4bit" in out


def test_plan_json_and_the_cheapest_choice() -> None:
    manifest = {
        "apiVersion": "kaito.sh/v1alpha1",
        "kind": "Workspace",
        "metadata": {"name": "coder"},
        "resource": {"labelSelector": {"matchLabels": {"a": "b"}}},
        "inference": {"preset": {"name": "qwen2.5-coder-32b-instruct"}},
    }
    result = kaiten("plan", "-f", "-", "-o", "json", stdin=yaml.safe_dump(manifest))
    assert result.returncode == 0, result.stderr
    (entry,) = json.loads(result.stdout)
    assert entry["name"] == "coder" and entry["plan"]["sku"] == "Standard_NC40ads_H100_v5"
    assert "Standard_NC4as_T4_v3 ($0.53/h): needs 6 nodes > 4" in entry["plan"]["alternatives"]
    aws = kaiten("plan", "-f", "-", "--cloud", "aws", "-o", "json", stdin=yaml.safe_dump(manifest))
    assert json.loads(aws.stdout)[0]["plan"]["cloud"] == "aws"


def test_plan_rejection_exits_1_with_the_reason(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    doc = yaml.safe_load((SEEDS / "workspace-phi-3-mini.yaml").read_text())
    doc["inference"]["preset"]["name"] = "gemma-3-27b-instruct"
    bad.write_text(yaml.safe_dump(doc))
    result = kaiten("plan", "-f", str(bad))
    assert result.returncode == 1
    assert "REJECTED (IncompatibleGPU)" in result.stdout and "has no bfloat16" in result.stdout


def test_plan_catalog_listings_and_errors(tmp_path: Path) -> None:
    presets = kaiten("plan", "--presets")
    assert presets.returncode == 0 and len(presets.stdout.splitlines()) == 1 + 61
    assert "smollm2-135m-instruct" in presets.stdout
    skus = kaiten("plan", "--skus")
    assert "Standard_NC6s_v3" in skus.stdout and "local" in skus.stdout
    broken = tmp_path / "catalog.yaml"
    broken.write_text("skus: [{name: x}]\n")
    bad_catalog = kaiten("plan", "--catalog", str(broken), "--skus")
    assert bad_catalog.returncode == 2 and "catalog skus entry 'x'" in bad_catalog.stderr
    missing = kaiten("plan")
    assert missing.returncode == 2 and "-f FILE" in missing.stderr


def test_version_completion_and_choices() -> None:
    assert kaiten("--version").stdout.strip() == f"kaiten {version('kaiten')}"
    wrong = kaiten("plan", "--provider", "gcp")
    assert wrong.returncode == 2 and "invalid choice: 'gcp' (choose from 'aks', 'nodeclaim'" in wrong.stderr
    assert kaiten("plan", "--cloud", "gcp").returncode == 2
    script = kaiten("completion", "bash").stdout
    complete = (  # what bash does on <TAB>: call the completion function with the words so far
        'source /dev/stdin; complete -p kaiten >/dev/null || exit 9; for line in "kaiten pl" '
        '"kaiten plan --provider " "kaiten chat --"; do read -ra COMP_WORDS <<< "$line"; '
        '[[ $line == *" " ]] && COMP_WORDS+=(""); COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); '
        'COMP_LINE=$line; COMP_POINT=${#line}; _shtab_kaiten; echo "${COMPREPLY[*]}"; done'
    )
    shown = subprocess.run(["bash", "-c", complete], input=script, capture_output=True, text=True, check=True)
    plan, providers, chat_flags = shown.stdout.splitlines()
    assert plan == "plan" and providers.split() == ["aks", "nodeclaim", "byo", "local"], shown.stdout
    assert {"--url", "--api-key", "--workspace"} <= set(chat_flags.split()), chat_flags
