"""The message codec: round trips of every message type, and rejection of bad input."""

from __future__ import annotations

import pickle

import msgpack
import msgpack_numpy
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as npst

from chunkbus.bus import (
    ActionChunk,
    ArmState,
    CameraFrame,
    Command,
    ErrorReply,
    JpegImage,
    MessageError,
    Observation,
    ObservationRequest,
    Stats,
    codec,
    decode,
    encode,
)
from chunkbus.bus.messages import ERROR_CODES, MESSAGE_TYPES, SetTask, TaskSet

# --- strategies ---------------------------------------------------------------------------

names = st.from_regex(r"[A-Za-z0-9_.:/-]{1,20}", fullmatch=True)
times = st.floats(min_value=-1e9, max_value=1e9, allow_nan=False)
ticks = st.integers(min_value=-(2**40), max_value=2**40)
real_dtypes = st.one_of(
    npst.integer_dtypes(endianness="?"),
    npst.unsigned_integer_dtypes(endianness="?"),
    npst.floating_dtypes(endianness="?", sizes=(16, 32, 64)),
)
float_dtypes = npst.floating_dtypes(endianness="?", sizes=(16, 32, 64))


@st.composite
def laid_out(draw, array: np.ndarray) -> np.ndarray:
    """The same values, in C order, Fortran order, or as a strided (non-contiguous) view."""
    layout = draw(st.sampled_from(["c", "fortran", "strided"]))
    if layout == "fortran":
        return np.asfortranarray(array)
    if layout == "strided":
        doubled = np.repeat(array, 2, axis=-1) if array.ndim else array
        return doubled[..., ::2] if array.ndim else array
    return array


@st.composite
def arrays(draw, dtypes, ndim: int, max_side: int = 24, big: bool = True) -> np.ndarray:
    """Arrays from empty to larger than INLINE_MAX_BYTES (so both paths are exercised)."""
    dtype = draw(dtypes)
    if big and draw(st.booleans()):
        # Past the inline limit: travels as its own frame.
        side = codec.INLINE_MAX_BYTES // dtype.itemsize + draw(st.integers(1, 64))
        shape = (side,) + (1,) * (ndim - 1)
    else:
        shape = draw(npst.array_shapes(min_dims=ndim, max_dims=ndim, min_side=0, max_side=max_side))
    array = draw(npst.arrays(dtype, shape, elements=None, fill=None))
    return draw(laid_out(array))


@st.composite
def images(draw, allow_jpeg: bool = True):
    if allow_jpeg and draw(st.booleans()):
        # JPEG bytes are carried as they are; their content is the encoder's business.
        size = (draw(st.integers(1, 40)), draw(st.integers(1, 40)), draw(st.sampled_from([1, 3])))
        pixels = np.full(size, draw(st.integers(0, 255)), dtype=np.uint8)
        return JpegImage.encode(pixels if size[2] == 3 else pixels[:, :, 0])
    if draw(st.booleans()):
        shape = (draw(st.integers(0, 120)), draw(st.integers(0, 160)), draw(st.sampled_from([1, 3, 4])))
    else:
        shape = (draw(st.integers(0, 64)), draw(st.integers(0, 64)))
    image = draw(npst.arrays(np.uint8, shape, elements=st.integers(0, 255), fill=st.integers(0, 255)))
    return draw(laid_out(image))


@st.composite
def observations(draw):
    return Observation(
        tick=draw(ticks),
        time=draw(times),
        state=draw(arrays(real_dtypes, 1)),
        images=draw(st.dictionaries(names, images(), max_size=3)),
    )


def messages():
    return st.one_of(
        st.builds(CameraFrame, names, st.integers(0, 2**63), times, images()),
        st.builds(
            ArmState, names, st.integers(0, 2**63), times, st.lists(names, max_size=8),
            arrays(real_dtypes, 1),
        ),
        st.builds(
            Command, st.integers(0, 2**63), ticks, times, st.lists(names, max_size=8),
            arrays(real_dtypes, 1), st.booleans(),
        ),
        st.builds(
            ObservationRequest,
            robot_id=names,
            request_id=names,
            tick=ticks,
            fps=st.floats(1, 1000),
            send_time=times,
            task=st.text(max_size=50),
            observations=st.lists(observations(), max_size=3),
            priority=st.integers(-100, 100),
            ttl=st.none() | st.floats(0, 10),
            replace_key=st.none() | names,
            prefix=st.none() | arrays(float_dtypes, 2, big=False),
            expected_delay=st.none() | st.integers(0, 100),
        ),
        st.builds(
            ActionChunk,
            request_id=names,
            robot_id=names,
            tick=ticks,
            actions=arrays(float_dtypes, 2),
            names=st.lists(names, max_size=8),
            worker=st.text(max_size=20),
            model=st.text(max_size=20),
            timings=st.dictionaries(st.text(max_size=10), st.floats(0, 100), max_size=4),
            guided_delay=st.none() | st.integers(0, 100),
            guided_horizon=st.none() | st.integers(1, 100),
            unguided=st.text(max_size=20),
        ),
        st.builds(ErrorReply, st.text(max_size=20), st.sampled_from(ERROR_CODES), st.text()),
        st.builds(Stats, names, times, st.dictionaries(st.text(max_size=10), times, max_size=6)),
        st.builds(SetTask, st.text(max_size=50)),
        st.builds(TaskSet, names, st.text(max_size=50), st.text(max_size=50), ticks),
    )


def assert_same(sent, received, where="message"):
    """Equal field by field; arrays equal in values, shape and dtype (byte order included)."""
    if hasattr(sent, "to_wire"):
        assert type(received) is type(sent), where
        sent, received = sent.to_wire(), received.to_wire()
    if isinstance(sent, np.ndarray):
        assert isinstance(received, np.ndarray), where
        assert received.dtype == sent.dtype, where
        assert received.shape == sent.shape, where
        np.testing.assert_array_equal(received, sent, err_msg=where)
    elif isinstance(sent, dict):
        assert sent.keys() == received.keys(), where
        for key in sent:
            assert_same(sent[key], received[key], f"{where}.{key}")
    elif isinstance(sent, list):
        assert len(sent) == len(received), where
        for i, (a, b) in enumerate(zip(sent, received)):
            assert_same(a, b, f"{where}[{i}]")
    else:
        assert sent == received, where


# --- round trips --------------------------------------------------------------------------


@given(messages())
def test_every_message_type_round_trips(message):
    assert_same(message, decode(encode(message)))


def test_strategies_cover_every_message_type():
    covered = {CameraFrame, ArmState, Command, ObservationRequest, ActionChunk, ErrorReply, Stats, SetTask, TaskSet}
    assert covered == set(MESSAGE_TYPES.values())


def _two_camera_request() -> ObservationRequest:
    rng = np.random.default_rng(0)
    return ObservationRequest(
        robot_id="so101",
        request_id="so101-7",
        tick=7,
        fps=30.0,
        send_time=12.5,
        task="pick the cube",
        observations=[
            Observation(
                tick=7,
                time=12.4,
                state=np.arange(6, dtype=np.float32),
                images={
                    "observation.images.front": rng.integers(0, 255, (480, 640, 3), np.uint8),
                    "observation.images.wrist": rng.integers(0, 255, (480, 640, 3), np.uint8),
                },
            )
        ],
        priority=1,
        ttl=0.5,
        replace_key="so101",
    )


def test_images_travel_as_their_own_frames_without_copies():
    request = _two_camera_request()
    frames = encode(request)
    assert len(frames) == 3  # header + one frame per image; the state rides in the header
    images = request.observations[0].images
    for frame, image in zip(frames[1:], images.values()):
        assert np.shares_memory(np.frombuffer(frame, np.uint8), image)
    decoded = decode(frames)
    for key, image in images.items():
        received = decoded.observations[0].images[key]
        assert np.shares_memory(received, image)  # the decoder wrapped the frame's memory
        assert not received.flags.writeable
    assert_same(request, decoded)


def test_jpeg_images_travel_as_bytes_and_decode_to_their_pixels():
    pixels = np.zeros((48, 64, 3), np.uint8)
    pixels[:, :32] = (255, 0, 0)  # red left half: checks the RGB order survives
    frame = CameraFrame("front", 3, 1.0, JpegImage.encode(pixels, quality=95))
    frames = encode(frame)
    header = codec.decode_header(frames[0])
    assert header.buffers == [{"key": "image", "encoding": "jpeg", "dtype": "|u1", "shape": [48, 64, 3]}]
    decoded = decode(frames)
    assert isinstance(decoded.image, JpegImage)
    restored = decoded.image.decode()
    assert restored.shape == (48, 64, 3)
    # Away from the edge, where JPEG's chroma subsampling blurs: red stays red (RGB order).
    assert np.abs(restored[:, :24].astype(int) - (255, 0, 0)).max() < 10
    assert restored[:, 40:].max() < 10


def test_broker_fields_are_readable_from_the_header_alone():
    header = codec.decode_header(encode(_two_camera_request())[0])
    assert header.type == "observation_request"
    assert (header.fields["priority"], header.fields["ttl"], header.fields["replace_key"]) == (
        1,
        0.5,
        "so101",
    )
    assert header.fields["request_id"] == "so101-7"


# --- rejection ------------------------------------------------------------------------------


def _frame(seq=1, shape=(40, 200, 3)):
    return CameraFrame("front", seq, 1.0, np.ones(shape, np.uint8))


def _header(frames) -> dict:
    return msgpack.unpackb(frames[0], raw=False, ext_hook=lambda code, data: msgpack.ExtType(code, data))


def _repack(header) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


def rejected(frames, match, **kwargs):
    with pytest.raises(MessageError, match=match):
        decode(frames, **kwargs)


def test_truncated_messages_are_rejected():
    frames = encode(_frame())
    rejected(frames[:1], r"describes 1 buffers but 0 frames follow")
    rejected([frames[0], bytes(frames[1])[:-1]], r"frame has 23999 bytes, but shape \[40, 200, 3\]")
    rejected([bytes(frames[0])[:-5], frames[1]], r"header is not a valid msgpack map")
    rejected([], r"empty message")


def test_wrong_buffer_sizes_are_rejected():
    frames = encode(_frame())
    header = _header(frames)
    header["buffers"][0]["shape"] = [40, 201, 3]
    rejected([_repack(header), frames[1]], r"buffer 0 \('image'\): frame has 24000 bytes.*needs 24120")
    header["buffers"][0]["shape"] = [-1, 200, 3]
    rejected([_repack(header), frames[1]], r"must hold non-negative integers")


def test_extra_frames_are_rejected():
    frames = encode(_frame())
    rejected([*frames, b"extra"], r"describes 1 buffers but 2 frames follow")


def test_unknown_versions_are_rejected():
    header = _header(encode(_frame()))
    header["v"] = 99
    rejected([_repack(header), encode(_frame())[1]], r"unknown protocol version 99: this node speaks version 1")


def test_oversized_messages_are_rejected():
    frames = encode(_frame())
    rejected(frames, r"message of \d+ bytes exceeds the limit of 1000", max_bytes=1000)
    huge_header = _header(frames)
    huge_header["fields"]["camera"] = "x" * (codec.MAX_HEADER_BYTES + 1)
    rejected([_repack(huge_header), frames[1]], r"header of \d+ bytes exceeds")


@given(st.lists(st.binary(max_size=200), max_size=4))
def test_garbage_bytes_raise_only_message_error(frames):
    with pytest.raises(MessageError):
        decode(frames)


@given(st.data())
def test_corrupted_messages_raise_only_message_error_or_decode(data):
    """Flip bytes anywhere in a valid message: decoding never fails any other way."""
    frames = [bytearray(f) for f in encode(data.draw(messages()))]
    index = data.draw(st.integers(0, len(frames) - 1))
    if frames[index]:
        for _ in range(data.draw(st.integers(1, 4))):
            position = data.draw(st.integers(0, len(frames[index]) - 1))
            frames[index][position] = data.draw(st.integers(0, 255))
    try:
        decode([bytes(f) for f in frames])
    except MessageError:
        pass


def test_field_errors_name_the_field():
    header = _header(encode(_frame()))
    body = encode(_frame())[1]
    header["fields"]["seq"] = "seven"
    rejected([_repack(header), body], r"camera_frame.seq: expected an integer, got str")
    header["fields"]["seq"] = True
    rejected([_repack(header), body], r"camera_frame.seq: expected an integer, got bool")
    header["fields"]["seq"] = -1
    rejected([_repack(header), body], r"camera_frame.seq: must be >= 0")
    header["fields"]["seq"] = 1
    header["fields"]["colour"] = "red"
    rejected([_repack(header), body], r"camera_frame: unknown field\(s\) colour")
    del header["fields"]["colour"]
    del header["fields"]["capture_time"]
    rejected([_repack(header), body], r"camera_frame: missing field 'capture_time'")
    header["type"] = "teleport"
    rejected([_repack(header), body], r"unknown message type 'teleport'")


def test_nested_field_errors_name_the_path():
    request = _two_camera_request()
    frames = encode(request)
    header = _header(frames)
    header["fields"]["observations"][0]["state"] = "not an array"
    rejected([_repack(header), *frames[1:]], r"observation_request.observations\[0\].state: expected a numpy array")


def test_buffer_reference_errors_are_rejected():
    frames = encode(_frame())
    header = _header(frames)
    header["fields"]["image"] = msgpack.ExtType(codec.BUFFER_REF, (5).to_bytes(4, "little"))
    rejected([_repack(header), frames[1]], r"bad reference to buffer 5")
    header["fields"]["image"] = msgpack.ExtType(42, b"")
    rejected([_repack(header), frames[1]], r"unknown msgpack extension type 42")


def test_jpeg_buffers_must_look_like_jpeg():
    frames = encode(CameraFrame("front", 0, 0.0, JpegImage.encode(np.zeros((8, 8, 3), np.uint8))))
    rejected([frames[0], b"GIF89a..."], r"does not start like a JPEG image")
    with pytest.raises(MessageError, match="not a valid JPEG"):
        JpegImage(b"\xff\xd8 not really", (8, 8, 3)).decode()


class _Tripwire:
    """Unpickling this sets a flag: proof that something called pickle.loads."""

    fired = False

    def __reduce__(self):
        return (_trip, ())


def _trip():
    _Tripwire.fired = True


@pytest.mark.parametrize("layout", ["inline", "buffer"])
def test_object_arrays_are_never_unpickled(layout):
    evil = np.array([_Tripwire()], dtype=object)
    frames = encode(ArmState("arm", 0, 0.0, ["j"], np.zeros(1, np.float32)))
    header = _header(frames)
    if layout == "inline":
        header["fields"]["positions"] = msgpack_numpy.encode(evil)
        extra = []
    else:
        header["buffers"] = [{"key": "positions", "encoding": "raw", "dtype": "|O", "shape": [1]}]
        header["fields"]["positions"] = msgpack.ExtType(codec.BUFFER_REF, (0).to_bytes(4, "little"))
        extra = [pickle.dumps(evil)]
    with pytest.raises(MessageError, match="object and structured arrays|not a plain numeric dtype"):
        decode([msgpack.packb(header, use_bin_type=True, default=msgpack_numpy.encode), *extra])
    assert not _Tripwire.fired


def test_structured_dtypes_are_rejected():
    frames = encode(_frame())
    header = _header(frames)
    header["buffers"][0]["dtype"] = "i4,i4"
    rejected([_repack(header), frames[1]], r"is not a plain numeric dtype")


def test_invalid_messages_cannot_be_sent():
    with pytest.raises(MessageError, match=r"arm_state.positions: expected a numpy array, got list"):
        encode(ArmState("arm", 0, 0.0, ["a"], [1.0]))
    with pytest.raises(MessageError, match=r"camera_frame.image: images must be uint8"):
        encode(CameraFrame("front", 0, 0.0, np.zeros((4, 4, 3), np.float32)))
    with pytest.raises(MessageError, match=r"error.code: 'oops' is not one of"):
        encode(ErrorReply("r-1", "oops", "?"))
    with pytest.raises(MessageError, match="not a chunkbus message"):
        encode({"type": "camera_frame"})


def test_every_schema_checks_exactly_the_dataclass_fields_in_order():
    import dataclasses

    for cls in [*MESSAGE_TYPES.values(), Observation]:
        assert list(cls.SCHEMA) == [f.name for f in dataclasses.fields(cls)], cls.__name__


def test_message_type_reads_only_the_type():
    assert codec.message_type(encode(ErrorReply("r", "failed", "why"))[0]) == "error"
    assert codec.message_type(encode(_frame())[0]) == "camera_frame"
    header = _header(encode(_frame()))
    header["v"] = 99
    assert codec.message_type(_repack(header)) is None
    assert codec.message_type(b"\xc1 not msgpack") is None
