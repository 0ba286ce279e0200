"""Image builds (``kaiten.local.images``) with the real buildah: a code change rebuilds only the steps
after the dependencies, and the older build goes with the cache only it used."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kaiten.local import images

pytestmark = pytest.mark.cluster  # needs buildah and the base image, as the node's images do

DOCKERFILE = """FROM python:3.11-slim-bookworm
# stands for the dependency layer: a different result on every run
RUN head -c 32 /dev/urandom | od -An -tx1 > /deps
COPY code /opt/code
"""


def diff_ids(ref: str) -> list[str]:
    info = json.loads(images.buildah("inspect", "--type", "image", ref, capture=True))
    return list(info["OCIv1"]["rootfs"]["diff_ids"])


def test_a_code_change_rebuilds_only_what_follows_the_dependencies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "deploy" / "images").mkdir(parents=True)
    (tmp_path / "deploy" / "images" / "cachetest.Dockerfile").write_text(DOCKERFILE)
    (tmp_path / "code").write_text("one\n")
    monkeypatch.setattr(images, "repo_root", lambda: tmp_path)
    first = images.ensure("cachetest")
    second: images.Image | None = None
    try:
        before = diff_ids(first.ref)
        (tmp_path / "code").write_text("two\n")
        second = images.ensure("cachetest")
        after = diff_ids(second.ref)
        assert second.ref != first.ref
        assert after[:-1] == before[:-1], "the dependency step ran again: its cache was dropped"
        assert after[-1] != before[-1]
        assert not images.exists(first.ref), "the older build is still there"
        assert not first.archive.exists() and second.archive.exists()
        assert images._unused_cache() == [], "cache that no image builds on was left"
    finally:
        for image in (first, second):
            if image is not None:
                if images.exists(image.ref):
                    images.buildah("rmi", image.ref)
                image.archive.unlink(missing_ok=True)
        for image_id in images._unused_cache():
            images.buildah("rmi", image_id)
