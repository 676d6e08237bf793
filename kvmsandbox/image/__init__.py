"""Container images: references, pulls from OCI/Docker v2 registries and their mirrors, and the
on-disk store of unpacked layers that container root filesystems stack as overlay lowerdirs."""

from kvmsandbox.errors import ContentError, RegistryAuthError
from kvmsandbox.image.records import ImageRecord
from kvmsandbox.image.reference import Reference, parse_reference
from kvmsandbox.image.registry import Auth
from kvmsandbox.image.store import FsUsage, ImageStore

__all__ = [
    "Auth",
    "ContentError",
    "FsUsage",
    "ImageRecord",
    "ImageStore",
    "Reference",
    "RegistryAuthError",
    "parse_reference",
]
