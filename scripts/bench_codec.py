"""Encode + decode time of one observation: two 480x640x3 uint8 images and a 6-float state.

Measured side by side in one run, in this process (no sockets):
  chunkbus        encode() then decode(): images become their own frames, no copies
  pickle          pickle.dumps / pickle.loads of the same data (highest protocol, in-band)
  msgpack_numpy   msgpack with msgpack-numpy, the images inline in one buffer
  memcpy          one copy of the same bytes into preallocated memory (np.copyto)

The four are timed in interleaved rounds (so a noisy neighbour slows all of them alike);
each figure is the best round's mean over --iterations calls, in microseconds.
The last line printed is JSON with the figures and the ratios.
"""

from __future__ import annotations

import argparse
import json
import pickle
import platform
import time

import msgpack
import msgpack_numpy
import numpy as np

from chunkbus.bus import Observation, ObservationRequest, decode, encode


def observation(steps: int = 1) -> ObservationRequest:
    """Two cameras and a state; `steps` observations of history (VQBet sends 5)."""
    rng = np.random.default_rng(0)
    history = []
    for step in range(steps):
        images = {
            f"observation.images.{name}": rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
            for name in ("front", "wrist")
        }
        state = rng.standard_normal(6).astype(np.float32)
        history.append(Observation(tick=step, time=time.monotonic(), state=state, images=images))
    return ObservationRequest(
        robot_id="so101",
        request_id="so101-1",
        tick=steps - 1,
        fps=30.0,
        send_time=time.monotonic(),
        task="pick up the cube",
        observations=history,
    )


def arrays_of(request: ObservationRequest) -> list[np.ndarray]:
    return [a for o in request.observations for a in (o.state, *o.images.values())]


def best_of_rounds(functions: dict, iterations: int, rounds: int) -> dict[str, float]:
    """Microseconds per call of each function: the best of `rounds` interleaved rounds."""
    best = {name: float("inf") for name in functions}
    for _ in range(rounds):
        for name, function in functions.items():
            start = time.perf_counter_ns()
            for _ in range(iterations):
                function()
            best[name] = min(best[name], (time.perf_counter_ns() - start) / iterations / 1000)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()

    request = observation()
    # The same data as plain Python containers, as pickle and msgpack-numpy users send it.
    plain = {
        "robot_id": request.robot_id,
        "tick": request.tick,
        "task": request.task,
        "observation.state": request.observations[0].state,
        **request.observations[0].images,
    }
    arrays = arrays_of(request)
    targets = [np.empty_like(a) for a in arrays]
    # The same with a five-step history: the codec's cost is per message, memcpy's per byte.
    history = observation(steps=5)
    history_arrays = arrays_of(history)
    history_targets = [np.empty_like(a) for a in history_arrays]
    payload = sum(a.nbytes for a in arrays)

    def chunkbus():
        decode(encode(request))

    def pickled():
        pickle.loads(pickle.dumps(plain, protocol=pickle.HIGHEST_PROTOCOL))

    def msgpack_inline():
        packed = msgpack.packb(plain, default=msgpack_numpy.encode)
        msgpack.unpackb(packed, object_hook=msgpack_numpy.decode)

    def memcpy():
        for target, source in zip(targets, arrays):
            np.copyto(target, source)

    def chunkbus_history():
        decode(encode(history))

    def memcpy_history():
        for target, source in zip(history_targets, history_arrays):
            np.copyto(target, source)

    # Check the round trip before timing it.
    decoded = decode(encode(request)).observations[0]
    for key, image in request.observations[0].images.items():
        assert np.array_equal(decoded.images[key], image)

    functions = {
        "chunkbus_us": chunkbus,
        "pickle_us": pickled,
        "msgpack_numpy_us": msgpack_inline,
        "memcpy_us": memcpy,
        "history5_chunkbus_us": chunkbus_history,
        "history5_memcpy_us": memcpy_history,
    }
    figures = best_of_rounds(functions, args.iterations, args.rounds)
    for name, value in figures.items():
        print(f"{name[:-3]:>25}: {value:9.1f} us")
    figures.update(
        payload_bytes=payload,
        speedup_vs_pickle=figures["pickle_us"] / figures["chunkbus_us"],
        speedup_vs_msgpack_numpy=figures["msgpack_numpy_us"] / figures["chunkbus_us"],
        ratio_to_memcpy=figures["chunkbus_us"] / figures["memcpy_us"],
        history5_payload_bytes=sum(a.nbytes for a in history_arrays),
        history5_ratio_to_memcpy=figures["history5_chunkbus_us"] / figures["history5_memcpy_us"],
        machine=f"{platform.machine()} {platform.processor() or ''}".strip(),
        python=platform.python_version(),
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
