"""A real docker-registry on loopback per session (and one per auth mode), and the busybox image
pushed to it once."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmsandbox.config import RegistryConfig
from kvmsandbox.image import ImageStore
from tests.registry import Layer, PushedImage, Registry, make_layer, push_image, running_registry


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with running_registry(tmp_path_factory.mktemp("registry")) as r:
        yield r


@pytest.fixture(scope="session")
def busybox_image_layer(busybox_layer: Path) -> Layer:
    return make_layer(busybox_layer)


@pytest.fixture(scope="session")
def busybox_image(registry: Registry, busybox_image_layer: Layer) -> PushedImage:
    return push_image(registry, "busybox", "1.0", [busybox_image_layer])


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "images", RegistryConfig())
