"""Framing of the agent protocol."""

from kvmsandbox.agent import wire
from kvmsandbox.agent.v1 import agent_pb2 as pb


def frame(i: int) -> pb.Frame:
    return pb.Frame(request=pb.Request(id=i, method="Health", body=b"x" * i))


def test_frames_survive_arbitrary_chunking() -> None:
    data = b"".join(wire.encode(frame(i)) for i in range(1, 6))
    decoder = wire.FrameDecoder()
    out: list[pb.Frame] = []
    for pos in range(len(data)):
        out += decoder.feed(data[pos : pos + 1])
    assert [f.request.id for f in out] == [1, 2, 3, 4, 5]
    assert decoder.skipped_bytes == 0


def test_decoder_resynchronises_after_the_tail_of_an_earlier_frame() -> None:
    old = wire.encode(frame(40))
    stream = old[17:] + wire.encode(frame(7))
    decoder = wire.FrameDecoder()
    frames = decoder.feed(stream)
    assert [f.request.id for f in frames] == [7]
    assert decoder.skipped_bytes > 0


def test_reset_drops_a_partial_frame() -> None:
    decoder = wire.FrameDecoder()
    assert decoder.feed(wire.encode(frame(3))[:-2]) == []
    decoder.reset()
    assert [f.request.id for f in decoder.feed(wire.encode(frame(4)))] == [4]


def test_an_absurd_length_is_skipped_not_allocated() -> None:
    bogus = wire.MAGIC + (wire.MAX_FRAME_BYTES + 1).to_bytes(4, "big")
    frames = wire.FrameDecoder().feed(bogus + wire.encode(frame(2)))
    assert [f.request.id for f in frames] == [2]


def test_method_table_comes_from_the_service_definition() -> None:
    assert wire.METHODS["CreateContainer"].request_type is pb.CreateContainerRequest
    assert wire.METHODS["ReadStdio"].response_type is pb.ReadStdioResponse
    assert len(wire.METHODS) == len(pb.DESCRIPTOR.services_by_name["Agent"].methods)
