"""A small client of the Kubernetes CRI ImageService (runtime.v1): PullImage and RemoveImage.

The CRI API's proto (k8s.io/cri-api) is in no Debian package here, so there are no generated
stubs: the few messages needed are described at run time with their field numbers from the
CRI API (ImageSpec.image = 1; PullImageRequest.image = 1, .auth = 2, .sandbox_config = 3;
PullImageResponse.image_ref = 1; RemoveImageRequest.image = 1). Fields left out are simply
absent on the wire, which proto3 reads as empty, so containerd's CRI plugin accepts them.

    with CRIImages(containerd_socket) as cri:
        image_id = cri.pull("127.0.0.1:5000/app:v1")
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_F = descriptor_pb2.FieldDescriptorProto


def _messages() -> dict[str, Any]:
    f = descriptor_pb2.FileDescriptorProto(name="naiad_tests/cri_image_subset.proto", package="runtime.v1",
                                           syntax="proto3")

    def message(name: str, *fields: tuple[str, int, int, str]) -> None:
        m = f.message_type.add(name=name)
        for field_name, number, type_, type_name in fields:
            m.field.add(name=field_name, number=number, type=type_, label=_F.LABEL_OPTIONAL,
                        type_name=type_name or None)

    message("ImageSpec", ("image", 1, _F.TYPE_STRING, ""))
    message("PullImageRequest", ("image", 1, _F.TYPE_MESSAGE, ".runtime.v1.ImageSpec"))
    message("PullImageResponse", ("image_ref", 1, _F.TYPE_STRING, ""))
    message("RemoveImageRequest", ("image", 1, _F.TYPE_MESSAGE, ".runtime.v1.ImageSpec"))
    message("RemoveImageResponse")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return {m.name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"runtime.v1.{m.name}"))
            for m in f.message_type}


class CRIImages:
    """runtime.v1.ImageService on containerd's socket (its CRI plugin serves it there)."""

    def __init__(self, address: str, timeout: float = 300.0):
        self._m = _messages()
        self._channel = grpc.insecure_channel(f"unix://{address}")
        self.timeout = timeout

    def _call(self, method: str, request: Any, response: str) -> Any:
        call = self._channel.unary_unary(f"/runtime.v1.ImageService/{method}",
                                         request_serializer=lambda m: m.SerializeToString(),
                                         response_deserializer=self._m[response].FromString)
        return call(request, timeout=self.timeout)

    def pull(self, image: str) -> str:
        """Pull `image` as the kubelet would; the image id (config digest) containerd returns."""
        request = self._m["PullImageRequest"](image=self._m["ImageSpec"](image=image))
        return self._call("PullImage", request, "PullImageResponse").image_ref

    def remove(self, image: str) -> None:
        request = self._m["RemoveImageRequest"](image=self._m["ImageSpec"](image=image))
        self._call("RemoveImage", request, "RemoveImageResponse")

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> CRIImages:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
