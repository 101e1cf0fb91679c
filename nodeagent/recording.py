"""Payload recording of one lane: every packet on its interface, written to a classic pcap file.

The agent starts a `Recorder` for a lane whose task asks for `payload` recording and stops it when the
lane closes; `stop()` returns the `RecordingResult` (size, SHA-256, counts) that goes into the evidence.

    rec = Recorder("wkabc…", Path(state)/"recordings"/"s-1.pcap", cap_bytes=100 << 20)
    rec.start()
    ...
    result = rec.stop()

How it captures: an AF_PACKET socket (SOCK_RAW, all protocols) bound to the interface's index, both
directions. Kernel timestamps (SO_TIMESTAMPNS) go into the records, so the file has nanosecond timestamps
(magic 0xa1b23c4d). The link type follows the interface: a WireGuard or TUN interface has no link header
(LINKTYPE_RAW); a veth — the router's side of a userspace lane — is Ethernet (LINKTYPE_ETHERNET).
Record the interface the router sees, named like the lane, in the agent's own namespace: a packet socket
keeps its namespace alive, so one inside a userspace lane's box would hold the box (and the veth to it)
until the recorder noticed its TUN had gone.

What it never does is slow the lane down: a packet socket only receives copies, and when the recorder
falls behind the kernel drops copies for this socket alone (counted: `kernel_drops`), never the lane's
packets. A large receive buffer (SO_RCVBUFFORCE) absorbs bursts, and the disk is written by a thread of
its own so that a writeback stall does not stop the reading.

The file is only ever a valid pcap: records are appended whole, the cap stops writing at the first packet
that would cross it (later packets are counted, not written — the file is an exact prefix of the traffic),
and a failed disk write is cut back to the last whole record. The SHA-256 grows with what is written.
After an agent restart, `resume=True` appends to the file it left: the existing records are checked and
hashed again, and an incomplete last record (a crash mid-write) is cut off. What the file cannot tell —
drops, whether the cap was reached, when the recording began — comes from `prior`, the last result or
`snapshot()` the agent kept (`to_dict()` form is fine); without it those start again from this run.

An interface that goes away (the lane was torn down) ends the capture by itself; one that only goes down
and up again does not. `start()` returns at once (a resumed file is checked by the capture thread);
`stop()` writes what the kernel captured up to the call, and returns within `timeout` however the disk is.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import queue
import select
import socket
import struct
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from . import netns
from .clock import Clock
from .errors import AgentError

log = logging.getLogger("wicket.agent.recording")

LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101  # an IPv4 or IPv6 header first; the version nibble tells which
MAGIC_NS = 0xA1B23C4D
MAGIC_US = 0xA1B2C3D4
DEFAULT_SNAPLEN = 262144  # libpcap's MAXIMUM_SNAPLEN: whole GSO/GRO packets (which exceed 65535 on a veth)
DEFAULT_RCVBUF = 32 << 20
FLUSH_BYTES = 256 << 10  # records are handed to the writer in chunks of about this size…
FLUSH_S = 0.25  # …or at least this often: a crash loses at most this much of the recording
HANDOVER_CHUNKS = 128  # chunks waiting for the writer (32 MiB) before the reader waits too
STOP_DRAIN_S = 2.0  # at stop, what the kernel queued before the stop is read for at most this long
STOP_TIMEOUT_S = 5.0
MAX_DOWN_NOTES = 10
# The threads' nice value. 0: a recording competes evenly for the CPU. Forwarding in the kernel runs in softirq
# context and goes first anyway; a positive value also yields to wireguard-go, at the price of kernel drops
# as soon as the machine is busy (measured: at nice 10 on a loaded 2-CPU host, drops from 50 000 packets/s).
DEFAULT_NICE = 0

# ARPHRD_* (include/uapi/linux/if_arp.h) → pcap link type, for what a SOCK_RAW packet socket delivers.
_LINKTYPE_OF_ARPHRD = {
    1: LINKTYPE_ETHERNET,  # ETHER (veth, bridge, physical)
    772: LINKTYPE_ETHERNET,  # LOOPBACK: the kernel gives it an Ethernet header
    0xFFFE: LINKTYPE_RAW,  # NONE: WireGuard, TUN
    519: LINKTYPE_RAW,  # RAWIP
    768: LINKTYPE_RAW,  # TUNNEL (ipip)
    769: LINKTYPE_RAW,  # TUNNEL6 (ip6tnl)
    776: LINKTYPE_RAW,  # SIT
}

# Linux constants Python 3.11's socket module does not export.
_ETH_P_ALL = 0x0003
_SOL_PACKET = 263
_PACKET_STATISTICS = 6
_SO_TIMESTAMPNS = 35
_SO_RCVBUFFORCE = 33
_SIOCGIFINDEX = 0x8933
_SIOCGIFNAME = 0x8910
_GLOBAL = "IHHiIII"  # magic, 2, 4, thiszone, sigfigs, snaplen, linktype: 24 bytes
_GLOBAL_SIZE = 24
_RECORD = "IIII"  # ts_sec, ts_frac (ns or µs, as the magic says), caplen, origlen: 16 bytes
_RECORD_SIZE = 16
_TIMESPEC = struct.Struct("@ll")
_ANCBUF = socket.CMSG_SPACE(_TIMESPEC.size)


class RecordingError(AgentError):
    """A recording could not be started (no such interface, unsupported link type, unusable file)."""


@dataclass
class RecordingResult:
    path: str
    size: int  # bytes of the file
    sha256: str  # of the whole file
    packets: int  # records in the file (after a resume: also those written before the restart)
    bytes: int  # original length of those packets, link header included (Ethernet: 14 per packet)
    dropped_by_cap: int  # packets seen but not written: the cap, or a failed disk write
    bytes_dropped_by_cap: int
    kernel_drops: int  # copies the kernel dropped because the recorder fell behind (PACKET_STATISTICS)
    truncated: bool  # packets are missing from the end of the file
    started_at: datetime
    stopped_at: datetime | None
    linktype: int
    snaplen: int
    end_reason: str  # "stopped" | "interface gone" | "error" | "incomplete" (stop timed out) | "running"
    resumed: bool = False
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["started_at"] = self.started_at.isoformat()
        d["stopped_at"] = self.stopped_at.isoformat() if self.stopped_at else None
        return d


class Recorder:
    """Records one interface into one pcap file. Not reusable: one `start()`, one `stop()`.

    Two threads: the reader turns packets into whole pcap records and hands them over in chunks; the
    writer appends the chunks to the file and to the hash. A slow disk (writeback can stall a writer for
    hundreds of milliseconds) then holds up only the writer, while the reader keeps emptying the socket;
    if the disk stays slower than the traffic, the hand-over queue fills and the kernel drops copies."""

    def __init__(
        self,
        ifname: str,
        path: str | os.PathLike,
        cap_bytes: int,
        netns_fd: int | None = None,
        *,
        snaplen: int = DEFAULT_SNAPLEN,
        resume: bool = False,
        prior: RecordingResult | dict | None = None,
        rcvbuf: int = DEFAULT_RCVBUF,
        nice: int = DEFAULT_NICE,
        clock: Clock | None = None,
    ):
        if cap_bytes < _GLOBAL_SIZE:
            raise ValueError(f"cap_bytes {cap_bytes} is smaller than a pcap header")
        if not 1 <= snaplen <= DEFAULT_SNAPLEN:
            raise ValueError(f"snaplen must be 1..{DEFAULT_SNAPLEN}")
        self.ifname, self.path, self.cap = ifname, Path(path), cap_bytes
        self.netns_fd, self.snaplen, self.resume, self.rcvbuf, self.nice = netns_fd, snaplen, resume, rcvbuf, nice
        self.clock = clock or Clock()
        self._sock: socket.socket | None = None
        self._fd: int | None = None
        self._ifindex = 0
        self._linktype = 0
        self._fmt = _Format("<", True)  # of the file: a resumed one keeps its own
        self._wake_r = self._wake_w = -1
        self._reader: threading.Thread | None = None
        self._writer: threading.Thread | None = None
        self._chunks: queue.Queue[bytearray | None] = queue.Queue(maxsize=HANDOVER_CHUNKS)
        self._pending = bytearray()  # whole records the reader has not handed over yet
        self._stopping = threading.Event()
        self._final = threading.Event()  # the file's content and the result are final
        self._lock = threading.Lock()  # the counters below, for a consistent snapshot from another thread
        self._hash = hashlib.sha256()
        self._committed = 0  # bytes in the file and in the hash
        self._size = 0  # bytes in the file or on their way to it: what the cap is checked against
        self._packets = self._bytes = self._dropped = self._dropped_bytes = self._kernel_drops = 0
        self._truncated = self._write_failed = False
        self._downs = 0
        self._end_reason = "running"
        self._notes: list[str] = []
        self._started_at: datetime | None = None
        self._stopped_at: datetime | None = None
        self._scan_from: int | None = None  # resume: the existing records still to be checked and hashed
        self._result: RecordingResult | None = None
        if resume and prior is not None:
            self._carry(prior if isinstance(prior, dict) else prior.to_dict())

    # ---- public ----

    def start(self) -> None:
        """Open the socket and the file and start capturing. Raises RecordingError."""
        if self._reader is not None:
            raise RuntimeError("a Recorder is started once")
        try:
            self._open_socket()
            self._open_file()
            self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except BaseException:
            self._close_socket()
            self._close_file()
            raise
        self._started_at = self._started_at or datetime.fromtimestamp(self.clock.wall(), UTC)
        self._writer = threading.Thread(target=self._write_loop, name=f"recorder-w-{self.ifname}", daemon=True)
        self._reader = threading.Thread(target=self._read_loop, name=f"recorder-{self.ifname}", daemon=True)
        self._writer.start()
        self._reader.start()
        log.info("[#] recording %s → %s (cap %d B, linktype %d%s)", self.ifname, self.path, self.cap,
                 self._linktype, ", resumed" if self.resume else "")

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> RecordingResult:
        """End the capture and return the result. What the kernel captured before this call is still
        written; then the file is final. Returns within about `timeout` seconds even if the disk hangs:
        the result then says "incomplete" and its hash covers only what was written by then."""
        if self._reader is None:
            raise RuntimeError("the Recorder was not started")
        if self._result is not None:
            return self._result
        self._stopping.set()
        os.write(self._wake_w, b"x")  # the pipe stays open until the threads are done: this is never lost
        if not self._final.wait(timeout):
            with self._lock:
                self._end_reason = "incomplete"
                self._notes.append(f"the recording did not finish within {timeout:g} s (disk?): "
                                   "its size and hash cover only what was written by then")
        else:
            self._reader.join(timeout)
            for fd in (self._wake_r, self._wake_w):
                os.close(fd)
            self._wake_r = self._wake_w = -1
        result = self._result = self.snapshot()
        log.info("[#] recording %s ended (%s): %d packets, %d B in %s, sha256 %s%s", self.ifname, result.end_reason,
                 result.packets, result.size, self.path, result.sha256[:16], ", truncated" if result.truncated else "")
        return result

    @property
    def running(self) -> bool:
        return self._reader is not None and not self._final.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the capture to end by itself (interface gone, error); True if it has. Call stop() after."""
        return self._final.wait(timeout)

    def snapshot(self) -> RecordingResult:
        """The counts so far, final once the recording ended. `size` and `sha256` cover what is in the file;
        while running, `packets` and `bytes` also count records still on their way to it."""
        with self._lock:
            return RecordingResult(
                path=str(self.path),
                size=self._committed,
                sha256=self._hash.hexdigest(),
                packets=self._packets,
                bytes=self._bytes,
                dropped_by_cap=self._dropped,
                bytes_dropped_by_cap=self._dropped_bytes,
                kernel_drops=self._kernel_drops,
                truncated=self._truncated,
                started_at=self._started_at or datetime.fromtimestamp(self.clock.wall(), UTC),
                stopped_at=self._stopped_at,
                linktype=self._linktype,
                snaplen=self.snaplen,
                end_reason=self._end_reason,
                resumed=self.resume,
                notes=list(self._notes),
            )

    def __enter__(self) -> Recorder:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._reader is not None:
            self.stop()

    def _carry(self, prior: dict) -> None:
        """Counts from before a restart that the file does not hold."""
        self._dropped = prior.get("dropped_by_cap", 0)
        self._dropped_bytes = prior.get("bytes_dropped_by_cap", 0)
        self._kernel_drops = prior.get("kernel_drops", 0)
        self._truncated = bool(prior.get("truncated"))  # once the cap is reached, nothing more is written
        if prior.get("started_at"):
            self._started_at = datetime.fromisoformat(prior["started_at"])

    # ---- opening ----

    def _open_socket(self) -> None:
        if self.netns_fd is None:
            sock = self._bind()
        else:
            with netns.entered(self.netns_fd):  # the socket stays in the lane's namespace
                sock = self._bind()
        self._sock = sock
        hatype = sock.getsockname()[3]
        linktype = _LINKTYPE_OF_ARPHRD.get(hatype)
        if linktype is None:
            raise RecordingError(f"{self.ifname}: link type ARPHRD {hatype} is not supported for recording")
        self._linktype = linktype
        self._read_kernel_drops()  # the counter runs from bind; reading it resets it

    def _bind(self) -> socket.socket:
        # Protocol 0 until bind: a packet socket created with ETH_P_ALL would see every interface until then.
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        try:
            # Before bind: the kernel switches its receive timestamps on a moment later (deferred work), and
            # until then stamps a packet when it is read instead.
            sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
            try:
                sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, self.rcvbuf)
            except PermissionError:  # without CAP_NET_ADMIN the buffer is capped at net.core.rmem_max
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
            sock.setblocking(False)
            self._ifindex = _ifindex(sock, self.ifname)
            sock.bind((self.ifname, _ETH_P_ALL))
            if _ifname(sock, self._ifindex) != self.ifname:
                raise RecordingError(f"{self.ifname} changed while the recorder was binding to it")
        except OSError as exc:
            sock.close()
            if exc.errno in (errno.ENODEV, errno.ENXIO):
                raise RecordingError(f"no interface {self.ifname} to record") from exc
            raise RecordingError(f"{self.ifname}: opening a packet socket: {exc}") from exc
        except BaseException:
            sock.close()
            raise
        return sock

    def _open_file(self) -> None:
        directory = self.path.parent
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if directory.stat().st_mode & 0o077:
            os.chmod(directory, 0o700)
            log.info("[#] chmod 0700 %s", directory)
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        if not self.resume:
            flags |= os.O_TRUNC
        try:
            self._fd = os.open(self.path, flags, 0o600)
            os.fchmod(self._fd, 0o600)
            size = os.fstat(self._fd).st_size
            if self.resume and size >= _GLOBAL_SIZE:
                self._check_header(os.pread(self._fd, _GLOBAL_SIZE, 0))
                self._scan_from = size
                return
            if self.resume:
                self._notes.append(f"nothing to resume: the file held {size} bytes, started it again")
                os.ftruncate(self._fd, 0)
            header = struct.pack("<" + _GLOBAL, MAGIC_NS, 2, 4, 0, 0, self.snaplen, self._linktype)
            _write_all(self._fd, header, 0)
        except OSError as exc:
            raise RecordingError(f"{self.path}: {exc.strerror or exc}") from exc
        self._hash.update(header)
        self._committed = self._size = len(header)

    def _check_header(self, raw: bytes) -> None:
        magic_le = struct.unpack_from("<I", raw)[0]
        endian = "<" if magic_le in (MAGIC_NS, MAGIC_US) else ">"
        magic = struct.unpack_from(endian + "I", raw)[0]
        if magic not in (MAGIC_NS, MAGIC_US):
            raise RecordingError(f"{self.path} is not a pcap file (magic {magic_le:#010x}): not appending to it")
        _m, major, minor, _z, _s, snaplen, linktype = struct.unpack(endian + _GLOBAL, raw)
        if (major, minor) != (2, 4):
            raise RecordingError(f"{self.path}: pcap version {major}.{minor}, not 2.4: not appending to it")
        if linktype != self._linktype:
            raise RecordingError(
                f"{self.path} holds link type {linktype}, {self.ifname} now gives {self._linktype}: not appending")
        self._fmt = _Format(endian, magic == MAGIC_NS)
        self.snaplen = min(self.snaplen, snaplen)  # records must not exceed the snaplen the header announces

    # ---- the reader ----

    def _read_loop(self) -> None:
        self._lower_priority()
        try:
            if self._scan_from is not None:
                self._scan_existing(self._scan_from)
            self._capture()
        except Exception as exc:  # the recording ends; the lane does not
            log.error("recording %s failed: %s", self.ifname, exc)
            self._end("error", f"recording failed: {exc}")
        finally:
            self._read_kernel_drops()
            self._close_socket()
            self._chunks.put(self._pending)  # records already counted: they go to the file whatever happened
            self._chunks.put(None)  # the writer finishes what it has, then the recording is final  # the writer finishes what it has, then the recording is final

    def _capture(self) -> None:
        sock = self._sock
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        view = memoryview(bytearray(self.snaplen))
        last_flush = last_check = self.clock.mono()
        draining = False
        drain_until = 0.0
        while True:
            now = self.clock.mono()
            if not draining and self._stopping.is_set():
                # Unhook from the interface: nothing more is queued, what is queued stays to be read.
                draining, drain_until = True, now + STOP_DRAIN_S
                try:
                    sock.bind((self.ifname, 0))
                except OSError:
                    pass  # the interface is gone: its hook went with it
            try:
                got = self._read_batch(sock, view)
            except OSError as exc:
                if exc.errno != errno.ENETDOWN:
                    raise
                got = 1  # "down" is reported once, then reading goes on: it may come up again
                if self._interface_exists():
                    self._note_down()
                else:
                    return self._interface_gone(sock, view)
            if len(self._pending) >= FLUSH_BYTES or (self._pending and now - last_flush >= FLUSH_S):
                chunk, self._pending = self._pending, bytearray()
                self._chunks.put(chunk)  # blocks only while the writer is a whole queue behind
                last_flush = now
            if draining:
                if got == 0:
                    return self._end("stopped")
                if now >= drain_until:
                    return self._end("stopped", "stopped before all that was captured could be read: "
                                                "the rest was not recorded")
                continue
            if now - last_check >= 1.0:
                last_check = now
                self._read_kernel_drops()
                if not self._interface_exists():
                    return self._interface_gone(sock, view)
            if got == 0:
                for fd, _ev in poller.poll(FLUSH_S * 1000):
                    if fd == self._wake_r:
                        os.read(self._wake_r, 64)

    def _read_batch(self, sock: socket.socket, view: memoryview, limit: int = 512) -> int:
        """Turn up to `limit` queued packets into records; how many were read."""
        n = 0
        pack = struct.Struct(self._fmt.endian + _RECORD).pack
        nanos, snaplen, pending = self._fmt.nanos, self.snaplen, self._pending
        while n < limit:
            try:
                length, anc, _flags, _addr = sock.recvmsg_into([view], _ANCBUF, socket.MSG_TRUNC)
            except BlockingIOError:
                break
            n += 1
            sec, nsec = _kernel_time(anc) or divmod(time.time_ns(), 1_000_000_000)
            caplen = min(length, snaplen)
            with self._lock:
                if self._truncated or self._size + _RECORD_SIZE + caplen > self.cap:
                    self._truncate_by_cap(length)
                    continue
                self._packets += 1
                self._bytes += length
                self._size += _RECORD_SIZE + caplen
            pending += pack(sec, nsec if nanos else nsec // 1000, caplen, length)
            pending += view[:caplen]
        return n

    def _truncate_by_cap(self, length: int) -> None:
        if not self._truncated:
            self._truncated = True
            if not self._write_failed:
                self._notes.append(f"the cap of {self.cap} bytes was reached at "
                                   f"{datetime.fromtimestamp(self.clock.wall(), UTC).isoformat()}: later packets not written")
                log.info("recording %s reached its cap of %d bytes", self.ifname, self.cap)
        self._dropped += 1
        self._dropped_bytes += length

    def _interface_gone(self, sock: socket.socket, view: memoryview) -> None:
        while self._read_batch(sock, view):  # what the kernel queued before it went
            pass
        self._end("interface gone")
        log.info("recording %s: the interface is gone, capture ended", self.ifname)

    def _note_down(self) -> None:
        with self._lock:
            self._downs += 1
            if self._downs <= MAX_DOWN_NOTES:
                self._notes.append(f"the interface went down at {datetime.fromtimestamp(self.clock.wall(), UTC).isoformat()}")

    def _end(self, reason: str, note: str | None = None) -> None:
        with self._lock:
            if self._end_reason == "running":
                self._end_reason = reason
            if note:
                self._notes.append(note)

    def _read_kernel_drops(self) -> None:
        if self._sock is None:
            return
        try:
            _packets, drops = struct.unpack("II", self._sock.getsockopt(_SOL_PACKET, _PACKET_STATISTICS, 8))
        except OSError:
            return
        with self._lock:
            self._kernel_drops += drops

    def _interface_exists(self) -> bool:
        """Is our interface (by index, in the socket's namespace) still there? Recreated under the same name
        it is another interface, with another index."""
        try:
            return _ifname(self._sock, self._ifindex) == self.ifname
        except OSError:
            return False

    def _scan_existing(self, size: int) -> None:
        """Resume: walk the records already in the file, hash them, cut an incomplete last one."""
        fd, fmt = self._fd, self._fmt
        h = hashlib.sha256(os.pread(fd, _GLOBAL_SIZE, 0))
        rec = struct.Struct(fmt.endian + _RECORD)
        bound = max(self.snaplen, DEFAULT_SNAPLEN)
        packets = total = 0
        base = _GLOBAL_SIZE  # file offset of buf[0]
        buf = bytearray()
        damaged_at = None
        while True:
            chunk = os.pread(fd, 1 << 20, base + len(buf))
            buf += chunk
            i = 0
            while i + _RECORD_SIZE <= len(buf):
                _s, _f, caplen, origlen = rec.unpack_from(buf, i)
                if origlen == 0 or caplen > origlen or caplen > bound:
                    damaged_at = base + i
                    break
                if i + _RECORD_SIZE + caplen > len(buf):
                    break
                packets += 1
                total += origlen
                i += _RECORD_SIZE + caplen
            h.update(bytes(buf[:i]))
            del buf[:i]
            base += i
            if damaged_at is not None or not chunk:
                break
        end = base
        if end < size:
            if damaged_at is not None and not _zeros(fd, end, size):
                raise RecordingError(f"{self.path} is damaged at byte {damaged_at}: not appending to it")
            os.ftruncate(fd, end)
            self._notes.append(f"resumed: cut {size - end} bytes of an incomplete last record")
        self._notes.append(f"resumed after {packets} packets ({end} bytes) already recorded")
        with self._lock:
            self._hash = h
            self._committed = self._size = end
            self._packets, self._bytes = packets, total
            if end > self.cap:
                self._truncated = True
                self._notes.append(f"the file already exceeds the cap of {self.cap} bytes: nothing more written")

    # ---- the writer ----

    def _write_loop(self) -> None:
        self._lower_priority()
        try:
            while (chunk := self._chunks.get()) is not None:
                if chunk:
                    try:
                        self._write(chunk)
                    except Exception as exc:  # keep emptying the queue, or the reader would wait forever
                        log.error("recording %s: writer failed: %s", self.ifname, exc)
                        self._end("error", f"writing failed: {exc}")
                        self._write_failed = True
        finally:
            with self._lock:
                self._stopped_at = datetime.fromtimestamp(self.clock.wall(), UTC)
            self._final.set()
            try:
                os.fsync(self._fd)  # the content is final already; this only makes it durable
            except OSError as exc:
                log.error("recording %s: fsync %s: %s", self.ifname, self.path, exc)
            self._close_file()

    def _write(self, chunk: bytearray) -> None:
        if self._write_failed:
            return self._lose(chunk)
        try:
            _write_all(self._fd, chunk, self._committed)
        except OSError as exc:
            # Keep the file a valid pcap: cut back to the last whole record; what did not fit is dropped.
            log.error("recording %s: writing %s failed: %s", self.ifname, self.path, exc)
            try:
                os.ftruncate(self._fd, self._committed)
            except OSError:
                pass
            with self._lock:
                self._write_failed = self._truncated = True
                self._notes.append(f"writing the file failed ({exc.strerror or exc}): later packets not written")
            return self._lose(chunk)
        with self._lock:
            self._hash.update(chunk)
            self._committed += len(chunk)

    def _lose(self, chunk: bytearray) -> None:
        lost, lost_bytes, lost_size = _count_records(chunk, self._fmt)
        with self._lock:
            self._packets -= lost
            self._bytes -= lost_bytes
            self._size -= lost_size
            self._dropped += lost
            self._dropped_bytes += lost_bytes

    def _lower_priority(self) -> None:
        """On Linux a nice value belongs to the thread: this one's, not the agent's."""
        if not self.nice:
            return
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.nice)
        except OSError as exc:
            log.debug("recording %s: setpriority: %s", self.ifname, exc)

    def _close_socket(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _close_file(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None


@dataclass(frozen=True)
class _Format:
    endian: str  # "<" or ">"
    nanos: bool


def _ifindex(sock: socket.socket, ifname: str) -> int:
    ifr = struct.pack("16si20x", ifname.encode(), 0)
    return struct.unpack_from("16si", fcntl.ioctl(sock.fileno(), _SIOCGIFINDEX, ifr))[1]


def _ifname(sock: socket.socket, ifindex: int) -> str:
    """The name of interface `ifindex` in the socket's own namespace (OSError ENODEV if there is none)."""
    ifr = struct.pack("16si20x", b"", ifindex)
    return fcntl.ioctl(sock.fileno(), _SIOCGIFNAME, ifr)[:16].split(b"\0", 1)[0].decode()


def _kernel_time(anc: list) -> tuple[int, int] | None:
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS and len(data) >= _TIMESPEC.size:
            return _TIMESPEC.unpack_from(data)
    return None


def _zeros(fd: int, start: int, end: int) -> bool:
    """Only zero bytes from start to end (the tail a power loss leaves)?"""
    while start < end:
        chunk = os.pread(fd, min(1 << 20, end - start), start)
        if not chunk or chunk.count(0) != len(chunk):
            return bool(not chunk)
        start += len(chunk)
    return True


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _count_records(data: bytearray, fmt: _Format) -> tuple[int, int, int]:
    """(records, their original bytes, their size in the file) in a chunk of whole records."""
    rec = struct.Struct(fmt.endian + _RECORD)
    i = n = total = 0
    while i + _RECORD_SIZE <= len(data):
        _s, _f, caplen, origlen = rec.unpack_from(data, i)
        n, total, i = n + 1, total + origlen, i + _RECORD_SIZE + caplen
    return n, total, i


__all__ = ["LINKTYPE_ETHERNET", "LINKTYPE_RAW", "Recorder", "RecordingError", "RecordingResult"]
