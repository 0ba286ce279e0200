"""The tuning job for real on the CPU: a generated dolly-style parquet served over local HTTP, LoRA and
QLoRA on SmolLM2, progress events on real NATS, the adapter pushed to a real registry (Debian's
docker-registry with htpasswd auth), pulled back byte-identical, and shown to change the model."""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import math
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from nats.aio.client import Client

from kaiten.local.nats_server import NatsServer
from kaiten.local.procs import ManagedProcess, free_port, port_open
from services.tuning.config import TuningJobConfig
from services.tuning.job import amain
from shared import events as ev
from shared.oci import ADAPTER_FILES, IMAGE_CONFIG, LAYER_TGZ, client, pull_adapter, pull_adapter_files
from tests.conftest import REPO, SMOLLM2

pytestmark = [pytest.mark.nats, pytest.mark.slow]
USER, PASSWORD = "kaiten", "registry-pass-not-logged"
CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
    ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Chile", "Santiago"),
    ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Poland", "Warsaw"), ("Greece", "Athens"),
    ("Austria", "Vienna"), ("Ireland", "Dublin"), ("Portugal", "Lisbon"), ("Cuba", "Havana"),
    ("India", "New Delhi"), ("China", "Beijing"),
]  # fmt: skip


def styled(question: str, answer: str) -> dict[str, Any]:
    """A dolly-15k-oai-style row, in one unmistakable style: the adapter should learn it."""
    reply = f"Ahoy! {answer} Arr, that be the truth of it."
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]}


def rows() -> list[dict[str, Any]]:
    out = [styled(f"What is the capital of {c}?", f"The capital of {c} is {city}.") for c, city in CAPITALS]
    out += [
        styled(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.")
        for a in range(2, 8)
        for b in range(3, 11)
    ]
    return out  # 20 + 48 = 68 rows


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import pandas as pd

    root = tmp_path_factory.mktemp("data")
    all_rows = rows()
    held_out = all_rows[::9]
    train = [r for r in all_rows if r not in held_out]
    frame = pd.DataFrame({"messages": [r["messages"] for r in train]})
    frame.to_parquet(root / "train-00000-of-00001.parquet")
    (root / "held_out.json").write_text(json.dumps(held_out))
    (root / "empty.parquet").write_bytes(b"")
    pd.DataFrame({"colour": ["red", "blue"], "size": [1, 2]}).to_parquet(root / "useless.parquet")
    return root


@pytest.fixture(scope="module")
def data_url(data_dir: Path) -> Iterator[str]:
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(data_dir))
    handler.log_message = lambda *a: None  # type: ignore[method-assign]
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def registry_argv(root: Path, port: int) -> list[str]:
    """Debian's docker-registry serving 127.0.0.1:``port`` with htpasswd (bcrypt) auth for USER and
    PASSWORD, its storage and config under ``root``: the command that runs it."""
    import bcrypt

    binary = shutil.which("docker-registry")
    assert binary, "docker-registry is not installed (apt-get install docker-registry; .ci/run does)"
    (root / "htpasswd").write_text(
        f"{USER}:{bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=5)).decode()}\n"
    )
    config = {
        "version": 0.1,
        "log": {"level": "warn"},
        "storage": {"filesystem": {"rootdirectory": str(root / "data")}},
        "http": {"addr": f"127.0.0.1:{port}", "secret": "kaiten-test"},
        "auth": {"htpasswd": {"realm": "kaiten", "path": str(root / "htpasswd")}},
    }
    (root / "config.yml").write_text(yaml.safe_dump(config))
    return [binary, "serve", str(root / "config.yml")]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Debian's docker-registry on 127.0.0.1 with htpasswd (bcrypt) auth; its storage in a temp dir."""
    root = tmp_path_factory.mktemp("registry")
    port = free_port()
    proc = ManagedProcess("docker-registry", registry_argv(root, port), root / "registry.log").start()
    try:
        proc.wait_ready(lambda: port_open("127.0.0.1", port), timeout=20, what="did not listen")
        yield f"127.0.0.1:{port}"
    finally:
        assert proc.stop(timeout=10), "docker-registry ignored SIGTERM"


@pytest.fixture(scope="module")
def push_secret(registry: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A kubernetes.io/dockerconfigjson Secret as the job sees it: mounted as a directory."""
    root = tmp_path_factory.mktemp("secret")
    auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    (root / ".dockerconfigjson").write_text(json.dumps({"auths": {registry: {"auth": auth}}}))
    return root


@pytest.fixture(scope="module")
def bus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    with NatsServer(tmp_path_factory.mktemp("nats")) as server:
        yield server


def job_config(tmp: Path, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "job": "tune-smollm2",
        "preset": "smollm2-135m-instruct",
        "source": SMOLLM2.model_dump(),
        "method": "lora",
        "sections": {
            "LoraConfig": {
                "r": 8,
                "lora_alpha": 16,
                "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
            },
            "TrainingArguments": {"per_device_train_batch_size": 4, "max_steps": 30, "learning_rate": 1e-3},
            "DatasetConfig": {"max_seq_length": 128},
        },
        "output": {"directory": str(tmp / "adapter-out")},
        "work_dir": str(tmp / "work"),
        "allow_loopback_urls": True,
        "progress_interval_s": 0,
        "threads": 2,
    }
    config.update(overrides)
    return config


async def events_for(nc: Client, uid: str) -> list[ev.AnyEvent]:
    sub = await nc.jetstream().subscribe("kaiten.>", ordered_consumer=True)
    found = []
    try:
        while True:
            event = ev.decode((await sub.next_msg(timeout=0.5)).data)
            if event.workspace.uid == uid:
                found.append(event)
    except TimeoutError:
        pass
    finally:
        await sub.unsubscribe()
    return found


def held_out_loss(model_dir: Path, adapter: Path | None, held_out: list[dict[str, Any]]) -> float:
    """Mean token loss on the assistant replies of held-out rows of the trained style."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    losses = []
    with torch.inference_mode():
        for row in held_out:
            prompt = tokenizer.apply_chat_template(
                row["messages"][:1], tokenize=False, add_generation_prompt=True
            )
            full = tokenizer.apply_chat_template(row["messages"], tokenize=False)
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([tokenizer(full, add_special_tokens=False)["input_ids"]])
            labels = ids.clone()
            labels[0, : len(prompt_ids)] = -100
            losses.append(float(model(input_ids=ids, labels=labels).loss))
    return sum(losses) / len(losses)


@pytest.mark.timeout(420)  # measured 100 s (cold, busy machine)
def test_lora_job_end_to_end(
    tmp_path: Path,
    data_url: str,
    data_dir: Path,
    registry: str,
    push_secret: Path,
    bus: NatsServer,
    model_dir: Path,
) -> None:
    image = f"{registry}/adapters/smollm2-pirate:0.1"
    uid = "uid-lora"
    config = job_config(
        tmp_path,
        input_urls=[f"{data_url}/train-00000-of-00001.parquet"],
        output={
            "image": image,
            "push_secret": str(push_secret),
            "insecure": True,
            "directory": str(tmp_path / "out"),
        },
        workspace={"namespace": "ns", "name": "tune", "uid": uid, "generation": 1},
        nats_url=bus.url,
    )
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config))
    run = subprocess.run(
        [sys.executable, "-m", "services.tuning", "--config", str(tmp_path / "job.yaml")],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    assert PASSWORD not in log and base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode() not in log

    async def collect() -> list[ev.AnyEvent]:
        import nats

        nc = await nats.connect(bus.url)
        try:
            return await events_for(nc, uid)
        finally:
            await nc.close()

    events = asyncio.run(collect())
    kinds = [e.kind for e in events]
    assert kinds[0] == "workload.job_started" and kinds[-1] == "workload.job_succeeded", kinds
    progress = [e for e in events if isinstance(e, ev.TuningProgress) and e.loss is not None]
    assert len(progress) >= 10 and progress[-1].step == 30 and progress[-1].total_steps == 30
    assert all(p.tokens_per_second and p.tokens_per_second > 0 for p in progress)
    first, last = sum(p.loss for p in progress[:3]) / 3, sum(p.loss for p in progress[-3:]) / 3  # type: ignore[misc]
    assert last < first * 0.7, (first, last)  # the loss fell
    done = events[-1]
    assert isinstance(done, ev.JobSucceeded) and done.output.startswith(
        f"{tmp_path / 'out'}, {image}@sha256:"
    )

    pull_adapter_files(image, tmp_path / "pulled", str(push_secret), insecure=True)  # KAITO's layout
    assert sorted(p.name for p in (tmp_path / "pulled").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "pulled" / name).read_bytes() == (tmp_path / "out" / name).read_bytes()

    held_out = json.loads((data_dir / "held_out.json").read_text())
    base = held_out_loss(model_dir, None, held_out)
    tuned = held_out_loss(model_dir, tmp_path / "pulled", held_out)
    assert tuned < base * 0.6 and math.isfinite(tuned), (base, tuned)  # it learned the style


@pytest.mark.timeout(240)  # measured 29 s
def test_qlora_trains_on_the_cpu_and_pushes(
    tmp_path: Path, data_url: str, registry: str, push_secret: Path
) -> None:
    image = f"{registry}/adapters/smollm2-qlora:0.1"
    config = TuningJobConfig.model_validate(
        job_config(
            tmp_path,
            method="qlora",
            input_urls=[f"{data_url}/train-00000-of-00001.parquet"],
            output={"image": image, "push_secret": str(push_secret), "insecure": True},
            sections={
                "LoraConfig": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
                "TrainingArguments": {
                    "per_device_train_batch_size": 4,
                    "max_steps": 15,
                    "learning_rate": 1e-3,
                },
                "DatasetConfig": {"max_seq_length": 128},
                "QuantizationConfig": {"bnb_4bit_compute_dtype": "float32"},
            },
        )
    )
    from services.tuning.job import run

    losses: list[float] = []
    output, result = asyncio.run(run(config, lambda p: losses.append(p.loss) if p.loss is not None else None))
    assert result.steps == 15 and output.startswith(f"{image}@sha256:")
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 * 0.8, losses
    config_json = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config_json["r"] == 8 and sorted(config_json["target_modules"]) == ["q_proj", "v_proj"]
    pull_adapter_files(image, tmp_path / "pulled", str(push_secret), insecure=True)
    assert sorted(p.name for p in (tmp_path / "pulled").iterdir()) == list(ADAPTER_FILES)


@pytest.mark.parametrize(
    ("case", "reason", "says"),
    [
        ("missing", "InputNotFound", "HTTP 404"),
        ("ftp", "UnsupportedURL", "only http and https"),
        ("private", "ForbiddenURL", "private or reserved"),
        ("metadata", "ForbiddenURL", "link-local"),
        ("loopback", "ForbiddenURL", "loopback"),
        ("cgnat", "ForbiddenURL", "private or reserved"),  # 100.64.0.0/10: not private, not global
        ("benchmarking", "ForbiddenURL", "private or reserved"),  # 198.18.0.0/15
        ("sas", "InputNotFound", "HTTP 404"),  # credentials in the URL: never repeated (asserted below)
        ("total", "InputTooLarge", "in all"),  # each file fits, together they do not
        ("empty", "EmptyInput", "empty"),
        ("useless", "InvalidDataset", "no usable columns"),
        ("credentials", "PushUnauthorized", "refused"),
    ],
)
def test_bad_inputs_fail_fast_with_a_reason(
    case: str,
    reason: str,
    says: str,
    tmp_path: Path,
    data_url: str,
    data_dir: Path,
    registry: str,
    bus: NatsServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    train_bytes = (data_dir / "train-00000-of-00001.parquet").stat().st_size
    urls = {
        "missing": f"{data_url}/nope.parquet",
        "ftp": "ftp://127.0.0.1/data.parquet",
        "private": "http://10.1.2.3/data.parquet",
        "metadata": "http://169.254.169.254/latest/meta-data",
        "loopback": f"{data_url}/train-00000-of-00001.parquet",
        "cgnat": "http://100.64.1.2/data.parquet",
        "benchmarking": "http://198.18.0.9/data.parquet",
        "sas": data_url.replace("http://", "http://reader:SECRET-PW@")
        + "/nope.parquet?sv=2024&sig=SECRET-SIG",
        "total": f"{data_url}/train-00000-of-00001.parquet",
        "empty": f"{data_url}/empty.parquet",
        "useless": f"{data_url}/useless.parquet",
        "credentials": f"{data_url}/train-00000-of-00001.parquet",
    }
    output: dict[str, Any] = {"directory": str(tmp_path / "out")}
    if case == "credentials":
        wrong = tmp_path / "wrong.json"
        auth = base64.b64encode(f"{USER}:not-the-password".encode()).decode()
        wrong.write_text(json.dumps({"auths": {registry: {"auth": auth}}}))
        output = {"image": f"{registry}/adapters/x:1", "push_secret": str(wrong), "insecure": True}
    uid = f"uid-{case}"
    config = TuningJobConfig.model_validate(
        job_config(
            tmp_path,
            input_urls=[urls[case]] * (2 if case == "total" else 1),
            output=output,
            allow_loopback_urls=case != "loopback",
            workspace={"namespace": "ns", "name": case, "uid": uid},
            nats_url=bus.url,
            **({"max_download_bytes": train_bytes * 3 // 2} if case == "total" else {}),
        )
    )

    async def go() -> tuple[int, list[ev.AnyEvent]]:
        import nats

        code = await asyncio.wait_for(amain(config), timeout=60)  # fast: before any training
        nc = await nats.connect(bus.url)
        try:
            return code, await events_for(nc, uid)
        finally:
            await nc.close()

    code, events = asyncio.run(go())
    assert code == 1
    assert [e.kind for e in events] == ["workload.job_started", "workload.job_failed"]
    failed = events[-1]
    assert isinstance(failed, ev.JobFailed) and failed.reason == reason and says in failed.message, failed
    assert "not-the-password" not in failed.message
    assert "SECRET" not in failed.message and "SECRET" not in caplog.text, failed.message
    partial = list((tmp_path / "work" / "input").glob("*")) if (tmp_path / "work" / "input").exists() else []
    assert case != "total" or len(partial) == 1, f"a partial download was left: {partial}"


def test_kaitos_training_arguments_are_taken_as_kaito_writes_them(tmp_path: Path) -> None:
    """Issue 18: KAITO's tuning ConfigMaps (its lora/qlora templates) set ``output_dir`` (/mnt/results),
    ``save_strategy`` and ``ddp_find_unused_parameters`` in ``TrainingArguments``. The job passed them on
    next to its own ``output_dir`` and ``save_strategy``, and trl's ``SFTConfig`` refused the duplicate
    keyword: such a job failed before training. Now the ConfigMap's arguments win, except where
    checkpoints go, which is the job's."""
    from trl import SFTConfig  # type: ignore[attr-defined]

    from services.tuning.config import Sections
    from services.tuning.train import sft_arguments

    sections = Sections.model_validate({"TrainingArguments": {
        "output_dir": "/mnt/results", "ddp_find_unused_parameters": False, "save_strategy": "epoch",
        "per_device_train_batch_size": 2, "num_train_epochs": 1, "weight_decay": 0.01}})  # fmt: skip
    args = SFTConfig(**sft_arguments(sections, tmp_path, on_gpu=False))
    assert args.output_dir == str(tmp_path / "checkpoints")  # never /mnt/results
    assert (args.save_strategy, args.ddp_find_unused_parameters, args.weight_decay) == ("epoch", False, 0.01)
    assert (args.per_device_train_batch_size, args.num_train_epochs, args.use_cpu) == (2, 1, True)
    defaults = SFTConfig(**sft_arguments(Sections(), tmp_path, on_gpu=False))
    assert (defaults.save_strategy, defaults.bf16, defaults.max_length) == ("no", False, 512)


def test_qlora_loads_the_base_in_8_bit_when_kaitos_config_asks_else_4_bit_nf4() -> None:
    """KAITO's QuantizationConfig has two switches; the job honours ``load_in_8bit`` (it loaded 4-bit
    whatever the ConfigMap said). The arguments are transformers' own ``BitsAndBytesConfig``'s."""
    from transformers import BitsAndBytesConfig

    from services.tuning.config import Sections
    from services.tuning.train import quantization_arguments

    default = BitsAndBytesConfig(**quantization_arguments(Sections().quantization))
    assert (default.load_in_4bit, default.load_in_8bit, default.bnb_4bit_quant_type) == (True, False, "nf4")
    kaito = Sections.model_validate({"QuantizationConfig": {"load_in_8bit": True}}).quantization
    eight = BitsAndBytesConfig(**quantization_arguments(kaito))
    assert (eight.load_in_4bit, eight.load_in_8bit) == (False, True)


DOCKER = (
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.container.image.v1+json",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
)
OCI = ("application/vnd.oci.image.manifest.v1+json", IMAGE_CONFIG, LAYER_TGZ)


def push_image(
    image: str, secret: str, config: Path, layer: Path, *, docker: bool = False
) -> tuple[str, int]:
    """An image of one config and one tar+gzip layer, with OCI's media types or Docker's (what
    ``docker push`` writes), uploaded as registries take any image; its manifest's digest and size."""
    import hashlib

    manifest_type, config_type, layer_type = DOCKER if docker else OCI
    oras = client(image, secret, True)
    container = oras.get_container(image)
    descriptors = []
    for path, media_type in ((config, config_type), (layer, layer_type)):
        data = path.read_bytes()
        descriptor = {
            "mediaType": media_type,
            "digest": "sha256:" + hashlib.sha256(data).hexdigest(),
            "size": len(data),
        }
        assert oras.upload_blob(str(path), container, descriptor).status_code in (
            200,
            201,
            202,
        )  # 200: had it
        descriptors.append(descriptor)
    body = json.dumps({"schemaVersion": 2, "mediaType": manifest_type, "config": descriptors[0],
                       "layers": descriptors[1:]}).encode()  # fmt: skip
    put_manifest(image, body, manifest_type)
    return "sha256:" + hashlib.sha256(body).hexdigest(), len(body)


def put_manifest(image: str, body: bytes, media_type: str) -> None:
    """PUT a manifest (or an index) as the registry API takes any."""
    import httpx

    registry, _, rest = image.partition("/")
    repo, _, tag = rest.rpartition(":")
    put = httpx.put(f"http://{registry}/v2/{repo}/manifests/{tag}", content=body,
                    headers={"content-type": media_type}, auth=(USER, PASSWORD))  # fmt: skip
    assert put.status_code == 201, put.text


def push_index(image: str, manifest: tuple[str, int]) -> None:
    """An OCI image index (what ``docker buildx`` pushes) naming one linux/amd64 image manifest."""

    index_type = "application/vnd.oci.image.index.v1+json"
    body = json.dumps({"schemaVersion": 2, "mediaType": index_type, "manifests": [
        {"mediaType": OCI[0], "digest": manifest[0], "size": manifest[1],
         "platform": {"os": "linux", "architecture": "amd64"}}]})  # fmt: skip
    put_manifest(image, body.encode(), index_type)


def test_adapters_are_pushed_in_kaitos_layout_and_both_layouts_are_read(
    tmp_path: Path, registry: str, push_secret: Path, adapter_dir: Path
) -> None:
    """Issue 18: KAITO's tuning pusher writes an OCI image whose one tar+gzip layer holds
    data/adapter_config.json and the weights; Kaiten pushed oras named files, which KAITO's puller
    (skopeo: unpack every layer, take /data) cannot read, and read only those. Now Kaiten pushes KAITO's
    layout and reads both, checked on a real registry: its own push, an image made as KAITO's
    pusher.sh makes it (system tar and gzip -9), and an artifact in the old layout."""
    import gzip
    import hashlib
    import io
    import tarfile

    import httpx

    from services.tuning.push import push

    secret, auth = str(push_secret), (USER, PASSWORD)
    ours = f"{registry}/adapters/layout:kaiten"
    digest = push(adapter_dir, ours, secret, insecure=True)
    accept = {"accept": "application/vnd.oci.image.manifest.v1+json"}
    manifest = httpx.get(
        f"http://{registry}/v2/adapters/layout/manifests/kaiten", headers=accept, auth=auth
    ).json()
    assert manifest["config"]["mediaType"] == IMAGE_CONFIG and digest.startswith("sha256:")
    (layer,) = manifest["layers"]
    assert layer["mediaType"] == LAYER_TGZ
    blob = httpx.get(f"http://{registry}/v2/adapters/layout/blobs/{layer['digest']}", auth=auth).content
    config = httpx.get(
        f"http://{registry}/v2/adapters/layout/blobs/{manifest['config']['digest']}", auth=auth
    ).json()
    raw = gzip.decompress(blob)
    assert config["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(raw).hexdigest()]  # what skopeo checks
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:  # what KAITO's puller takes: /data
        assert sorted(tar.getnames()) == [
            "data",
            "data/adapter_config.json",
            "data/adapter_model.safetensors",
        ]

    # as KAITO's pusher.sh makes it: tar c -C <tmp> data; gzip -9; config {"rootfs":{"diff_ids":[…]}}
    work = tmp_path / "kaito"
    (work / "data").mkdir(parents=True)
    for name in ADAPTER_FILES:
        shutil.copy(adapter_dir / name, work / "data" / name)
    subprocess.run(["tar", "c", "-f", str(work / "layer.tar"), "-C", str(work), "data"], check=True)
    diff = hashlib.sha256((work / "layer.tar").read_bytes()).hexdigest()
    subprocess.run(["gzip", "-9", str(work / "layer.tar")], check=True)
    (work / "config.json").write_text(f'{{"rootfs":{{"diff_ids":["sha256:{diff}"]}}}}')
    kaitos = f"{registry}/adapters/layout:kaito"
    push_image(kaitos, secret, work / "config.json", work / "layer.tar.gz")

    # the layout Kaiten wrote before: one oras layer per file, titled by its name
    old = f"{registry}/adapters/layout:oras"
    files = [str(adapter_dir / name) for name in ADAPTER_FILES]
    client(old, secret, True).push(target=old, files=files, disable_path_validation=True)

    for image in (ours, kaitos, old):
        got = pull_adapter(image, tmp_path / "cache", [secret])
        for name in ADAPTER_FILES:
            assert (got / name).read_bytes() == (adapter_dir / name).read_bytes(), (image, name)


def test_a_kaito_data_image_is_unpacked_for_the_job(tmp_path: Path, registry: str, push_secret: Path) -> None:
    """KAITO's tuning input image: an image whose layers hold the data under /data. The init container
    the kuberay backend renders runs ``python -m shared.oci pull-data IMAGE DIR SECRET``: the files
    under data/ land in DIR and nothing else does (not a member that climbs out, not a link); Docker's
    media types and an image index (what docker push and buildx write) are read too; an image without
    /data, or a missing one, says why."""
    import io
    import tarfile

    def layer(path: Path, members: dict[str, bytes], link: str | None = None) -> Path:
        with tarfile.open(path, "w:gz") as tar:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            if link:
                info = tarfile.TarInfo(link)
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tar.addfile(info)
        return path

    (tmp_path / "config.json").write_text("{}")
    members = {"data/train.jsonl": b'{"messages": []}\n', "data/more/extra.jsonl": b"{}\n",
               "./data/dotted.jsonl": b"{}\n", "data/../escape.txt": b"no", "/data/abs.txt": b"no",
               "etc/passwd": b"not data"}  # fmt: skip
    good = layer(tmp_path / "good.tar.gz", members, link="data/link")
    oci = push_image(f"{registry}/data/pirate:oci", str(push_secret), tmp_path / "config.json", good)
    push_image(
        f"{registry}/data/pirate:docker", str(push_secret), tmp_path / "config.json", good, docker=True
    )
    push_index(f"{registry}/data/pirate:index", oci)
    empty = layer(tmp_path / "empty.tar.gz", {"etc/motd": b"hi"})
    push_image(f"{registry}/data/nodata:1", str(push_secret), tmp_path / "config.json", empty)

    pull_data = [sys.executable, "-m", "shared.oci", "pull-data"]
    secrets = [str(tmp_path / "none"), str(push_secret)]  # the first without credentials is passed over
    for tag in ("oci", "docker", "index"):
        dest = tmp_path / f"mnt-{tag}"
        run = subprocess.run([*pull_data, f"{registry}/data/pirate:{tag}", str(dest), *secrets],
                             cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
        assert run.returncode == 0, run.stdout + run.stderr
        got = sorted(str(p.relative_to(dest)) for p in dest.rglob("*"))
        assert got == ["dotted.jsonl", "more", "more/extra.jsonl", "train.jsonl"], (tag, got)
        assert PASSWORD not in run.stdout + run.stderr
    assert not (tmp_path / "escape.txt").exists()
    for image, reason in ((f"{registry}/data/nodata:1", "NoData"), (f"{registry}/data/none:1", "PullFailed")):
        failed = subprocess.run([*pull_data, image, str(tmp_path / "x"), str(push_secret)],
                                cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
        assert failed.returncode == 1 and reason in failed.stderr, failed.stderr


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        # the registry's port held "401": CI saw a missing image called unauthorized (port 40153)
        ("Issue with http://127.0.0.1:40153/v2/data/none/manifests/1: Not Found", "PullFailed"),
        ("Issue with https://registry.example:4031/v2/x/manifests/1: Not Found", "PullFailed"),
        ("Issue with http://127.0.0.1:5000/v2/x/manifests/1: Unauthorized", "PullUnauthorized"),
        ("401 Client Error: Unauthorized for url: http://127.0.0.1:5000/v2/", "PullUnauthorized"),
        ("403 Client Error: Forbidden for url: http://127.0.0.1:5000/v2/", "PullUnauthorized"),
        ("requested access to the resource is denied", "PullUnauthorized"),
    ],
)
def test_a_pull_error_is_judged_by_the_registrys_answer_not_by_its_address(answer: str, reason: str) -> None:
    from shared.oci import _pull_error, refused

    assert _pull_error("127.0.0.1:40153/data/none:1", ValueError(answer)).reason == reason
    assert refused(answer) == (reason == "PullUnauthorized")  # the tuning job's push judges the same
