"""An emulated Feetech servo bus (STS3215 servos, as in the SO-100/SO-101 arms) on a pseudo-terminal.

Point lerobot (or anything speaking Feetech protocol 0) at ``emulator.port`` and it talks to emulated
servos through its real serial code::

    with FeetechEmulator(ids=(1, 2, 4, 5, 6)) as bus:      # motor 3 does not answer
        robot = SO101Follower(SO101FollowerConfig(port=bus.port, ...))

Protocol 0 (STS/SMS): instruction ``FF FF ID LEN INSTR PARAMS.. CHK``, status ``FF FF ID LEN ERR PARAMS.. CHK``,
``LEN = len(PARAMS) + 2``, ``CHK = ~(ID + LEN + INSTR/ERR + sum(PARAMS)) & 0xFF``, little-endian words.
Handled: PING (also broadcast), READ, WRITE, REG_WRITE/ACTION, SYNC_READ, SYNC_WRITE, RESET.
Bytes that are not a well-formed packet (garbage, bad checksum, a header whose body never arrives) are
skipped, and packets split across reads are reassembled, like on a real bus.

Each motor has a 128-byte register table with STS3215 defaults (model number 777, firmware 3.10, limits
0..4095, homing offset 0, present position 2048). ``Present_Position = (actual - Homing_Offset) mod 4096``
as on the servo; a Goal_Position write moves the motor at once (or at ``speed`` ticks/s), clamped to the
position limits when ``Min_Position_Limit < Max_Position_Limit``. Motors only hear the bus when the baud rate
lerobot set on the pty (termios) matches their Baud_Rate register (1 Mbps by default).

Writes that get no status packet (SYNC_WRITE, i.e. lerobot's ``send_action``) return on the host before
the emulator has handled them: call ``settle()`` before inspecting registers.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import os
import select
import struct
import termios
import threading
import time
import tty
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Self

__all__ = ["STS3215_CONTROL_TABLE", "STS3215_MODEL_NUMBER", "FeetechEmulator", "Packet"]

STS3215_MODEL_NUMBER = 777
TABLE_SIZE = 128
BROADCAST_ID = 0xFE

PING, READ, WRITE, REG_WRITE, ACTION, RESET, SYNC_READ, SYNC_WRITE = (
    0x01,
    0x02,
    0x03,
    0x04,
    0x05,
    0x06,
    0x82,
    0x83,
)

# name: (address, size) -- the STS/SMS control table as lerobot names it (lerobot/motors/feetech/tables.py).
STS3215_CONTROL_TABLE: dict[str, tuple[int, int]] = {
    "Firmware_Major_Version": (0, 1),
    "Firmware_Minor_Version": (1, 1),
    "Model_Number": (3, 2),
    "ID": (5, 1),
    "Baud_Rate": (6, 1),
    "Return_Delay_Time": (7, 1),
    "Response_Status_Level": (8, 1),
    "Min_Position_Limit": (9, 2),
    "Max_Position_Limit": (11, 2),
    "Max_Temperature_Limit": (13, 1),
    "Max_Voltage_Limit": (14, 1),
    "Min_Voltage_Limit": (15, 1),
    "Max_Torque_Limit": (16, 2),
    "Phase": (18, 1),
    "Unloading_Condition": (19, 1),
    "LED_Alarm_Condition": (20, 1),
    "P_Coefficient": (21, 1),
    "D_Coefficient": (22, 1),
    "I_Coefficient": (23, 1),
    "Minimum_Startup_Force": (24, 2),
    "CW_Dead_Zone": (26, 1),
    "CCW_Dead_Zone": (27, 1),
    "Protection_Current": (28, 2),
    "Angular_Resolution": (30, 1),
    "Homing_Offset": (31, 2),
    "Operating_Mode": (33, 1),
    "Protective_Torque": (34, 1),
    "Protection_Time": (35, 1),
    "Overload_Torque": (36, 1),
    "Velocity_closed_loop_P_proportional_coefficient": (37, 1),
    "Over_Current_Protection_Time": (38, 1),
    "Velocity_closed_loop_I_integral_coefficient": (39, 1),
    "Torque_Enable": (40, 1),
    "Acceleration": (41, 1),
    "Goal_Position": (42, 2),
    "Goal_Time": (44, 2),
    "Goal_Velocity": (46, 2),
    "Torque_Limit": (48, 2),
    "Lock": (55, 1),
    "Present_Position": (56, 2),
    "Present_Velocity": (58, 2),
    "Present_Load": (60, 2),
    "Present_Voltage": (62, 1),
    "Present_Temperature": (63, 1),
    "Status": (65, 1),
    "Moving": (66, 1),
    "Present_Current": (69, 2),
    "Goal_Position_2": (71, 2),
    "Moving_Velocity": (80, 1),
    "Moving_Velocity_Threshold": (80, 1),
    "DTs": (81, 1),
    "Velocity_Unit_factor": (82, 1),
    "Hts": (83, 1),
    "Maximum_Velocity_Limit": (84, 1),
    "Maximum_Acceleration": (85, 1),
    "Acceleration_Multiplier": (86, 1),
}

# Plausible STS3215 factory values (those not listed are 0).
_DEFAULTS: dict[str, int] = {
    "Firmware_Major_Version": 3,
    "Firmware_Minor_Version": 10,
    "Model_Number": STS3215_MODEL_NUMBER,
    "Baud_Rate": 0,
    "Return_Delay_Time": 0,
    "Response_Status_Level": 1,
    "Min_Position_Limit": 0,
    "Max_Position_Limit": 4095,
    "Max_Temperature_Limit": 70,
    "Max_Voltage_Limit": 140,
    "Min_Voltage_Limit": 40,
    "Max_Torque_Limit": 1000,
    "Phase": 12,
    "Unloading_Condition": 44,
    "LED_Alarm_Condition": 47,
    "P_Coefficient": 32,
    "D_Coefficient": 32,
    "I_Coefficient": 0,
    "Minimum_Startup_Force": 16,
    "CW_Dead_Zone": 1,
    "CCW_Dead_Zone": 1,
    "Protection_Current": 500,
    "Angular_Resolution": 1,
    "Homing_Offset": 0,
    "Operating_Mode": 0,
    "Protective_Torque": 20,
    "Protection_Time": 200,
    "Overload_Torque": 80,
    "Velocity_closed_loop_P_proportional_coefficient": 10,
    "Over_Current_Protection_Time": 200,
    "Velocity_closed_loop_I_integral_coefficient": 200,
    "Torque_Enable": 0,
    "Torque_Limit": 1000,
    "Lock": 1,
    "Present_Voltage": 120,
    "Present_Temperature": 30,
    "Moving_Velocity_Threshold": 2,
    "DTs": 32,
    "Velocity_Unit_factor": 1,
    "Maximum_Velocity_Limit": 254,
    "Maximum_Acceleration": 254,
}
_READ_ONLY = set(range(5)) | set(range(56, 72))
_RESOLUTION = 4096
_BAUD_CODES = {
    0: 1_000_000,
    1: 500_000,
    2: 250_000,
    3: 128_000,
    4: 115_200,
    5: 57_600,
    6: 38_400,
    7: 19_200,
}
_SPEEDS = {v: int(k[1:]) for k, v in vars(termios).items() if k[:1] == "B" and k[1:].isdigit()}


def _sign_magnitude_encode(value: int, sign_bit: int) -> int:
    return (-value) | (1 << sign_bit) if value < 0 else value


def _sign_magnitude_decode(value: int, sign_bit: int) -> int:
    return -(value & ~(1 << sign_bit)) if value & (1 << sign_bit) else value


def _in_waiting(fd: int) -> int:
    try:
        return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
    except OSError:
        return 0


def _checksum(body: Iterable[int]) -> int:
    return ~sum(body) & 0xFF


@dataclass(frozen=True)
class Packet:
    """One well-formed instruction packet the emulator received."""

    id: int
    instruction: int
    params: bytes
    time: float


class _Motor:
    def __init__(self, id_: int, position: int):
        self.table = bytearray(TABLE_SIZE)
        for name, value in _DEFAULTS.items():
            self.put(name, value)
        self.put("ID", id_)
        self.actual = position  # encoder position before the homing offset
        self.goal_actual: int | None = None
        self.move_start = (0.0, position)
        self.pending: tuple[int, bytes] | None = None  # REG_WRITE, applied on ACTION
        self.refresh_present()
        self.put("Goal_Position", self.get("Present_Position"))

    def get(self, name: str) -> int:
        addr, size = STS3215_CONTROL_TABLE[name]
        return int.from_bytes(self.table[addr : addr + size], "little")

    def put(self, name: str, value: int) -> None:
        addr, size = STS3215_CONTROL_TABLE[name]
        self.table[addr : addr + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def homing(self) -> int:
        return _sign_magnitude_decode(self.get("Homing_Offset"), 11)

    def refresh_present(self) -> None:
        self.put("Present_Position", (self.actual - self.homing()) % _RESOLUTION)

    def step(self, speed: float | None, now: float) -> None:
        """Advance a move in progress (only when a finite ``speed`` is set)."""
        if self.goal_actual is None:
            return
        if speed is None:
            self.actual, self.goal_actual = self.goal_actual, None
        else:
            t0, start = self.move_start
            travelled = int((now - t0) * speed)
            if travelled >= abs(self.goal_actual - start):
                self.actual, self.goal_actual = self.goal_actual, None
            else:
                self.actual = start + travelled * (1 if self.goal_actual > start else -1)
        self.put("Moving", 0 if self.goal_actual is None else 1)
        self.refresh_present()


class FeetechEmulator:
    """STS3215 servos answering on a pty; ``port`` is the device path to give lerobot.

    ids: the motor ids on the bus (an id left out never answers, like an unplugged motor).
    positions: initial Present_Position, one int for all or ``{id: int}``.
    speed: None moves a motor to its goal at once; a number moves it at that many ticks per second.
    reply_delay_s: extra latency before each status packet (the servo's return delay).
    inter_byte_timeout_s: an incomplete packet is dropped after this much silence (real servos do too).
    check_baudrate: motors hear nothing while the port's baud rate (as set through termios) differs from
        their Baud_Rate register (default 0: 1 Mbps); a rate termios cannot express is not checked.
    """

    def __init__(
        self,
        ids: Iterable[int] = (1, 2, 3, 4, 5, 6),
        *,
        positions: int | Mapping[int, int] = 2048,
        speed: float | None = None,
        reply_delay_s: float = 0.0,
        inter_byte_timeout_s: float = 0.01,
        check_baudrate: bool = True,
        max_log: int = 10_000,
    ):
        self.speed = speed
        self.reply_delay_s = reply_delay_s
        self.inter_byte_timeout_s = inter_byte_timeout_s
        self._lock = threading.RLock()  # the register tables
        self._write_lock = threading.Lock()  # whole packets onto the wire
        self.check_baudrate = check_baudrate
        self._motors: dict[int, _Motor] = {}
        for id_ in ids:
            pos = positions if isinstance(positions, int) else positions.get(id_, 2048)
            self._motors[int(id_)] = _Motor(int(id_), pos)
        self.packets: collections.deque[Packet] = collections.deque(maxlen=max_log)
        self.bad_bytes = 0  # bytes skipped while looking for a well-formed packet
        self.thread_error: Exception | None = None

        self._master, self._slave = os.openpty()
        tty.setraw(self._slave)  # no echo, no line editing; pyserial sets this again when it opens
        os.set_blocking(self._master, False)
        self.port = os.ttyname(self._slave)
        self._wake_r, self._wake_w = os.pipe()
        self._busy = False
        self._last_rx = time.monotonic()
        self._closed = False
        self._thread = threading.Thread(
            target=self._run, name=f"feetech-emulator {self.port}", daemon=True
        )
        self._thread.start()

    # ---- test helpers -------------------------------------------------------------------------------

    @property
    def ids(self) -> list[int]:
        with self._lock:
            return sorted(self._motors)

    @property
    def baudrate(self) -> int | None:
        """The baud rate last set on the port (by lerobot through termios), or None if unknown."""
        speed = termios.tcgetattr(self._slave)[5]
        return _SPEEDS.get(speed)

    def _address(self, name_or_address: str | int, size: int | None) -> tuple[int, int]:
        if isinstance(name_or_address, str):
            addr, default_size = STS3215_CONTROL_TABLE[name_or_address]
        else:
            addr, default_size = int(name_or_address), 1
        return addr, size or default_size

    def _motor(self, id_: int) -> _Motor:
        try:
            return self._motors[id_]
        except KeyError:
            raise KeyError(
                f"no emulated motor with id {id_} (ids: {sorted(self._motors)})"
            ) from None

    def register(self, id_: int, name_or_address: str | int, size: int | None = None) -> int:
        """The raw (unsigned, little-endian) value of a register, e.g. ``register(1, "Goal_Position")``."""
        addr, size = self._address(name_or_address, size)
        with self._lock:
            motor = self._motor(id_)
            motor.step(self.speed, time.monotonic())
            return int.from_bytes(motor.table[addr : addr + size], "little")

    def set_register(
        self, id_: int, name_or_address: str | int, value: int, size: int | None = None
    ) -> None:
        """Set a raw register value directly (read-only registers included); no side effects."""
        addr, size = self._address(name_or_address, size)
        with self._lock:
            self._motor(id_).table[addr : addr + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(
                size, "little"
            )

    def set_present_position(self, id_: int, value: int) -> None:
        """Move the motor (as if by hand) so that Present_Position reads ``value`` (0..4095)."""
        with self._lock:
            motor = self._motor(id_)
            motor.goal_actual = None
            motor.actual = int(value) + motor.homing()
            motor.put("Moving", 0)
            motor.refresh_present()

    def present_position(self, id_: int) -> int:
        return self.register(id_, "Present_Position")

    def goal_position(self, id_: int) -> int:
        """Goal_Position decoded (sign-magnitude, bit 15) as the servo interprets it."""
        return _sign_magnitude_decode(self.register(id_, "Goal_Position"), 15)

    def set_calibration(
        self, id_: int, *, homing_offset: int, range_min: int, range_max: int
    ) -> None:
        """Write Homing_Offset / Min_Position_Limit / Max_Position_Limit as lerobot's write_calibration does.

        The present position is kept (so a test's set_present_position values stay what lerobot reads).
        """
        with self._lock:
            motor = self._motor(id_)
            present = motor.get("Present_Position")
            motor.put("Homing_Offset", _sign_magnitude_encode(int(homing_offset), 11))
            motor.put("Min_Position_Limit", int(range_min))
            motor.put("Max_Position_Limit", int(range_max))
            motor.actual = present + motor.homing()
            motor.refresh_present()

    def apply_calibration(self, calibration: Mapping[str, object]) -> None:
        """Apply a lerobot calibration ({motor name: MotorCalibration or its dict}) to the motors present."""
        for cal in calibration.values():
            get = cal.get if isinstance(cal, Mapping) else lambda k, c=cal: getattr(c, k)
            if int(get("id")) in self._motors:
                self.set_calibration(
                    int(get("id")),
                    homing_offset=int(get("homing_offset")),
                    range_min=int(get("range_min")),
                    range_max=int(get("range_max")),
                )

    def add_motor(self, id_: int, position: int = 2048) -> None:
        with self._lock:
            self._motors[int(id_)] = _Motor(int(id_), position)

    def remove_motor(self, id_: int) -> None:
        """The motor stops answering (unplugged); its registers are forgotten."""
        with self._lock:
            self._motors.pop(int(id_), None)

    def send_raw(self, data: bytes) -> None:
        """Put bytes on the bus towards the host (e.g. noise), as if a device had sent them."""
        self._write(bytes(data))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        self._thread.join(timeout=2)
        for fd in (self._master, self._slave, self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FeetechEmulator(port={self.port!r}, ids={self.ids})"

    # ---- the bus ------------------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        with self._write_lock:
            self._write_locked(data)

    def _write_locked(self, data: bytes) -> None:
        view = memoryview(data)
        deadline = time.monotonic() + 0.5
        while view and not self._closed:
            try:
                view = view[os.write(self._master, view) :]
            except BlockingIOError:  # nobody reads the port and its buffer is full
                if time.monotonic() > deadline:  # drop the rest, as a wire would
                    return
                time.sleep(0.001)
            except OSError as e:
                if e.errno in (errno.EIO, errno.EBADF):
                    return
                raise

    def settle(self, quiet_s: float = 0.02, timeout: float = 2.0) -> bool:
        """Wait until everything the host wrote has been handled (nothing new for ``quiet_s``).

        Writes without a status packet (SYNC_WRITE: lerobot's send_action) return on the host before the
        emulator has seen them; call this before inspecting registers. False if still busy at ``timeout``.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (
                not self._busy
                and _in_waiting(self._master) == 0
                and time.monotonic() - self._last_rx >= quiet_s
            ):
                return True
            time.sleep(0.001)
        return False

    def _run(self) -> None:
        buf = bytearray()
        try:
            while not self._closed:
                timeout = self.inter_byte_timeout_s if buf else 1.0
                ready, _, _ = select.select([self._master, self._wake_r], [], [], timeout)
                if self._wake_r in ready or self._closed:
                    return
                self._busy = True
                if self._master in ready:
                    try:
                        chunk = os.read(self._master, 4096)
                    except BlockingIOError:
                        chunk = b""
                    except OSError as e:
                        if e.errno != errno.EIO:  # EIO: no slave open (we hold one, but...)
                            raise
                        time.sleep(0.01)
                        chunk = b""
                    if chunk:
                        buf += chunk
                        self._last_rx = time.monotonic()
                self._parse(
                    buf, stale=time.monotonic() - self._last_rx >= self.inter_byte_timeout_s
                )
                self._busy = False
        except Exception as e:  # noqa: BLE001 -- surfaced to tests through .thread_error
            self.thread_error = e
        finally:
            self._busy = False

    def _parse(self, buf: bytearray, stale: bool) -> None:
        """Handle every complete packet in ``buf``; skip what cannot be a packet.

        ``stale``: no byte arrived for inter_byte_timeout_s, so an incomplete packet left at the front will
        never be finished (e.g. a garbage header claiming a long body): skip past its first byte.
        """
        while True:
            self._parse_complete(buf)
            if not (buf and stale):
                return
            self.bad_bytes += 1
            del buf[0]

    def _parse_complete(self, buf: bytearray) -> None:
        while buf:
            start = buf.find(b"\xff\xff")
            if start < 0:
                keep = 1 if buf[-1] == 0xFF else 0  # a header may be split across reads
                self.bad_bytes += len(buf) - keep
                del buf[: len(buf) - keep]
                return
            if start:
                self.bad_bytes += start
                del buf[:start]
            if len(buf) < 4:
                break
            id_, length = buf[2], buf[3]
            if (
                id_ == 0xFF or length < 2
            ):  # FF FF FF..: the real header starts later; LEN < 2 is impossible
                self.bad_bytes += 1
                del buf[0]
                continue
            total = length + 4
            if len(buf) < total:
                break
            packet = bytes(buf[:total])
            if _checksum(packet[2:-1]) != packet[-1]:
                self.bad_bytes += 1
                del buf[0]
                continue
            del buf[:total]
            self._handle(Packet(id_, packet[4], packet[5:-1], time.monotonic()))

    def _status(self, id_: int, error: int = 0, params: bytes = b"") -> bytes:
        body = bytes([id_, len(params) + 2, error]) + params
        return b"\xff\xff" + body + bytes([_checksum(body)])

    def _handle(self, pkt: Packet) -> None:
        self.packets.append(pkt)
        baud = self.baudrate if self.check_baudrate else None
        with self._lock:
            now = time.monotonic()
            for motor in self._motors.values():
                motor.step(self.speed, now)
            # the motors that hear this packet: those listening at the port's baud rate
            on_bus = {
                i
                for i, m in self._motors.items()
                if baud is None or _BAUD_CODES.get(m.get("Baud_Rate"), baud) == baud
            }
            replies = self._answer(pkt, on_bus)
        for reply in replies:
            if self.reply_delay_s:
                time.sleep(self.reply_delay_s)
            self._write(reply)

    def _answer(self, pkt: Packet, on_bus: set[int]) -> list[bytes]:
        """The status packets for ``pkt`` (called with the lock held); registers are updated."""
        replies: list[bytes] = []
        targets = sorted(on_bus) if pkt.id == BROADCAST_ID else [pkt.id] if pkt.id in on_bus else []
        unicast = pkt.id != BROADCAST_ID
        if pkt.instruction == PING:
            replies = [
                self._status(i) for i in targets
            ]  # PING answers even at Response_Status_Level 0
        elif pkt.instruction == READ and len(pkt.params) == 2:
            addr, size = pkt.params
            replies = [self._status(i, 0, self._read(i, addr, size)) for i in targets if unicast]
        elif pkt.instruction in (WRITE, REG_WRITE) and pkt.params:
            for id_ in targets:
                answers = unicast and self._answers_all(id_)  # decided before an ID change
                if pkt.instruction == WRITE:
                    self._write_registers(id_, pkt.params[0], pkt.params[1:])
                else:
                    self._motors[id_].pending = (pkt.params[0], pkt.params[1:])
                if answers:
                    replies.append(self._status(id_))
        elif pkt.instruction == ACTION:
            for id_ in targets:
                answers = unicast and self._answers_all(id_)
                motor = self._motors[id_]
                if motor.pending is not None:
                    (addr, data), motor.pending = motor.pending, None
                    self._write_registers(id_, addr, data)
                if answers:
                    replies.append(self._status(id_))
        elif (
            pkt.instruction == RESET
        ):  # factory defaults (keeps the id, as SO-101 set-up would want)
            for id_ in targets:
                answers = unicast and self._answers_all(id_)
                self._motors[id_] = _Motor(id_, self._motors[id_].actual)
                if answers:
                    replies.append(self._status(id_))
        elif pkt.instruction == SYNC_READ and len(pkt.params) >= 2 and not unicast:
            addr, size = pkt.params[0], pkt.params[1]
            for id_ in pkt.params[2:]:  # each servo answers in its turn, in the order listed
                if id_ in on_bus:
                    replies.append(self._status(id_, 0, self._read(id_, addr, size)))
        elif pkt.instruction == SYNC_WRITE and len(pkt.params) >= 2 and not unicast:
            addr, size = pkt.params[0], pkt.params[1]
            block = pkt.params[2:]
            for i in range(0, len(block) - size, size + 1):
                if block[i] in on_bus:
                    self._write_registers(block[i], addr, block[i + 1 : i + 1 + size])
        # anything else (unknown instruction, an absent id, ...) gets no answer
        return replies

    def _answers_all(self, id_: int) -> bool:
        return self._motors[id_].get("Response_Status_Level") != 0

    def _read(self, id_: int, addr: int, size: int) -> bytes:
        data = bytes(self._motors[id_].table[addr : addr + size])
        return data + bytes(size - len(data))  # past the table end reads as zeros

    def _write_registers(self, id_: int, addr: int, data: bytes) -> None:
        motor = self._motors[id_]
        homing_before = motor.homing()
        for offset, byte in enumerate(data):
            a = addr + offset
            if a < TABLE_SIZE and a not in _READ_ONLY:
                motor.table[a] = byte
        touched = set(range(addr, addr + len(data)))
        if touched & {31, 32} and motor.homing() != homing_before:
            motor.refresh_present()  # Present_Position = actual - Homing_Offset
        if touched & {42, 43}:
            goal = _sign_magnitude_decode(motor.get("Goal_Position"), 15)
            lo, hi = motor.get("Min_Position_Limit"), motor.get("Max_Position_Limit")
            if lo < hi:
                goal = min(hi, max(lo, goal))
            motor.goal_actual = goal + motor.homing()
            motor.move_start = (time.monotonic(), motor.actual)
            motor.step(self.speed, time.monotonic())
        if 5 in touched and motor.get("ID") != id_:
            new_id = motor.get("ID")
            if new_id in self._motors or new_id >= BROADCAST_ID:
                motor.put("ID", id_)
            else:
                self._motors[new_id] = self._motors.pop(id_)
