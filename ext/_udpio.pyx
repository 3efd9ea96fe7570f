# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Batched UDP I/O for the packet path: recvmmsg/sendmmsg on Linux, a plain loop elsewhere.

A datagram costs about as much in system calls as the forwarder spends on it, so the relay
moves datagrams in batches: one recvmmsg fills rows of a numpy arena (the same arena
``FastForwarder.forward_batch`` reads), and one sendmmsg sends every (output, receiver) pair
of a forwarded batch straight out of the forwarder's output arena, receivers of one variant
pointing at the same bytes; that path allocates nothing per datagram. ``BatchedDatagramReader``
hooks a socket into asyncio: its reader callback drains the socket batch by batch.

The server's endpoint ports, which still hand every datagram to Python, use the same calls
through ``DatagramReceiver`` (one recvmmsg, then a bytes object and an address tuple per
datagram, as asyncio would give them) and ``send_datagrams`` (one receiver's queued bytes
objects in one sendmmsg, GSO runs included).

Addresses are raw sockaddr bytes (``pack_address``) kept in fixed ``ADDR_SIZE`` rows, so a
receiver slot indexes an address table without Python objects.
"""

import asyncio
import os
from collections.abc import Callable

import numpy as np

from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t
from libc.stdlib cimport free, malloc
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.list cimport PyList_GET_ITEM
from libc.string cimport memcmp, memcpy, memset

from sockets cimport (
    AF_INET,
    CTMS_HAVE_GSO,
    ctms_set_gso,
    sendmsg,
    AF_INET6,
    CTMS_HAVE_MMSG,
    UDP_SEGMENT,
    EAGAIN,
    EINTR,
    EWOULDBLOCK,
    MSG_DONTWAIT,
    MSG_TRUNC,
    errno,
    inet_ntop,
    inet_pton,
    iovec,
    mmsghdr,
    msghdr,
    ntohs,
    htons,
    recvfrom,
    recvmmsg,
    sendmmsg,
    sendto,
    sockaddr,
    sockaddr_in,
    sockaddr_in6,
    socklen_t,
)

cdef enum:
    CHUNK = 256         # messages per recvmmsg/sendmmsg call
    C_ADDR_SIZE = 32    # bytes per address row; a sockaddr_in6 is 28
    MAX_SEGS = 64       # datagrams per UDP_SEGMENT message (the kernel's older limit)
    GSO_BYTES = 60000   # payload bytes per UDP_SEGMENT message (below 64 KiB)
    IOV_TOTAL = 1024
    CTRL_BYTES = 32     # control buffer per message, >= CMSG_SPACE(2)

ADDR_SIZE = C_ADDR_SIZE
HAVE_MMSG = bool(CTMS_HAVE_MMSG)
HAVE_GSO = bool(CTMS_HAVE_GSO)


cdef inline int _again(int e) noexcept nogil:
    # Two statements: on Linux EAGAIN == EWOULDBLOCK and a folded switch would not compile.
    if e == EAGAIN:
        return 1
    return e == EWOULDBLOCK


def pack_address(host: str, port: int) -> bytes:
    """The sockaddr bytes for an IPv4 or IPv6 literal and a port."""
    cdef sockaddr_in a4
    cdef sockaddr_in6 a6
    cdef bytes h = host.encode("ascii")
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port {port} out of range")
    memset(&a4, 0, sizeof(a4))
    memset(&a6, 0, sizeof(a6))
    if inet_pton(AF_INET, h, &a4.sin_addr) == 1:
        a4.sin_family = AF_INET
        a4.sin_port = htons(port)
        return (<char *>&a4)[:sizeof(a4)]
    if inet_pton(AF_INET6, h, &a6.sin6_addr) == 1:
        a6.sin6_family = AF_INET6
        a6.sin6_port = htons(port)
        return (<char *>&a6)[:sizeof(a6)]
    raise ValueError(f"{host!r} is not an IPv4 or IPv6 address literal")


def unpack_address(const uint8_t[::1] raw) -> tuple:
    """(host, port) of sockaddr bytes made by pack_address or filled by recv_batch."""
    cdef sockaddr_in a4
    cdef sockaddr_in6 a6
    cdef char text[64]
    cdef Py_ssize_t n = raw.shape[0]
    if n >= <Py_ssize_t>sizeof(sockaddr_in6):
        memcpy(&a6, &raw[0], sizeof(a6))
        if a6.sin6_family == AF_INET6:
            inet_ntop(AF_INET6, &a6.sin6_addr, text, 64)
            return text.decode("ascii"), ntohs(a6.sin6_port)
    if n >= <Py_ssize_t>sizeof(sockaddr_in):
        memcpy(&a4, &raw[0], sizeof(a4))
        if a4.sin_family == AF_INET:
            inet_ntop(AF_INET, &a4.sin_addr, text, 64)
            return text.decode("ascii"), ntohs(a4.sin_port)
    raise ValueError("not an AF_INET/AF_INET6 sockaddr")


def recv_batch(int fd, uint8_t[:, ::1] arena, int32_t[::1] lengths,
               uint8_t[:, ::1] addrs=None, int32_t[::1] addrlens=None,
               Py_ssize_t max_count=-1, bint use_mmsg=True) -> int:
    """Receive up to ``max_count`` (default: the arena's rows) waiting datagrams without
    blocking: row i of ``arena`` gets datagram i, ``lengths[i]`` its size (0 for a datagram
    longer than a row: never cut and processed, so it drops as `malformed`), ``addrs[i]``/``addrlens[i]`` its source. Returns how many
    arrived; 0 when none is waiting. Raises OSError for socket errors other than EAGAIN."""
    return _recv(fd, arena, lengths, addrs, addrlens, max_count, use_mmsg)


cdef Py_ssize_t _recv(int fd, uint8_t[:, ::1] arena, int32_t[::1] lengths,
                      uint8_t[:, ::1] addrs, int32_t[::1] addrlens,
                      Py_ssize_t max_count, bint use_mmsg, bint real_length=False) except -1:
    # real_length: lengths[i] is the datagram's own size even when it exceeds a row (the
    # row then holds only its start); otherwise such a datagram reads as length 0.
    cdef Py_ssize_t count = arena.shape[0]
    cdef Py_ssize_t slot = arena.shape[1]
    cdef Py_ssize_t total = 0, chunk, i
    cdef int got, err = 0
    cdef mmsghdr msgs[CHUNK]
    cdef iovec iov[CHUNK]
    cdef socklen_t alen
    cdef ssize_t r
    cdef bint want_addr = addrs is not None
    if max_count >= 0:
        count = min(count, max_count)
    count = min(count, lengths.shape[0])
    if want_addr:
        if addrlens is None or addrs.shape[1] < C_ADDR_SIZE:
            raise ValueError(f"addrs needs rows of {C_ADDR_SIZE} bytes and addrlens")
        count = min(count, addrs.shape[0], addrlens.shape[0])
    if count <= 0 or slot <= 0:
        return 0
    if use_mmsg and CTMS_HAVE_MMSG:
        with nogil:
            while total < count:
                chunk = min(<Py_ssize_t>CHUNK, count - total)
                memset(msgs, 0, chunk * sizeof(mmsghdr))
                for i in range(chunk):
                    iov[i].iov_base = &arena[total + i, 0]
                    iov[i].iov_len = slot
                    msgs[i].msg_hdr.msg_iov = &iov[i]
                    msgs[i].msg_hdr.msg_iovlen = 1
                    if want_addr:
                        msgs[i].msg_hdr.msg_name = &addrs[total + i, 0]
                        msgs[i].msg_hdr.msg_namelen = C_ADDR_SIZE
                got = recvmmsg(fd, msgs, <unsigned int>chunk,
                               MSG_DONTWAIT | (MSG_TRUNC if real_length else 0), NULL)
                if got < 0:
                    if errno == EINTR:
                        continue
                    if not _again(errno):
                        err = errno
                    break
                for i in range(got):
                    # A datagram longer than a row is never cut and processed: length 0
                    # makes it `malformed`, as the server drops an oversize datagram.
                    if msgs[i].msg_hdr.msg_flags & MSG_TRUNC and not real_length:
                        lengths[total + i] = 0
                    else:
                        lengths[total + i] = msgs[i].msg_len
                    if want_addr:
                        addrlens[total + i] = msgs[i].msg_hdr.msg_namelen
                total += got
                if got < chunk:
                    break
    else:
        with nogil:
            while total < count:
                alen = C_ADDR_SIZE
                r = recvfrom(fd, &arena[total, 0], slot, MSG_DONTWAIT | MSG_TRUNC,
                             <sockaddr *>&addrs[total, 0] if want_addr else NULL,
                             &alen if want_addr else NULL)
                if r < 0:
                    if errno == EINTR:
                        continue
                    if not _again(errno):
                        err = errno
                    break
                # MSG_TRUNC: r is the real size
                lengths[total] = <int32_t>r if r <= slot or real_length else 0
                if want_addr:
                    addrlens[total] = alen
                total += 1
    if err and not total:
        raise OSError(err, os.strerror(err))
    return total


cdef struct Outbox:
    # the messages of one sendmmsg call; a GSO message carries several datagrams (segments)
    mmsghdr msgs[CHUNK]
    iovec iov[IOV_TOTAL]
    char ctrl[CHUNK][CTRL_BYTES]
    int segs[CHUNK]
    int slot[CHUNK]
    int64_t seglen[CHUNK]
    int64_t bytes[CHUNK]
    Py_ssize_t nmsg
    Py_ssize_t niov
    Py_ssize_t sent
    Py_ssize_t dropped
    int err


cdef void _flush(int fd, Outbox *b, bint use_mmsg) noexcept nogil:
    """Send the outbox; count datagrams sent and dropped. A message the kernel refuses (other
    than for a full buffer) is skipped and counted; a full buffer of a non-blocking socket
    drops the rest."""
    cdef Py_ssize_t done = 0, i, n = b.nmsg
    cdef int got
    cdef ssize_t r
    while done < n:
        if use_mmsg and CTMS_HAVE_MMSG:
            got = sendmmsg(fd, b.msgs + done, <unsigned int>(n - done), 0)
            if got >= 0:
                for i in range(done, done + got):
                    b.sent += b.segs[i]
                done += got
                continue
        else:
            r = sendmsg(fd, &b.msgs[done].msg_hdr, 0)
            if r >= 0:
                b.sent += b.segs[done]
                done += 1
                continue
        if errno == EINTR:
            continue
        b.err = errno
        if _again(errno):
            for i in range(done, n):
                b.dropped += b.segs[i]
            break
        b.dropped += b.segs[done]
        done += 1  # this one failed (e.g. ECONNREFUSED, ENETUNREACH): skip it
    b.nmsg = 0
    b.niov = 0


cdef inline void _extend_message(Outbox *b, Py_ssize_t m, const void *data,
                                 int64_t length, int seglen) noexcept nogil:
    """One more GSO segment on message ``m`` (the control message is set at its second)."""
    b.iov[b.niov].iov_base = <void *>data
    b.iov[b.niov].iov_len = length
    b.niov += 1
    b.segs[m] += 1
    b.bytes[m] += length
    b.msgs[m].msg_hdr.msg_iovlen += 1
    if b.segs[m] == 2:
        ctms_set_gso(&b.msgs[m].msg_hdr, b.ctrl[m], <unsigned short>seglen)


cdef inline Py_ssize_t _new_message(Outbox *b, const void *data, int64_t length,
                                    const uint8_t *name, socklen_t namelen) noexcept nogil:
    """A message of its own for one datagram; returns its index."""
    cdef Py_ssize_t m = b.nmsg
    cdef msghdr *h
    memset(&b.msgs[m], 0, sizeof(mmsghdr))
    h = &b.msgs[m].msg_hdr
    b.iov[b.niov].iov_base = <void *>data
    b.iov[b.niov].iov_len = length
    h.msg_iov = &b.iov[b.niov]
    h.msg_iovlen = 1
    h.msg_name = <void *>name
    h.msg_namelen = namelen
    b.niov += 1
    b.segs[m] = 1
    b.seglen[m] = length
    b.bytes[m] = length
    b.nmsg += 1
    return m


cdef void _queue(int fd, Outbox *b, const uint8_t *data, int64_t length, int slot,
                 const uint8_t *name, socklen_t namelen, bint use_mmsg,
                 bint gso) noexcept nogil:
    """Add one datagram: one more GSO segment of the previous message when it goes to the
    same receiver with the same length, else a message of its own."""
    cdef Py_ssize_t m = b.nmsg - 1
    if (gso and m >= 0 and b.slot[m] == slot and b.seglen[m] == length
            and b.segs[m] < MAX_SEGS and b.bytes[m] + length <= GSO_BYTES
            and b.niov < IOV_TOTAL):
        _extend_message(b, m, data, length, <int>length)
        return
    if b.nmsg == CHUNK or b.niov == IOV_TOTAL:
        _flush(fd, b, use_mmsg)
    m = _new_message(b, data, length, name, namelen)
    b.slot[m] = slot


def gso_supported(sock) -> bool:
    """True if the kernel offers UDP segmentation offload (UDP_SEGMENT) on this socket."""
    if not CTMS_HAVE_GSO:
        return False
    try:
        sock.getsockopt(17, UDP_SEGMENT)  # SOL_UDP
    except OSError:
        return False
    return True


def send_outputs(int fd, const uint8_t[::1] out_arena, const int64_t[:, ::1] out_meta,
                 Py_ssize_t n_out, const int32_t[::1] out_receivers,
                 const uint8_t[:, ::1] addr_table, const int32_t[::1] addr_lens,
                 bint use_mmsg=True, bint gso=False) -> tuple:
    """Send every output of ``FastForwarder.forward_batch`` to each of its receivers.

    ``out_meta`` rows are (offset, length, receivers start, receivers count, ...); receiver
    slot s goes to ``addr_table[s]`` (``addr_lens[s]`` bytes; 0 = no address yet: skipped).
    Receivers of one output share its bytes (one iovec each, no copy). With ``gso``
    (see gso_supported), consecutive datagrams of equal length to one receiver leave as one
    UDP_SEGMENT message: one trip through the stack instead of one per datagram.
    Returns (datagrams sent, datagrams dropped or skipped)."""
    return _send_outputs(fd, out_arena, out_meta, n_out, out_receivers, addr_table, addr_lens,
                         use_mmsg, gso)


cdef tuple _send_outputs(int fd, const uint8_t[::1] out_arena, const int64_t[:, ::1] out_meta,
                         Py_ssize_t n_out, const int32_t[::1] out_receivers,
                         const uint8_t[:, ::1] addr_table, const int32_t[::1] addr_lens,
                         bint use_mmsg, bint gso):
    cdef Outbox *b
    cdef Py_ssize_t j, k, skipped = 0
    cdef int64_t off, length, rs, rc
    cdef int32_t slot
    cdef Py_ssize_t nslots = min(addr_table.shape[0], addr_lens.shape[0])
    cdef bint use_gso = gso and CTMS_HAVE_GSO
    if n_out > out_meta.shape[0]:
        raise ValueError("n_out exceeds out_meta")
    if n_out and out_meta.shape[1] < 4:
        raise ValueError("out_meta needs (offset, length, receivers start, count) columns")
    for j in range(n_out):
        off, length, rs, rc = out_meta[j, 0], out_meta[j, 1], out_meta[j, 2], out_meta[j, 3]
        if off < 0 or length < 0 or off + length > out_arena.shape[0] or length > 0xFFFF:
            raise ValueError(f"output {j} lies outside out_arena")
        if rs < 0 or rc < 0 or rs + rc > out_receivers.shape[0]:
            raise ValueError(f"output {j} names receivers outside out_receivers")
    b = <Outbox *>malloc(sizeof(Outbox))  # one per call (per batch), not per datagram
    if b == NULL:
        raise MemoryError()
    b.nmsg = b.niov = b.sent = b.dropped = 0
    b.err = 0
    with nogil:
        for j in range(n_out):
            off, length, rs, rc = out_meta[j, 0], out_meta[j, 1], out_meta[j, 2], out_meta[j, 3]
            for k in range(rs, rs + rc):
                slot = out_receivers[k]
                if slot < 0 or slot >= nslots or addr_lens[slot] <= 0:
                    skipped += 1
                    continue
                _queue(fd, b, &out_arena[off], length, slot, &addr_table[slot, 0],
                       addr_lens[slot], use_mmsg, use_gso)
        if b.nmsg:
            _flush(fd, b, use_mmsg)
    sent, dropped = b.sent, b.dropped + skipped
    free(b)
    return sent, dropped


def send_batch(int fd, const uint8_t[:, ::1] arena, const int32_t[::1] lengths,
               Py_ssize_t count, Py_ssize_t start=0, address=None,
               bint use_mmsg=True) -> int:
    """Send rows ``start .. count-1`` of ``arena`` (``lengths[i]`` bytes each) to ``address``
    (sockaddr bytes from pack_address; None on a connected socket). Load generators use it.
    Returns how many went out (fewer only when a non-blocking socket's buffer is full)."""
    cdef Outbox *b
    cdef Py_ssize_t i
    cdef const uint8_t *name = NULL
    cdef socklen_t namelen = 0
    cdef bytes addr
    if count > arena.shape[0] or count > lengths.shape[0] or start < 0:
        raise ValueError("count exceeds the batch")
    for i in range(start, count):
        if lengths[i] < 0 or lengths[i] > arena.shape[1]:
            raise ValueError(f"length of row {i} outside the arena")
    if address is not None:
        addr = bytes(address)
        name = <const uint8_t *>addr
        namelen = len(addr)
    b = <Outbox *>malloc(sizeof(Outbox))
    if b == NULL:
        raise MemoryError()
    b.nmsg = b.niov = b.sent = b.dropped = 0
    b.err = 0
    with nogil:
        for i in range(start, count):
            _queue(fd, b, &arena[i, 0], lengths[i], 0, name, namelen, use_mmsg, False)
            if b.dropped:  # the buffer is full: the caller retries from start + sent
                break
        if b.nmsg and not b.dropped:
            _flush(fd, b, use_mmsg)
    sent = b.sent
    free(b)
    return sent


def note_arrivals(const uint8_t[:, ::1] arena, Py_ssize_t count, Py_ssize_t offset,
                  int64_t[::1] times, int64_t now) -> int:
    """Latency probes: row i carries a little-endian uint32 packet id at ``offset``; set
    ``times[id] = now`` for each id in range. For load generators and benchmarks; returns
    how many ids were in range."""
    cdef Py_ssize_t i, hit = 0
    cdef uint32_t pid
    if offset < 0 or offset + 4 > arena.shape[1] or count > arena.shape[0]:
        raise ValueError("ids lie outside the arena")
    with nogil:
        for i in range(count):
            pid = (<uint32_t>arena[i, offset] | (<uint32_t>arena[i, offset + 1] << 8)
                   | (<uint32_t>arena[i, offset + 2] << 16)
                   | (<uint32_t>arena[i, offset + 3] << 24))
            if 0 < pid < <uint32_t>times.shape[0]:
                times[pid] = now
                hit += 1
    return hit


cdef class BatchSocket:
    """One UDP socket with its batch arrays bound once: per batch only integers cross from
    Python (a relay's loop calls recv(), the forwarder, send())."""

    cdef int fd
    cdef uint8_t[:, ::1] arena
    cdef int32_t[::1] lengths
    cdef const uint8_t[::1] out_arena
    cdef const int64_t[:, ::1] out_meta
    cdef const int32_t[::1] out_receivers
    cdef const uint8_t[:, ::1] addr_table
    cdef const int32_t[::1] addr_lens
    cdef bint mmsg
    cdef bint gso

    def __init__(self, int fd, uint8_t[:, ::1] arena, int32_t[::1] lengths,
                 const uint8_t[::1] out_arena, const int64_t[:, ::1] out_meta,
                 const int32_t[::1] out_receivers, const uint8_t[:, ::1] addr_table,
                 const int32_t[::1] addr_lens, bint mmsg=True, bint gso=False) -> None:
        self.fd = fd
        self.arena, self.lengths = arena, lengths
        self.out_arena, self.out_meta, self.out_receivers = out_arena, out_meta, out_receivers
        self.addr_table, self.addr_lens = addr_table, addr_lens
        self.mmsg, self.gso = mmsg, gso and CTMS_HAVE_GSO

    def set_addresses(self, const uint8_t[:, ::1] addr_table,
                      const int32_t[::1] addr_lens) -> None:
        """New address table (an AddressBook grew)."""
        self.addr_table, self.addr_lens = addr_table, addr_lens

    def recv(self) -> int:
        """recv_batch into the bound arena (sources are not kept)."""
        return _recv(self.fd, self.arena, self.lengths, None, None, -1, self.mmsg)

    def send(self, Py_ssize_t n_out) -> tuple:
        """send_outputs of the first ``n_out`` bound outputs."""
        return _send_outputs(self.fd, self.out_arena, self.out_meta, n_out, self.out_receivers,
                             self.addr_table, self.addr_lens, self.mmsg, self.gso)


class BatchedDatagramReader:
    """asyncio integration: drain a non-blocking UDP socket in batches from a reader callback.

    ``on_batch(reader, n)`` sees rows ``0 .. n-1`` of ``reader.arena`` / ``lengths`` /
    ``addrs`` / ``addrlens`` and must be done with them when it returns (the next batch
    reuses the rows). One wakeup drains at most ``max_batches`` batches, so one busy socket
    cannot starve the loop. Socket errors are counted in ``errors``, never raised into the
    loop; an exception from ``on_batch`` is handed to the loop's exception handler.
    """

    def __init__(
        self,
        sock,
        on_batch: Callable[["BatchedDatagramReader", int], None],
        capacity: int = 64,
        slot: int = 2048,
        max_batches: int = 16,
        use_mmsg: bool = True,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.fd = sock.fileno()
        self.on_batch = on_batch
        self.max_batches = max_batches
        self.use_mmsg = use_mmsg
        self.loop = loop
        self.arena = np.zeros((capacity, slot), np.uint8)
        self.lengths = np.zeros(capacity, np.int32)
        self.addrs = np.zeros((capacity, C_ADDR_SIZE), np.uint8)
        self.addrlens = np.zeros(capacity, np.int32)
        self.received = 0
        self.batches = 0
        self.errors = 0
        self._reading = False

    def start(self) -> None:
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        if not self._reading:
            self.loop.add_reader(self.fd, self._readable)
            self._reading = True

    def stop(self) -> None:
        if self._reading and self.loop is not None:
            self.loop.remove_reader(self.fd)
        self._reading = False

    def _readable(self) -> None:
        capacity = self.arena.shape[0]
        for _ in range(self.max_batches):
            try:
                n = recv_batch(self.fd, self.arena, self.lengths, self.addrs, self.addrlens,
                               -1, self.use_mmsg)
            except OSError:
                self.errors += 1
                return
            if n == 0:
                return
            self.received += n
            self.batches += 1
            try:
                self.on_batch(self, n)
            except Exception as exc:  # keep reading; report like asyncio protocols do
                self.loop.call_exception_handler(
                    {"message": "on_batch failed", "exception": exc, "reader": self}
                )
            if n < capacity:
                return


# -- the server's endpoint ports: whole datagrams as Python objects, batched system calls --

cdef extern from "<arpa/inet.h>" nogil:
    unsigned int ntohl(unsigned int v)

cdef enum:
    GSO_MAX_SEG = 1452  # largest datagram sent as a GSO segment: fits a 1500-byte IPv6 MTU


cdef object _address_tuple(const uint8_t *raw, socklen_t n):
    """The address tuple ``socket.recvfrom`` gives for this sockaddr (CPython's makesockaddr:
    (host, port) for IPv4, (host, port, flowinfo, scope_id) for IPv6), so a batch-read
    datagram's source compares equal to the same source read by asyncio."""
    cdef sockaddr_in a4
    cdef sockaddr_in6 a6
    cdef char text[64]
    if n >= <socklen_t>sizeof(sockaddr_in6):
        memcpy(&a6, raw, sizeof(a6))
        if a6.sin6_family == AF_INET6:
            inet_ntop(AF_INET6, &a6.sin6_addr, text, 64)
            return (text.decode("ascii"), ntohs(a6.sin6_port), ntohl(a6.sin6_flowinfo),
                    a6.sin6_scope_id)
    if n >= <socklen_t>sizeof(sockaddr_in):
        memcpy(&a4, raw, sizeof(a4))
        if a4.sin_family == AF_INET:
            inet_ntop(AF_INET, &a4.sin_addr, text, 64)
            return (text.decode("ascii"), ntohs(a4.sin_port))
    raise OSError(f"unexpected source address family in {n} bytes")


cdef class DatagramReceiver:
    """recvmmsg for the relay's endpoint ports: one call reads up to ``capacity`` waiting
    datagrams of one socket and hands them out as the (data, address) pairs the asyncio
    protocol would have been given one callback each.

    One receiver (one arena) serves every port of a relay: a batch is turned into Python
    objects before any of it is processed, so the rows are free again by then. A datagram
    longer than a row is not cut: its pair carries its size (an ``int``) instead of bytes, so
    the caller can drop it as oversize exactly as it drops an oversize ``bytes``; rows as
    long as the relay's datagram limit therefore lose nothing. Consecutive datagrams from
    one source (the usual case: a room's own address) share one address tuple.
    """

    cdef readonly Py_ssize_t capacity
    cdef readonly Py_ssize_t row
    cdef uint8_t[:, ::1] arena
    cdef int32_t[::1] lengths
    cdef uint8_t[:, ::1] addrs
    cdef int32_t[::1] addrlens
    cdef bint mmsg
    cdef bytes _last_raw
    cdef object _last_addr

    def __init__(self, Py_ssize_t capacity=64, Py_ssize_t row=2048, bint use_mmsg=True) -> None:
        if capacity <= 0 or row <= 0:
            raise ValueError("capacity and row must be positive")
        self.capacity, self.row, self.mmsg = capacity, row, use_mmsg
        self.arena = np.zeros((capacity, row), np.uint8)
        self.lengths = np.zeros(capacity, np.int32)
        self.addrs = np.zeros((capacity, C_ADDR_SIZE), np.uint8)
        self.addrlens = np.zeros(capacity, np.int32)
        self._last_raw = b""
        self._last_addr = None

    def receive(self, int fd) -> list:
        """The datagrams waiting on ``fd`` (at most ``capacity``), oldest first: a list of
        (bytes, address), or (size, address) for one longer than a row. Empty when none is
        waiting; OSError for a socket error before any datagram was read."""
        cdef Py_ssize_t n = _recv(fd, self.arena, self.lengths, self.addrs, self.addrlens,
                                  self.capacity, self.mmsg, True)
        cdef Py_ssize_t i
        cdef int32_t length
        cdef socklen_t alen
        cdef const uint8_t *raw
        cdef list out = []
        for i in range(n):
            alen = <socklen_t>min(<int32_t>C_ADDR_SIZE, max(<int32_t>0, self.addrlens[i]))
            raw = &self.addrs[i, 0]
            if (<Py_ssize_t>alen != PyBytes_GET_SIZE(self._last_raw)
                    or memcmp(raw, PyBytes_AS_STRING(self._last_raw), alen) != 0):
                self._last_addr = _address_tuple(raw, alen)
                self._last_raw = PyBytes_FromStringAndSize(<const char *>raw, alen)
            length = self.lengths[i]
            if length > self.row:
                out.append((length, self._last_addr))
            else:
                out.append((PyBytes_FromStringAndSize(<const char *>&self.arena[i, 0], length),
                            self._last_addr))
        return out


cdef Outbox _LIST_OUTBOX  # send_datagrams' messages; the GIL is held while it is in use


def send_datagrams(int fd, list datagrams, Py_ssize_t start, const uint8_t[::1] address,
                   bint gso=False, bint use_mmsg=True) -> tuple:
    """Send ``datagrams[start:]`` (bytes objects, in order) from ``fd`` to ``address``
    (sockaddr bytes, pack_address) with as few system calls as the kernel allows: one
    sendmmsg for up to 256 messages, and with ``gso`` consecutive datagrams of one length
    (a shorter one may end the run) as one UDP_SEGMENT message.

    Stops at the first datagram the kernel refuses and returns (sent, errno, gso_failed):
    ``sent`` datagrams from ``start`` left, ``errno`` is 0 or the refusal of the next one,
    ``gso_failed`` says that refusal was of a message carrying several datagrams (a path or
    device that cannot segment: send them again without ``gso``). The caller decides what a
    refusal means (a full buffer, an unreachable peer), as asyncio's transport would."""
    cdef Outbox *b = &_LIST_OUTBOX
    cdef Py_ssize_t n = len(datagrams), i = start, m, done
    cdef Py_ssize_t sent = 0
    cdef int64_t length
    cdef int got
    cdef ssize_t r
    cdef bint closed[CHUNK]
    cdef const uint8_t *name = &address[0] if address.shape[0] else NULL
    cdef socklen_t namelen = <socklen_t>address.shape[0]
    cdef object item
    cdef bint use_gso = gso and CTMS_HAVE_GSO
    if start < 0:
        raise ValueError("start must not be negative")
    for m in range(start, n):
        if type(datagrams[m]) is not bytes:
            raise TypeError("send_datagrams sends bytes objects")
    while i < n:
        b.nmsg = b.niov = 0
        while i < n and b.nmsg < CHUNK and b.niov < IOV_TOTAL:
            item = <object>PyList_GET_ITEM(datagrams, i)
            length = PyBytes_GET_SIZE(item)
            m = b.nmsg - 1
            if (use_gso and m >= 0 and not closed[m] and length <= b.seglen[m]
                    and b.seglen[m] <= GSO_MAX_SEG and b.segs[m] < MAX_SEGS
                    and b.bytes[m] + length <= GSO_BYTES):
                _extend_message(b, m, PyBytes_AS_STRING(item), length, b.seglen[m])
                closed[m] = length < b.seglen[m]  # only the last segment may be shorter
            else:
                m = _new_message(b, PyBytes_AS_STRING(item), length, name, namelen)
                closed[m] = False
            i += 1
        done = 0
        while done < b.nmsg:
            if use_mmsg and CTMS_HAVE_MMSG:
                got = sendmmsg(fd, b.msgs + done, <unsigned int>(b.nmsg - done), 0)
            else:
                r = sendmsg(fd, &b.msgs[done].msg_hdr, 0)
                got = 1 if r >= 0 else -1
            if got < 0:
                if errno == EINTR:
                    continue
                return sent, errno, b.segs[done] > 1
            for m in range(done, done + got):
                sent += b.segs[m]
            done += got
    return sent, 0, False


cdef extern from "<arpa/inet.h>" nogil:
    unsigned int htonl(unsigned int v)


def pack_sockaddr(address: tuple) -> bytes:
    """The sockaddr bytes of an address tuple as ``socket.sendto`` takes it: (host, port),
    or (host, port, flowinfo, scope_id) for IPv6; hosts are IP literals."""
    cdef sockaddr_in6 a6
    cdef bytes raw
    if len(address) == 2:
        return pack_address(address[0], address[1])
    if len(address) != 4:
        raise ValueError(f"not an address tuple: {address!r}")
    host, port, flowinfo, scope_id = address
    raw = pack_address(host, port)
    if len(raw) != sizeof(sockaddr_in6):
        raise ValueError(f"{host!r} is not an IPv6 address literal")
    memcpy(&a6, <const char *>raw, sizeof(a6))
    a6.sin6_flowinfo = htonl(<unsigned int>flowinfo)
    a6.sin6_scope_id = <unsigned int>scope_id
    return (<char *>&a6)[:sizeof(a6)]
