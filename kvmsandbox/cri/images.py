"""PullImage, ImageStatus, ListImages, RemoveImage, ImageFsInfo."""

from __future__ import annotations

import time

from kvmsandbox.cri.runtime.v1 import api_pb2 as cri
from kvmsandbox.cri.state import CriState
from kvmsandbox.errors import InvalidArgument
from kvmsandbox.image import Auth, ImageRecord


def _image(record: ImageRecord) -> cri.Image:
    user = str(record.config.get("User") or "")
    name = user.partition(":")[0]
    image = cri.Image(id=record.id, repo_tags=record.repo_tags, repo_digests=record.repo_digests, size=record.size)
    if name.isdigit():
        image.uid.value = int(name)
    elif name:
        image.username = name
    return image


def pull(state: CriState, req: cri.PullImageRequest) -> cri.PullImageResponse:
    """Pulls from the registry (or its configured mirrors); returns the image id.

    Raises:
        InvalidArgument: no or a malformed reference. NotFound: the registry has no such image
        (its words in the message). Unavailable: the registry cannot be reached.
    """
    if not req.image.image:
        raise InvalidArgument("PullImage needs an image reference")
    a = req.auth
    auth = (
        Auth(
            username=a.username,
            password=a.password,
            auth=a.auth,
            identity_token=a.identity_token,
            registry_token=a.registry_token,
        )
        if req.HasField("auth")
        else None
    )
    record = state.images.pull(req.image.image, auth)
    return cri.PullImageResponse(image_ref=record.id)


def status(state: CriState, req: cri.ImageStatusRequest) -> cri.ImageStatusResponse:
    """An unknown image is not an error: the answer has no image (the API asks this)."""
    if not req.image.image:
        raise InvalidArgument("ImageStatus needs an image reference")
    record = state.images.status(req.image.image)
    if record is None:
        return cri.ImageStatusResponse()
    return cri.ImageStatusResponse(image=_image(record))


def list_(state: CriState, req: cri.ListImagesRequest) -> cri.ListImagesResponse:
    records = state.images.list(req.filter.image.image or None)
    return cri.ListImagesResponse(images=[_image(r) for r in records])


def remove(state: CriState, req: cri.RemoveImageRequest) -> cri.RemoveImageResponse:
    """Idempotent: removing an image that is not there is not an error."""
    if not req.image.image:
        raise InvalidArgument("RemoveImage needs an image reference")
    state.images.remove(req.image.image)
    return cri.RemoveImageResponse()


def fs_info(state: CriState, req: cri.ImageFsInfoRequest) -> cri.ImageFsInfoResponse:
    usage = state.images.fs_usage()
    fs = cri.FilesystemUsage(
        timestamp=time.time_ns(),
        fs_id=cri.FilesystemIdentifier(mountpoint=str(usage.mountpoint)),
        used_bytes=cri.UInt64Value(value=usage.used_bytes),
        inodes_used=cri.UInt64Value(value=usage.inodes_used),
    )
    return cri.ImageFsInfoResponse(image_filesystems=[fs], container_filesystems=[fs])
