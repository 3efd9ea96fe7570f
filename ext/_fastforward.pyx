# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False
"""The Cython twin of ``ctms_media.forward.forwarder.Forwarder``.

Same interface, same verdicts, bytes and state for every input. The packet path (framing,
SSRC lookup, index estimation, key selection, replay check, HMAC verify, tail strip, CSRC
rewrite, re-tag, fan-out; SRTCP verify) is C over C structs and runs without the GIL, with
no Python object or allocation per packet. HMAC-SHA1 states are precomputed per key at commit.

What it does not duplicate, it asks the reference for, so every such behaviour lives in one
place: configuration and its validation (a private reference ``Forwarder`` holds groups,
streams' declarations and routes, and raises the same errors), EKT unwrap and wrap, auth-key
derivation and the IDR gate bookkeeping. The C path asks by returning a NEED_* status before
it changes any state; the Python side computes the answer with the reference's functions,
stores it in a content-addressed C cache, and the C path runs the packet again. Answers are
pure functions of their keys (the unwrap of given trailer bytes under a given group, the wrap
of a given key for a given group, ROC and ISN/Epoch), so caching them is invisible in the
results, and a steady stream (repeated long trailers, re-wraps during a rekey) never leaves C.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport int8_t, int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcmp, memcpy, memset

from hmac_sha1 cimport Hmac, hmac_digest, hmac_init, put_be32
from openssl cimport CRYPTO_memcmp

from ctms_media.errors import ConfigError
from ctms_media.forward.forwarder import Forwarder as _Reference
from ctms_media.forward.forwarder import _Drop, _Trailer
from ctms_media.forward.keys import KeyState
from ctms_media.forward.verdict import DROP_REASONS, Verdict
from ctms_media.wire.ekt import FORMAT_CTMS

# -- status codes: 0 forwarded, 1..7 the drop reasons in DROP_REASONS order ---------------------

cdef enum:
    ST_OK = 0
    ST_MALFORMED = 1
    ST_UNKNOWN_SSRC = 2
    ST_UNKNOWN_SPI = 3
    ST_UNWRAP = 4
    ST_NO_KEY = 5
    ST_REPLAY = 6
    ST_AUTH = 7
    ST_NEED_UNWRAP = 100
    ST_NEED_DERIVE = 101
    ST_NEED_WRAP = 102
    ST_NEED_GATES = 103
    ST_FULL = 104

cdef enum:
    WIN_WORDS = 16          # 1024-packet replay window as 16 x 64 bits
    KEY_MAX = 32            # master key bytes kept (both profiles use 16)
    SALT_MAX = 32
    TRAILER_MAX = 64        # longest EKT trailer: RFC 8870 full field, 47 octets
    UCACHE = 4              # per-stream unwrap answers kept
    DCACHE = 4              # derived auth keys kept (per forwarder)
    MAX_ROUNDS = 16         # questions one packet may ask (3 in practice)

FORWARDED = ST_OK
DROP_CODES = {reason: i + 1 for i, reason in enumerate(DROP_REASONS)}
if tuple(DROP_CODES) != ("malformed", "unknown_ssrc", "unknown_spi", "unwrap", "no_key",
                         "replay", "auth"):
    raise ImportError("ctms_media._fastforward: drop reasons changed; update the status codes")

# Columns of the per-packet results array and of the outputs array (see forward_batch).
cdef enum:
    C_RES_CODE = 0
    C_RES_TAIL = 1
    C_RES_SSRC = 2
    C_RES_RTCP = 3
    C_RES_FIRST_OUT = 4
    C_RES_N_OUT = 5
    C_RES_COLUMNS = 6
    C_OUT_OFFSET = 0
    C_OUT_LENGTH = 1
    C_OUT_RCV_START = 2
    C_OUT_RCV_COUNT = 3
    C_OUT_PACKET = 4
    C_OUT_COLUMNS = 5

RES_CODE, RES_TAIL, RES_SSRC, RES_RTCP, RES_FIRST_OUT, RES_N_OUT = range(6)
RES_COLUMNS = C_RES_COLUMNS
OUT_OFFSET, OUT_LENGTH, OUT_RCV_START, OUT_RCV_COUNT, OUT_PACKET = range(5)
OUT_COLUMNS = C_OUT_COLUMNS
AUTO, RTP, RTCP = -1, 0, 1


cdef struct Replay:
    int64_t highest                 # -1: nothing accepted yet
    uint64_t bits[WIN_WORDS]        # bit k: index (highest - k) was accepted


cdef struct Key:
    uint8_t master[KEY_MAX]
    int mlen
    int64_t start
    int64_t epoch
    Hmac rtp
    Hmac rtcp
    uint64_t *sent                  # bitset over interned receiver ids
    Replay rtcp_replay


cdef struct UnwrapEntry:            # (SPI, trailer bytes) -> what reference _unwrap answered
    int valid
    int spi
    int rawlen
    uint8_t raw[TRAILER_MAX]
    int status                      # ST_OK or a drop code
    uint8_t key[KEY_MAX]
    int klen
    int64_t roc
    int64_t isn                     # -1 for RFC 8870


cdef struct WrapEntry:              # (SPI, key, ROC, ISN, Epoch) -> reference _long_trailer
    int valid
    int spi
    uint8_t master[KEY_MAX]
    int mlen
    uint32_t roc
    int isn
    int64_t epoch
    int tlen
    uint8_t trailer[TRAILER_MAX]


cdef struct RouteEntry:
    int32_t slot                    # interned receiver id
    int32_t position
    int32_t spi
    int32_t gated


cdef struct Stream:
    uint32_t ssrc
    int video
    int rtp_tag
    int rtcp_tag
    int key_len
    Key keys[2]
    int cur                         # index into keys, -1: none
    int prev
    Replay rtp_replay
    int64_t roc                     # StreamState.roc: from the first verified long trailer; -1 none
    RouteEntry *route
    int nroute
    int ngated
    UnwrapEntry ucache[UCACHE]
    int unext
    WrapEntry *wcache
    int wcap
    int wnext


cdef struct Group:
    int spi
    int cipher
    uint8_t salt[SALT_MAX]
    int salt_len


cdef struct Derived:
    int valid
    uint8_t master[KEY_MAX]
    int mlen
    uint8_t salt[SALT_MAX]
    int salt_len
    Hmac rtp
    Hmac rtcp


cdef struct Request:                # the question a NEED_* status asks
    int kind
    uint32_t ssrc
    int spi
    int rawlen
    uint8_t raw[TRAILER_MAX]
    int64_t epoch
    uint8_t master[KEY_MAX]
    int mlen
    uint8_t salt[SALT_MAX]
    int salt_len
    uint32_t roc
    int64_t start
    int nspis
    int tail


cdef struct Core:
    int rfc8870
    int srtp
    int plain
    Group *groups
    int ngroups
    Stream **streams                # dense list
    int nstreams
    Stream **table                  # open addressing on SSRC, capacity tmask + 1
    uint32_t tmask
    int id_words
    int wcap
    # per-packet scratch, sized to the longest route
    int scap
    int32_t *plan_var
    int32_t *pending
    int32_t *var_pos
    int32_t *var_tid
    int32_t *var_tlen
    int32_t *var_cnt
    int32_t *var_first
    const uint8_t **var_t
    uint8_t *var_tag
    int32_t *miss_spis
    Derived derived[DCACHE]
    int dnext
    Request req
    int64_t tally[8]                # final verdicts by code, for counters (not state)


cdef struct Out:                    # where a packet's outputs go
    uint8_t *buf
    int64_t cap
    int64_t used
    int64_t *meta                   # rows of C_OUT_COLUMNS
    int64_t meta_cap
    int64_t nmeta
    int32_t *rcv
    int64_t rcv_cap
    int64_t nrcv
    int64_t packet


cdef struct Res:
    int code
    int tail
    int64_t ssrc
    int rtcp
    int64_t first_out
    int64_t n_out


cdef struct Trailer:
    int long_
    int length
    Group *group
    int spi
    int64_t epoch


# -- small helpers ------------------------------------------------------------------------------

cdef inline uint32_t be32(const uint8_t *p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline int be16(const uint8_t *p) noexcept nogil:
    return (p[0] << 8) | p[1]


cdef inline int64_t floor_shift16(int64_t v) noexcept nogil:
    # Python's >> on negative ints floors; so does an arithmetic shift (GCC, Clang, MSVC).
    return v >> 16


cdef inline int replay_check(const Replay *w, int64_t index) noexcept nogil:
    """libsrtp semantics, as ReplayWindow.check: 1 if index may be accepted."""
    cdef int64_t delta
    if index < 0:
        return 0
    if w.highest < 0 or index > w.highest:
        return 1
    delta = w.highest - index
    if delta >= WIN_WORDS * 64:
        return 0
    return not ((w.bits[delta >> 6] >> (delta & 63)) & 1)


cdef inline void replay_accept(Replay *w, int64_t index) noexcept nogil:
    cdef int64_t shift, delta
    cdef int i, ws, bs, src
    cdef uint64_t v
    if index > w.highest:
        shift = index - w.highest if w.highest >= 0 else WIN_WORDS * 64
        if shift >= WIN_WORDS * 64:
            memset(w.bits, 0, sizeof(w.bits))
        else:
            ws = <int>(shift >> 6)
            bs = <int>(shift & 63)
            for i in range(WIN_WORDS - 1, -1, -1):
                src = i - ws
                v = 0
                if src >= 0:
                    v = w.bits[src] << bs
                    if bs and src >= 1:
                        v |= w.bits[src - 1] >> (64 - bs)
                w.bits[i] = v
        w.bits[0] |= 1
        w.highest = index
    else:
        delta = w.highest - index
        w.bits[delta >> 6] |= (<uint64_t>1) << (delta & 63)


cdef inline void replay_reset(Replay *w) noexcept nogil:
    w.highest = -1
    memset(w.bits, 0, sizeof(w.bits))


cdef inline int64_t estimate_index(int64_t reference, int seq) noexcept nogil:
    """RFC 3711 Appendix A, as wire.srtp.estimate_index (may go below 0)."""
    cdef int64_t roc = floor_shift16(reference)
    cdef int64_t s_l = reference & 0xFFFF
    cdef int64_t v
    if s_l < 0x8000:
        v = roc - 1 if seq - s_l > 0x8000 else roc
    else:
        v = roc + 1 if s_l - 0x8000 > seq else roc
    return v * 0x10000 + seq


cdef inline int bit_get(const uint64_t *bits, int slot) noexcept nogil:
    return (bits[slot >> 6] >> (slot & 63)) & 1


cdef inline Stream *find_stream(const Core *c, uint32_t ssrc) noexcept nogil:
    cdef uint32_t i
    cdef Stream *s
    if c.table == NULL:
        return NULL
    i = (ssrc * <uint32_t>2654435761u) & c.tmask
    while True:
        s = c.table[i]
        if s == NULL:
            return NULL
        if s.ssrc == ssrc:
            return s
        i = (i + 1) & c.tmask


cdef inline Group *find_group(Core *c, int spi) noexcept nogil:
    cdef int i
    for i in range(c.ngroups):
        if c.groups[i].spi == spi:
            return &c.groups[i]
    return NULL


cdef inline int rtp_header_length(const uint8_t *d, int64_t n) noexcept nogil:
    """wire.rtp.rtp_header_length: -1 for malformed framing (CC = 0 included)."""
    cdef int cc, length
    if n < 12:
        return -1
    if d[0] >> 6 != 2:
        return -1
    cc = d[0] & 0x0F
    if cc == 0:
        return -1
    length = 12 + 4 * cc
    if n < length:
        return -1
    if d[0] & 0x10:
        if n < length + 4:
            return -1
        length += 4 + 4 * be16(d + length + 2)
        if n < length:
            return -1
    return length


cdef inline int rtcp_header_length(const uint8_t *d, int64_t n) noexcept nogil:
    """wire.rtp.RtcpHeader.parse framing: -1 for malformed, else the first header's length."""
    cdef int length
    if n < 8:
        return -1
    if d[0] >> 6 != 2:
        return -1
    if d[1] < 192 or d[1] > 223:
        return -1
    length = (be16(d + 2) + 1) * 4
    if length > n:
        return -1
    return length


cdef inline int rfc8870_full_length(int key_len) noexcept nogil:
    cdef int plaintext = 1 + key_len + 4 + 4
    return 8 + ((plaintext + 7) // 8) * 8 + 7


cdef inline int read_trailer(Core *c, const uint8_t *reg, int64_t rn, int key_len,
                             Trailer *t) noexcept nogil:
    """Forwarder._read_trailer: form, group and length of the trailer ending ``reg``."""
    cdef int last, spi, length
    t.long_ = 0
    t.length = 1
    t.group = NULL
    t.spi = -1
    t.epoch = 0
    if rn <= 0:
        return ST_MALFORMED
    last = reg[rn - 1]
    if not c.rfc8870:
        if not last & 1:
            return ST_OK
        if rn < 2:
            return ST_MALFORMED
        spi = ((reg[rn - 2] << 8) | last) >> 1
        t.group = find_group(c, spi)
        if t.group == NULL:
            return ST_UNKNOWN_SPI
        t.long_ = 1
        t.spi = spi
        t.length = (16 if t.group.cipher == 1 else key_len + 8) + 8
        return ST_OK
    if last == 0:
        return ST_OK
    if last != 2:
        return ST_MALFORMED
    if rn < 7:
        return ST_MALFORMED
    spi = be16(reg + rn - 7)
    t.epoch = be16(reg + rn - 5)
    length = be16(reg + rn - 3)
    t.group = find_group(c, spi)
    if t.group == NULL:
        return ST_UNKNOWN_SPI
    if length != rfc8870_full_length(key_len):
        return ST_MALFORMED
    t.long_ = 1
    t.spi = spi
    t.length = length
    return ST_OK


cdef inline UnwrapEntry *unwrap_lookup(Stream *s, int spi, const uint8_t *raw,
                                       int rawlen) noexcept nogil:
    cdef int i
    cdef UnwrapEntry *e
    for i in range(UCACHE):
        e = &s.ucache[i]
        if e.valid and e.spi == spi and e.rawlen == rawlen and memcmp(e.raw, raw, rawlen) == 0:
            return e
    return NULL


cdef inline Derived *derived_lookup(Core *c, const uint8_t *master, int mlen,
                                    const Group *g) noexcept nogil:
    cdef int i
    cdef Derived *d
    for i in range(DCACHE):
        d = &c.derived[i]
        if (d.valid and d.mlen == mlen and d.salt_len == g.salt_len
                and memcmp(d.master, master, mlen) == 0
                and memcmp(d.salt, g.salt, g.salt_len) == 0):
            return d
    return NULL


cdef inline WrapEntry *wrap_lookup(Stream *s, int spi, const uint8_t *master, int mlen,
                                   uint32_t roc, int isn, int64_t epoch) noexcept nogil:
    cdef int i
    cdef WrapEntry *w
    for i in range(s.wcap):
        w = &s.wcache[i]
        if (w.valid and w.spi == spi and w.roc == roc and w.isn == isn and w.epoch == epoch
                and w.mlen == mlen and memcmp(w.master, master, mlen) == 0):
            return w
    return NULL


cdef inline int find_key(Stream *s, const uint8_t *master, int mlen) noexcept nogil:
    """StreamState.find_key: the slot of current, then previous, holding this master key."""
    cdef int k = s.cur
    if k >= 0 and s.keys[k].mlen == mlen and memcmp(s.keys[k].master, master, mlen) == 0:
        return k
    k = s.prev
    if k >= 0 and s.keys[k].mlen == mlen and memcmp(s.keys[k].master, master, mlen) == 0:
        return k
    return -1


cdef inline int key_for_index(Stream *s, int64_t index) noexcept nogil:
    if s.cur < 0:
        return -1
    if index >= s.keys[s.cur].start:
        return s.cur
    if s.prev >= 0 and index >= s.keys[s.prev].start:
        return s.prev
    return -1


cdef inline int ask_unwrap(Core *c, Stream *s, const Trailer *t, const uint8_t *raw) noexcept nogil:
    c.req.kind = ST_NEED_UNWRAP
    c.req.ssrc = s.ssrc
    c.req.spi = t.spi
    c.req.rawlen = t.length
    c.req.epoch = t.epoch
    memcpy(c.req.raw, raw, t.length)
    return ST_NEED_UNWRAP


cdef inline int ask_derive(Core *c, const uint8_t *master, int mlen, const Group *g) noexcept nogil:
    c.req.kind = ST_NEED_DERIVE
    c.req.mlen = mlen
    memcpy(c.req.master, master, mlen)
    c.req.salt_len = g.salt_len
    memcpy(c.req.salt, g.salt, g.salt_len)
    return ST_NEED_DERIVE


cdef inline void commit_key(Core *c, Stream *s, const uint8_t *master, int mlen, int64_t start,
                            int64_t epoch, int64_t roc, const Derived *dv) noexcept nogil:
    """StreamState.commit: the new key becomes current, current becomes previous; the
    first commit's ROC initializes the stream's."""
    cdef int slot = 1 if s.cur == 0 else 0
    cdef Key *k = &s.keys[slot]
    if s.roc < 0:
        s.roc = roc
    memcpy(k.master, master, mlen)
    k.mlen = mlen
    k.start = start
    k.epoch = epoch
    memcpy(&k.rtp, &dv.rtp, sizeof(Hmac))
    memcpy(&k.rtcp, &dv.rtcp, sizeof(Hmac))
    memset(k.sent, 0, c.id_words * sizeof(uint64_t))
    replay_reset(&k.rtcp_replay)
    s.prev = s.cur
    s.cur = slot


cdef inline int route_count(Stream *s, int plain_ok) noexcept nogil:
    """Receivers a verbatim output (SRTCP, plain RTCP) goes to: ungated, and on an SPI
    unless plain receivers are welcome too."""
    cdef int i, cnt = 0
    cdef RouteEntry *e
    for i in range(s.nroute):
        e = &s.route[i]
        if not e.gated and (plain_ok or e.spi != 0):
            cnt += 1
    return cnt


cdef inline int copy_fits(const Out *o, int64_t n, int cnt) noexcept nogil:
    return not cnt or (o.used + n <= o.cap and o.nmeta + 1 <= o.meta_cap
                       and o.nrcv + cnt <= o.rcv_cap)


cdef inline void emit_copy_write(Stream *s, const uint8_t *d, int64_t n, int plain_ok, int cnt,
                                 Out *o, Res *r) noexcept nogil:
    cdef int i
    cdef int64_t *m
    cdef RouteEntry *e
    r.first_out = o.nmeta
    r.n_out = 0
    if not cnt:
        return
    m = o.meta + o.nmeta * C_OUT_COLUMNS
    m[C_OUT_OFFSET] = o.used
    m[C_OUT_LENGTH] = n
    m[C_OUT_RCV_START] = o.nrcv
    m[C_OUT_RCV_COUNT] = cnt
    m[C_OUT_PACKET] = o.packet
    memcpy(o.buf + o.used, d, n)
    o.used += n
    for i in range(s.nroute):
        e = &s.route[i]
        if not e.gated and (plain_ok or e.spi != 0):
            o.rcv[o.nrcv] = e.slot
            o.nrcv += 1
    o.nmeta += 1
    r.n_out = 1


cdef inline int find_variant(Core *c, int nvar, int pos, int tid) noexcept nogil:
    cdef int v
    for v in range(nvar):
        if c.var_pos[v] == pos and c.var_tid[v] == tid:
            return v
    return -1


cdef inline void write_receivers(Core *c, Stream *s, int nvar, Out *o) noexcept nogil:
    """Receivers of each variant, in route order, variant after variant."""
    cdef int v, i, total = 0
    for v in range(nvar):
        c.var_first[v] = total
        total += c.var_cnt[v]
    for i in range(s.nroute):
        v = c.plan_var[i]
        if v >= 0:
            o.rcv[o.nrcv + c.var_first[v]] = s.route[i].slot
            c.var_first[v] += 1
    # var_first[v] now ends variant v; turn it back into starts
    for v in range(nvar):
        c.var_first[v] -= c.var_cnt[v]


cdef inline int _pending(Core *c, int npend, int slot) noexcept nogil:
    cdef int i
    for i in range(npend):
        if c.pending[i] == slot:
            return 1
    return 0


# -- the packet paths (Forwarder._rtp, _rtcp, _plain) ------------------------------------------

cdef int srtp_rtp(Core *c, const uint8_t *d, int64_t n, Out *o, Res *r) noexcept nogil:
    cdef int hlen, st, tag_len, seq, kslot = -1, is_new = 0, nvar = 0, npend = 0, nmiss = 0
    cdef int i, j, v, tid, tl, pos, upgrade, isn16, total = 0
    cdef int64_t auth_end, index, start = 0, epoch, need, blen, length
    cdef uint32_t ssrc, roc32
    cdef int64_t roc
    cdef Stream *s
    cdef Trailer t
    cdef const uint8_t *raw
    cdef const uint8_t *tptr
    cdef const uint8_t *master
    cdef int mlen
    cdef UnwrapEntry *ue
    cdef Derived *dv = NULL
    cdef Key *key = NULL
    cdef const Hmac *khmac
    cdef const uint64_t *sent = NULL
    cdef WrapEntry *we
    cdef RouteEntry *e
    cdef uint8_t rocb[4]
    cdef uint8_t tag[20]
    cdef uint8_t *p
    cdef int64_t *m

    hlen = rtp_header_length(d, n)
    if hlen < 0:
        return ST_MALFORMED
    ssrc = be32(d + 8)
    s = find_stream(c, ssrc)
    if s == NULL:
        return ST_UNKNOWN_SSRC
    tag_len = s.rtp_tag
    st = read_trailer(c, d + hlen, n - hlen, s.key_len, &t)
    if st:
        return st
    if n - hlen < 1 + tag_len + t.length:
        return ST_MALFORMED
    auth_end = n - t.length - tag_len
    raw = d + n - t.length
    seq = be16(d + 2)

    if t.long_:
        ue = unwrap_lookup(s, t.spi, raw, t.length)
        if ue == NULL:
            return ask_unwrap(c, s, &t, raw)
        if ue.status != ST_OK:
            return ue.status
        master = ue.key
        mlen = ue.klen
        roc = ue.roc
        index = (roc << 16) | seq
        kslot = find_key(s, master, mlen)
        if kslot < 0:
            if ue.isn >= 0:  # CTMS: the largest index <= this one whose low bits are ISN
                start = (index & ~(<int64_t>0xFFFF)) | ue.isn
                if start > index:
                    start -= 0x10000
            else:  # RFC 8870: the first RTP packet carrying the key
                start = index
            dv = derived_lookup(c, master, mlen, t.group)
            if dv == NULL:
                return ask_derive(c, master, mlen, t.group)
            is_new = 1
    else:
        # StreamState.rtp_index: estimated from the highest accepted index, or, before any
        # RTP (a key from SRTCP), the stream's ROC from that trailer with this SEQ.
        if s.rtp_replay.highest >= 0:
            index = estimate_index(s.rtp_replay.highest, seq)
        elif s.roc >= 0:
            index = (s.roc << 16) | seq
        else:
            return ST_NO_KEY
        if index < 0:
            return ST_REPLAY
        kslot = key_for_index(s, index)
        if kslot < 0:
            return ST_NO_KEY
        roc = index >> 16

    if not replay_check(&s.rtp_replay, index):
        return ST_REPLAY
    roc32 = <uint32_t>roc  # wraps mod 2^32, as roc & 0xFFFFFFFF
    put_be32(rocb, roc32)
    if is_new:
        khmac = &dv.rtp
    else:
        key = &s.keys[kslot]
        khmac = &key.rtp
        master = key.master
        mlen = key.mlen
    hmac_digest(khmac, d, auth_end, rocb, tag)
    if CRYPTO_memcmp(tag, d + auth_end, tag_len) != 0:
        return ST_AUTH

    # Accepted. The IDR gate bookkeeping changes routes: the reference does it.
    if s.video and s.ngated and d[auth_end - 1] & 0x80:
        c.req.kind = ST_NEED_GATES
        c.req.ssrc = ssrc
        c.req.tail = d[auth_end - 1]
        return ST_NEED_GATES

    # Plan the fan-out against the state as it will be after the commit.
    if is_new:
        epoch = t.epoch
        upgrade = 1
    else:
        start = key.start
        epoch = t.epoch if (t.long_ and c.rfc8870) else key.epoch
        upgrade = kslot == s.cur
        sent = key.sent
    isn16 = <int>(start & 0xFFFF)
    blen = auth_end - 1
    need = 0
    for i in range(s.nroute):
        e = &s.route[i]
        c.plan_var[i] = -1
        if e.gated or e.spi == 0:
            continue
        if t.long_ or (upgrade and not (sent != NULL and bit_get(sent, e.slot))
                       and not _pending(c, npend, e.slot)):
            if t.long_ and e.spi == t.spi:
                tid = 0
                tptr = raw
                tl = t.length
            else:
                tid = e.spi + 1
                we = wrap_lookup(s, e.spi, master, mlen, roc32, isn16, epoch)
                if we == NULL:
                    for j in range(nmiss):
                        if c.miss_spis[j] == e.spi:
                            break
                    else:
                        c.miss_spis[nmiss] = e.spi
                        nmiss += 1
                    tptr = NULL
                    tl = 0
                else:
                    tptr = we.trailer
                    tl = we.tlen
            c.pending[npend] = e.slot
            npend += 1
        else:
            tid = 0
            tptr = raw
            tl = t.length
        v = find_variant(c, nvar, e.position, tid)
        if v < 0:
            v = nvar
            nvar += 1
            c.var_pos[v] = e.position
            c.var_tid[v] = tid
            c.var_t[v] = tptr
            c.var_tlen[v] = tl
            c.var_cnt[v] = 0
            need += blen + tag_len + tl
        c.var_cnt[v] += 1
        c.plan_var[i] = v
        total += 1
    if nmiss:
        c.req.kind = ST_NEED_WRAP
        c.req.ssrc = ssrc
        c.req.mlen = mlen
        memcpy(c.req.master, master, mlen)
        c.req.roc = roc32
        c.req.start = start
        c.req.epoch = epoch
        c.req.nspis = nmiss
        return ST_NEED_WRAP
    if nvar and (o.used + need > o.cap or o.nmeta + nvar > o.meta_cap
                 or o.nrcv + total > o.rcv_cap):
        return ST_FULL

    # Commit: the only writer.
    if is_new:
        commit_key(c, s, master, mlen, start, t.epoch, roc, dv)
        key = &s.keys[s.cur]
        master = key.master
    elif t.long_ and c.rfc8870:
        key.epoch = t.epoch
    replay_accept(&s.rtp_replay, index)
    for i in range(npend):
        key.sent[c.pending[i] >> 6] |= (<uint64_t>1) << (c.pending[i] & 63)

    r.code = ST_OK
    r.tail = d[auth_end - 1]
    r.ssrc = ssrc
    r.rtcp = 0
    r.first_out = o.nmeta
    r.n_out = nvar
    if not nvar:
        return ST_OK
    write_receivers(c, s, nvar, o)
    for v in range(nvar):
        pos = c.var_pos[v]
        length = blen + tag_len + c.var_tlen[v]
        p = o.buf + o.used
        memcpy(p, d, blen)
        p[15] = <uint8_t>pos
        for j in range(v):  # one tag per destination position
            if c.var_pos[j] == pos:
                memcpy(c.var_tag + 20 * v, c.var_tag + 20 * j, 20)
                break
        else:
            hmac_digest(&key.rtp, p, blen, rocb, c.var_tag + 20 * v)
        memcpy(p + blen, c.var_tag + 20 * v, tag_len)
        memcpy(p + blen + tag_len, c.var_t[v], c.var_tlen[v])
        m = o.meta + (o.nmeta + v) * C_OUT_COLUMNS
        m[C_OUT_OFFSET] = o.used
        m[C_OUT_LENGTH] = length
        m[C_OUT_RCV_START] = o.nrcv + c.var_first[v]
        m[C_OUT_RCV_COUNT] = c.var_cnt[v]
        m[C_OUT_PACKET] = o.packet
        o.used += length
    o.nmeta += nvar
    o.nrcv += total
    return ST_OK


cdef int srtp_rtcp(Core *c, const uint8_t *d, int64_t n, Out *o, Res *r) noexcept nogil:
    cdef int hlen, st, tag_len, kslot = -1, is_new = 0, cnt
    cdef int64_t auth_end, index, start = 0, highest
    cdef uint32_t ssrc
    cdef Stream *s
    cdef Trailer t
    cdef const uint8_t *raw
    cdef const uint8_t *master = NULL
    cdef int mlen = 0
    cdef UnwrapEntry *ue
    cdef Derived *dv = NULL
    cdef Key *key = NULL
    cdef Replay fresh
    cdef const Replay *win
    cdef const Hmac *khmac
    cdef uint8_t tag[20]

    hlen = rtcp_header_length(d, n)
    if hlen < 0:
        return ST_MALFORMED
    ssrc = be32(d + 4)
    s = find_stream(c, ssrc)
    if s == NULL:
        return ST_UNKNOWN_SSRC
    tag_len = s.rtcp_tag
    st = read_trailer(c, d + 8, n - 8, s.key_len, &t)
    if st:
        return st
    if n - hlen < 4 + tag_len + t.length:
        return ST_MALFORMED
    auth_end = n - t.length - tag_len
    raw = d + n - t.length
    index = be32(d + auth_end - 4) & 0x7FFFFFFF

    if t.long_:
        ue = unwrap_lookup(s, t.spi, raw, t.length)
        if ue == NULL:
            return ask_unwrap(c, s, &t, raw)
        if ue.status != ST_OK:
            return ue.status
        master = ue.key
        mlen = ue.klen
        kslot = find_key(s, master, mlen)
        if kslot < 0:
            if ue.isn >= 0:
                start = (ue.roc << 16) | ue.isn
            else:
                start = ue.roc << 16
                if s.cur >= 0 and start <= s.keys[s.cur].start:
                    highest = s.rtp_replay.highest
                    start = highest + 1 if highest >= 0 else s.keys[s.cur].start + 1
            dv = derived_lookup(c, master, mlen, t.group)
            if dv == NULL:
                return ask_derive(c, master, mlen, t.group)
            is_new = 1
    else:
        kslot = s.cur
        if kslot < 0:
            return ST_NO_KEY

    if is_new:
        replay_reset(&fresh)
        win = &fresh
        khmac = &dv.rtcp
    else:
        key = &s.keys[kslot]
        win = &key.rtcp_replay
        khmac = &key.rtcp
    if not replay_check(win, index):
        return ST_REPLAY
    hmac_digest(khmac, d, auth_end, NULL, tag)
    if CRYPTO_memcmp(tag, d + auth_end, tag_len) != 0:
        return ST_AUTH

    cnt = route_count(s, 0)
    if not copy_fits(o, n, cnt):
        return ST_FULL
    if is_new:
        commit_key(c, s, master, mlen, start, t.epoch, ue.roc, dv)
        key = &s.keys[s.cur]
    elif t.long_ and c.rfc8870:
        key.epoch = t.epoch
    replay_accept(&key.rtcp_replay, index)
    r.code = ST_OK
    r.tail = -1
    r.ssrc = ssrc
    r.rtcp = 1
    emit_copy_write(s, d, n, 0, cnt, o, r)
    return ST_OK


cdef int plain_packet(Core *c, const uint8_t *d, int64_t n, int rtcp, Out *o,
                      Res *r) noexcept nogil:
    """Forwarder._plain: the tail byte and CSRC rules, no tag, no trailer, no state."""
    cdef int hlen, cnt, i, v, nvar = 0, total = 0
    cdef uint32_t ssrc
    cdef Stream *s
    cdef RouteEntry *e
    cdef int64_t blen, need
    cdef uint8_t *p
    cdef int64_t *m
    if rtcp:
        if rtcp_header_length(d, n) < 0:
            return ST_MALFORMED
        ssrc = be32(d + 4)
        s = find_stream(c, ssrc)
        if s == NULL:
            return ST_UNKNOWN_SSRC
        cnt = route_count(s, 1)
        if not copy_fits(o, n, cnt):
            return ST_FULL
        r.code = ST_OK
        r.tail = -1
        r.ssrc = ssrc
        r.rtcp = 1
        emit_copy_write(s, d, n, 1, cnt, o, r)
        return ST_OK
    hlen = rtp_header_length(d, n)
    if hlen < 0:
        return ST_MALFORMED
    ssrc = be32(d + 8)
    s = find_stream(c, ssrc)
    if s == NULL:
        return ST_UNKNOWN_SSRC
    if n < hlen + 1:
        return ST_MALFORMED
    if s.video and s.ngated and d[n - 1] & 0x80:
        c.req.kind = ST_NEED_GATES
        c.req.ssrc = ssrc
        c.req.tail = d[n - 1]
        return ST_NEED_GATES
    blen = n - 1
    for i in range(s.nroute):
        e = &s.route[i]
        c.plan_var[i] = -1
        if e.gated:
            continue
        v = find_variant(c, nvar, e.position, 0)
        if v < 0:
            v = nvar
            nvar += 1
            c.var_pos[v] = e.position
            c.var_tid[v] = 0
            c.var_cnt[v] = 0
        c.var_cnt[v] += 1
        c.plan_var[i] = v
        total += 1
    need = nvar * blen
    if nvar and (o.used + need > o.cap or o.nmeta + nvar > o.meta_cap
                 or o.nrcv + total > o.rcv_cap):
        return ST_FULL
    r.code = ST_OK
    r.tail = d[n - 1]
    r.ssrc = ssrc
    r.rtcp = 0
    r.first_out = o.nmeta
    r.n_out = nvar
    if not nvar:
        return ST_OK
    write_receivers(c, s, nvar, o)
    for v in range(nvar):
        p = o.buf + o.used
        memcpy(p, d, blen)
        p[15] = <uint8_t>c.var_pos[v]
        m = o.meta + (o.nmeta + v) * C_OUT_COLUMNS
        m[C_OUT_OFFSET] = o.used
        m[C_OUT_LENGTH] = blen
        m[C_OUT_RCV_START] = o.nrcv + c.var_first[v]
        m[C_OUT_RCV_COUNT] = c.var_cnt[v]
        m[C_OUT_PACKET] = o.packet
        o.used += blen
    o.nmeta += nvar
    o.nrcv += total
    return ST_OK


cdef int process(Core *c, const uint8_t *d, int64_t n, int rtcp, Out *o, Res *r) noexcept nogil:
    """Forwarder.forward for one datagram whose RTP/RTCP kind is decided."""
    cdef int st
    if not c.srtp:
        st = plain_packet(c, d, n, rtcp, o, r)
    else:
        st = srtp_rtcp(c, d, n, o, r) if rtcp else srtp_rtp(c, d, n, o, r)
        if (c.plain and ST_OK < st <= ST_AUTH and st != ST_UNKNOWN_SSRC
                and st != ST_REPLAY):
            st = plain_packet(c, d, n, rtcp, o, r)  # a downgraded room's first plain packets
    if ST_OK < st <= ST_AUTH:
        r.code = st
        r.tail = -1
        r.ssrc = be32(d + (4 if rtcp else 8)) if n >= (8 if rtcp else 12) else -1
        r.rtcp = rtcp
        r.first_out = o.nmeta
        r.n_out = 0
    return st


cdef inline int decide_rtcp(const uint8_t *d, int64_t n, int flag) noexcept nogil:
    if flag >= 0:
        return flag != 0
    return n >= 2 and 192 <= d[1] <= 223


cdef int run_batch(Core *c, const uint8_t *arena, int64_t stride, const int32_t *lengths,
                   const int8_t *kinds, int64_t start, int64_t count, Out *o,
                   int64_t *results, int64_t *done) noexcept nogil:
    """Packets start..count-1 through process(); stops at the first NEED_*/FULL status."""
    cdef int64_t i
    cdef int st, rtcp
    cdef const uint8_t *d
    cdef int64_t n
    cdef Res r
    cdef int64_t *row
    for i in range(start, count):
        d = arena + i * stride
        n = lengths[i]
        rtcp = decide_rtcp(d, n, kinds[i] if kinds != NULL else -1)
        o.packet = i
        st = process(c, d, n, rtcp, o, &r)
        if st > ST_AUTH:
            done[0] = i
            return st
        c.tally[r.code] += 1
        row = results + i * C_RES_COLUMNS
        row[C_RES_CODE] = r.code
        row[C_RES_TAIL] = r.tail
        row[C_RES_SSRC] = r.ssrc
        row[C_RES_RTCP] = r.rtcp
        row[C_RES_FIRST_OUT] = r.first_out
        row[C_RES_N_OUT] = r.n_out
    done[0] = count
    return ST_OK


# -- the Python-facing twin ---------------------------------------------------------------------

cdef class FastForwarder:
    """Verifies, strips, re-tags and fans out one conference's SRTP/SRTCP, in C.

    The twin of ``Forwarder``: same constructor, configuration calls, ``forward`` and
    ``state_snapshot``. ``forward_batch`` runs many datagrams from a preallocated arena in one
    call without the GIL; ``ctms_media.fastpath.batch.Batch`` holds such arenas.
    """

    cdef Core c
    cdef object _ref                # the reference Forwarder: configuration and slow answers
    cdef dict _id_slot              # receiver id -> interned slot
    cdef list _ids                  # slot -> receiver id
    # forward()'s own output scratch
    cdef uint8_t *_obuf
    cdef int64_t _ocap
    cdef int64_t *_ometa
    cdef int32_t *_orcv
    cdef int64_t _mcap
    # arrays kept by bind() for run_bound()
    cdef const uint8_t[:, ::1] _ba
    cdef const int32_t[::1] _bl
    cdef int64_t[:, ::1] _br
    cdef uint8_t[::1] _bo
    cdef int64_t[:, ::1] _bm
    cdef int32_t[::1] _bv
    cdef const int8_t[::1] _bk
    cdef bint _bound

    def __cinit__(self, *args, **kwargs):
        memset(&self.c, 0, sizeof(Core))
        self.c.srtp = 1
        self.c.id_words = 1
        self.c.wcap = 8
        self._obuf = NULL
        self._ometa = NULL
        self._orcv = NULL
        self._ocap = 0
        self._mcap = 0

    def __init__(self, ekt_format: str = FORMAT_CTMS) -> None:
        self._ref = _Reference(ekt_format)
        self.c.rfc8870 = self._ref.ekt_format != FORMAT_CTMS
        self._id_slot = {}
        self._ids = []
        self._ensure_scratch(1)
        self._sync_modes()

    def __dealloc__(self):
        cdef int i
        for i in range(self.c.nstreams):
            _free_stream(self.c.streams[i])
        free(self.c.streams)
        free(self.c.table)
        free(self.c.groups)
        _free_scratch(&self.c)
        free(self._obuf)
        free(self._ometa)
        free(self._orcv)

    # -- what the reference exposes ---------------------------------------------------------

    @property
    def ekt_format(self) -> str:
        return self._ref.ekt_format

    @property
    def groups(self) -> dict:
        """SPI -> GroupParams (read-only use; configure through add_group/remove_group)."""
        return self._ref.groups

    @property
    def streams(self) -> dict:
        """Declared SSRC -> StreamState as declared. Key state lives in C: read it with
        state_snapshot(), not from these objects."""
        return self._ref.streams

    @property
    def routes(self) -> dict:
        """SSRC -> receivers (read-only use; configure through set_route)."""
        return self._ref.routes

    @property
    def srtp(self) -> bool:
        return self._ref.srtp

    @property
    def plain(self) -> bool:
        return self._ref.plain

    @property
    def receiver_ids(self) -> list:
        """Interned receiver slot -> receiver id; batch outputs name receivers by slot."""
        return list(self._ids)

    def receiver_slot(self, receiver_id: str) -> int:
        """The slot batch outputs use for ``receiver_id`` (interned by set_route)."""
        return self._intern(receiver_id)

    # -- configuration: the reference validates and keeps it, C mirrors it ----------------

    def set_modes(self, srtp: bool, plain: bool) -> None:
        self._ref.set_modes(srtp, plain)
        self._sync_modes()

    def add_group(self, spi: int, cipher: int, kek: bytes, salt: bytes, profile) -> None:
        self._ref.add_group(spi, cipher, kek, salt, profile)
        self._sync_groups()

    def remove_group(self, spi: int) -> None:
        self._ref.remove_group(spi)
        self._sync_groups()

    def add_stream(self, ssrc: int, kind: str, profile) -> None:
        self._ref.add_stream(ssrc, kind, profile)
        self._add_c_stream(ssrc)

    def remove_stream(self, ssrc: int) -> None:
        self._ref.remove_stream(ssrc)
        self._remove_c_stream(ssrc)

    def set_route(self, ssrc: int, receivers) -> None:
        self._ref.set_route(ssrc, receivers)
        self._sync_route(ssrc)

    def state_snapshot(self) -> dict:
        """Every per-stream value a packet may change, built from the C state."""
        cdef Stream *s
        out = {}
        for ssrc in sorted(self._ref.streams):
            s = self._stream(ssrc)
            if s == NULL:  # an SSRC no packet can carry: nothing a packet could change
                out[ssrc] = (None, None, -1, 0, None, self._ref.routes.get(ssrc, ()))
                continue
            out[ssrc] = (
                self._key_snapshot(s, s.cur),
                self._key_snapshot(s, s.prev),
                s.rtp_replay.highest,
                _window_bits(&s.rtp_replay),
                s.roc if s.roc >= 0 else None,
                self._ref.routes.get(ssrc, ()),
            )
        return out

    # -- the packet path --------------------------------------------------------------------

    def forward(self, datagram, rtcp=None) -> Verdict:
        """One uplink datagram -> a Verdict (Forwarder.forward). ``rtcp`` None: RFC 5761."""
        cdef bytes data = datagram if type(datagram) is bytes else bytes(datagram)
        cdef const uint8_t *d = <const uint8_t *>PyBytes_AS_STRING(data)
        cdef int64_t n = PyBytes_GET_SIZE(data)
        cdef int flag = -1 if rtcp is None else (1 if rtcp else 0)
        cdef int is_rtcp = decide_rtcp(d, n, flag)
        cdef int st, rounds = 0
        cdef Out o
        cdef Res r
        cdef int64_t i, j, k
        cdef int64_t *m
        switched = ()
        while True:
            o.buf = self._obuf
            o.cap = self._ocap
            o.used = 0
            o.meta = self._ometa
            o.meta_cap = self._mcap
            o.nmeta = 0
            o.rcv = self._orcv
            o.rcv_cap = self._mcap
            o.nrcv = 0
            o.packet = 0
            with nogil:
                st = process(&self.c, d, n, is_rtcp, &o, &r)
            if st <= ST_AUTH:
                break
            rounds += 1
            if rounds > MAX_ROUNDS:
                raise RuntimeError("FastForwarder: a packet kept asking the slow path")
            if st == ST_FULL:
                self._grow_out(2 * max(self._ocap, n * (self._max_route() + 1) + 4096))
            else:
                got = self._answer()
                if got:
                    switched = got
        self.c.tally[st] += 1
        if st != ST_OK:
            return Verdict(drop=DROP_REASONS[st - 1], ssrc=None if r.ssrc < 0 else r.ssrc,
                           rtcp=bool(is_rtcp))
        outputs = []
        ids = self._ids
        for i in range(r.n_out):
            m = o.meta + i * C_OUT_COLUMNS
            j = m[C_OUT_RCV_START]
            k = m[C_OUT_RCV_COUNT]
            outputs.append((
                PyBytes_FromStringAndSize(<char *>o.buf + m[C_OUT_OFFSET], m[C_OUT_LENGTH]),
                tuple([ids[o.rcv[j + x]] for x in range(k)]),
            ))
        if r.rtcp:
            return Verdict(ssrc=r.ssrc, rtcp=True, outputs=outputs)
        return Verdict(tail=r.tail, ssrc=r.ssrc, outputs=outputs, switched=switched)

    def forward_batch(self, const uint8_t[:, ::1] arena, const int32_t[::1] lengths,
                      Py_ssize_t count, int64_t[:, ::1] results, uint8_t[::1] out_arena,
                      int64_t[:, ::1] out_meta, int32_t[::1] out_receivers,
                      const int8_t[::1] kinds=None, Py_ssize_t start=0):
        """Forward datagrams ``start .. count-1`` of ``arena`` (row i holds ``lengths[i]``
        bytes) in one call, without the GIL.

        ``kinds[i]``: -1 decide RTP/RTCP from the second byte, 0 RTP, 1 RTCP (None: all -1).
        Per packet, ``results[i]`` gets (code, tail or -1, SSRC or -1, rtcp, first output,
        output count); code 0 is forwarded, 1..7 the drop reasons in DROP_REASONS order.
        Each output (one per distinct byte string, in the reference's order) is a row of
        ``out_meta``: (offset and length in ``out_arena``, start and count in
        ``out_receivers``, packet index); receivers are interned slots (``receiver_ids``).

        Returns (packets done, outputs written, receiver entries written, switched) where
        ``switched`` maps a packet index to the receivers its IDR start switched to this
        sender (the Verdict's ``switched``). Fewer packets than asked are done only when the
        output arrays are full: send those, then call again with ``start`` = packets done.
        Packets needing an EKT unwrap/wrap, a key derivation or an IDR gate are answered by
        the reference's functions between C runs; the verdicts equal forward() one by one.
        """
        return self._run(arena, lengths, count, results, out_arena, out_meta, out_receivers,
                         kinds, start)

    def bind(self, const uint8_t[:, ::1] arena, const int32_t[::1] lengths,
             int64_t[:, ::1] results, uint8_t[::1] out_arena, int64_t[:, ::1] out_meta,
             int32_t[::1] out_receivers, const int8_t[::1] kinds=None) -> None:
        """Keep a batch's arrays for run_bound, so a relay loop passes only integers per
        batch (converting seven arrays per call costs more than forwarding a packet)."""
        self._ba, self._bl, self._br = arena, lengths, results
        self._bo, self._bm, self._bv, self._bk = out_arena, out_meta, out_receivers, kinds
        self._bound = True

    def run_bound(self, Py_ssize_t count, Py_ssize_t start=0):
        """forward_batch over the arrays given to bind()."""
        if not self._bound:
            raise ValueError("bind() a batch first")
        return self._run(self._ba, self._bl, count, self._br, self._bo, self._bm, self._bv,
                         self._bk, start)

    def verdict_counts(self) -> tuple:
        """How many datagrams ended forwarded (index 0) or dropped for each reason (1..7),
        over every forward and forward_batch call: cheap counters for a relay's metrics."""
        return tuple(self.c.tally[i] for i in range(8))

    cdef object _run(self, const uint8_t[:, ::1] arena, const int32_t[::1] lengths,
                     Py_ssize_t count, int64_t[:, ::1] results, uint8_t[::1] out_arena,
                     int64_t[:, ::1] out_meta, int32_t[::1] out_receivers,
                     const int8_t[::1] kinds, Py_ssize_t start):

        cdef Out o
        cdef int st = ST_OK
        cdef int64_t done = start
        cdef int64_t last = -1
        cdef int rounds = 0
        cdef const int8_t *kp = NULL
        cdef Py_ssize_t i
        if count > arena.shape[0] or count > lengths.shape[0] or count > results.shape[0]:
            raise ValueError("count exceeds the batch arrays")
        if results.shape[1] < C_RES_COLUMNS or out_meta.shape[1] < C_OUT_COLUMNS:
            raise ValueError("results need 6 columns and out_meta 5")
        if kinds is not None:
            if kinds.shape[0] < count:
                raise ValueError("kinds is shorter than count")
            kp = &kinds[0]
        if start < 0 or start > count:
            raise ValueError("start outside the batch")
        for i in range(start, count):
            if lengths[i] < 0 or lengths[i] > arena.shape[1]:
                raise ValueError(f"length of row {i} outside the arena")
        o.buf = &out_arena[0] if out_arena.shape[0] else NULL
        o.cap = out_arena.shape[0]
        o.used = 0
        o.meta = &out_meta[0, 0] if out_meta.shape[0] else NULL
        o.meta_cap = out_meta.shape[0]
        o.nmeta = 0
        o.rcv = &out_receivers[0] if out_receivers.shape[0] else NULL
        o.rcv_cap = out_receivers.shape[0]
        o.nrcv = 0
        switched = {}
        if count == start:
            return done, 0, 0, switched
        while done < count:
            with nogil:
                st = run_batch(&self.c, &arena[0, 0], arena.shape[1], &lengths[0], kp, done,
                               count, &o, &results[0, 0], &done)
            if st == ST_OK:
                break
            if st == ST_FULL:
                if done == start and o.nmeta == 0:
                    raise ValueError(
                        f"output arrays too small for packet {done}: need room for "
                        f"{self._max_route()} variants of it"
                    )
                break
            rounds = rounds + 1 if done == last else 1
            last = done
            if rounds > MAX_ROUNDS:
                raise RuntimeError("FastForwarder: a packet kept asking the slow path")
            got = self._answer()
            if got:
                switched[done] = got
        return done, o.nmeta, o.nrcv, switched

    # -- answering the C path's questions with the reference's own functions ---------------

    cdef object _answer(self):
        """Compute what c.req asks, store it where the C path looks; return switched ids."""
        cdef Request *q = &self.c.req
        cdef Stream *s = find_stream(&self.c, q.ssrc)
        cdef UnwrapEntry *ue
        cdef Derived *dv
        cdef WrapEntry *we
        cdef int i
        ref = self._ref
        if q.kind == ST_NEED_UNWRAP:
            group = ref.groups[q.spi]
            trailer = _Trailer(True, q.rawlen, group, q.epoch)
            trailer.raw = PyBytes_FromStringAndSize(<char *>q.raw, q.rawlen)
            ue = &s.ucache[s.unext]
            s.unext = (s.unext + 1) % UCACHE
            ue.valid = 0
            try:
                key, roc, isn = ref._unwrap(trailer, q.ssrc, ref.streams[q.ssrc].profile)
            except _Drop as drop:
                ue.status = DROP_CODES[drop.reason]
            else:
                if len(key) > KEY_MAX:
                    raise RuntimeError("master key longer than the C key slot")
                ue.status = ST_OK
                ue.klen = len(key)
                memcpy(ue.key, <const char *>key, ue.klen)
                ue.roc = roc
                ue.isn = isn
            ue.spi = q.spi
            ue.rawlen = q.rawlen
            memcpy(ue.raw, q.raw, q.rawlen)
            ue.valid = 1
        elif q.kind == ST_NEED_DERIVE:
            master = PyBytes_FromStringAndSize(<char *>q.master, q.mlen)
            salt = PyBytes_FromStringAndSize(<char *>q.salt, q.salt_len)
            k = KeyState.derive(master, salt, 0)
            dv = &self.c.derived[self.c.dnext]
            self.c.dnext = (self.c.dnext + 1) % DCACHE
            memcpy(dv.master, q.master, q.mlen)
            dv.mlen = q.mlen
            memcpy(dv.salt, q.salt, q.salt_len)
            dv.salt_len = q.salt_len
            hmac_init(&dv.rtp, <const unsigned char *><bytes>k.rtp_auth, len(k.rtp_auth))
            hmac_init(&dv.rtcp, <const unsigned char *><bytes>k.rtcp_auth, len(k.rtcp_auth))
            dv.valid = 1
        elif q.kind == ST_NEED_WRAP:
            key = KeyState(
                master_key=PyBytes_FromStringAndSize(<char *>q.master, q.mlen),
                start=q.start,
                rtp_auth=b"",
                rtcp_auth=b"",
                epoch=q.epoch,
            )
            for i in range(q.nspis):
                spi = self.c.miss_spis[i]
                t = ref._long_trailer(q.ssrc, key, q.roc, spi)
                if len(t) > TRAILER_MAX:
                    raise RuntimeError("EKT trailer longer than the C cache slot")
                we = &s.wcache[s.wnext]
                s.wnext = (s.wnext + 1) % s.wcap
                we.spi = spi
                memcpy(we.master, q.master, q.mlen)
                we.mlen = q.mlen
                we.roc = q.roc
                we.isn = <int>(q.start & 0xFFFF)
                we.epoch = q.epoch
                we.tlen = len(t)
                memcpy(we.trailer, <const char *><bytes>t, we.tlen)
                we.valid = 1
        elif q.kind == ST_NEED_GATES:
            switched = ref._open_gates(ref.streams[q.ssrc], q.tail)
            for ssrc in ref.streams:
                self._sync_route(ssrc)
            return switched
        return None

    # -- C mirror upkeep (configuration time only) -----------------------------------------

    cdef void _sync_modes(self):
        self.c.srtp = 1 if self._ref.srtp else 0
        self.c.plain = 1 if self._ref.plain else 0

    cdef void _sync_groups(self) except *:
        cdef int i, n = len(self._ref.groups)
        cdef Group *g
        cdef bytes salt
        free(self.c.groups)
        self.c.groups = <Group *>calloc(max(n, 1), sizeof(Group))
        if self.c.groups == NULL:
            raise MemoryError()
        self.c.ngroups = n
        for i, gp in enumerate(self._ref.groups.values()):
            g = &self.c.groups[i]
            g.spi = gp.spi
            g.cipher = int(gp.cipher)
            salt = bytes(gp.salt)
            if len(salt) > SALT_MAX:
                raise ConfigError("salt longer than the C slot")
            g.salt_len = len(salt)
            memcpy(g.salt, <const char *>salt, g.salt_len)
        # A group's KEK may have changed under its SPI: forget every EKT answer.
        self.c.wcap = max(8, 2 * n + 2)
        for i in range(self.c.nstreams):
            _reset_caches(self.c.streams[i], self.c.wcap)
        self._ensure_scratch(max(n + 1, self._max_route() + 1))

    cdef Stream *_stream(self, ssrc):
        """The C stream of a declared SSRC; NULL if undeclared or not a 32-bit value."""
        if type(ssrc) is not int and not isinstance(ssrc, int):
            return NULL
        if not 0 <= ssrc <= 0xFFFFFFFF or ssrc not in self._ref.streams:
            return NULL
        return find_stream(&self.c, <uint32_t>ssrc)

    cdef void _add_c_stream(self, ssrc) except *:
        cdef Stream *s
        cdef int k
        if not (isinstance(ssrc, int) and 0 <= ssrc <= 0xFFFFFFFF):
            return  # the reference keeps it; no datagram can name it
        s = <Stream *>calloc(1, sizeof(Stream))
        if s == NULL:
            raise MemoryError()
        st = self._ref.streams[ssrc]
        s.ssrc = ssrc
        s.video = st.kind == "video"
        s.rtp_tag = st.profile.rtp_tag_len
        s.rtcp_tag = st.profile.rtcp_tag_len
        s.key_len = st.profile.key_len
        s.cur = -1
        s.prev = -1
        s.roc = -1
        replay_reset(&s.rtp_replay)
        for k in range(2):
            s.keys[k].sent = <uint64_t *>calloc(self.c.id_words, sizeof(uint64_t))
            if s.keys[k].sent == NULL:
                _free_stream(s)
                raise MemoryError()
        _reset_caches(s, self.c.wcap)
        self.c.streams = <Stream **>realloc(self.c.streams,
                                            (self.c.nstreams + 1) * sizeof(Stream *))
        self.c.streams[self.c.nstreams] = s
        self.c.nstreams += 1
        self._rebuild_table()
        self._sync_route(ssrc)

    cdef void _remove_c_stream(self, ssrc) except *:
        cdef int i
        if not (isinstance(ssrc, int) and 0 <= ssrc <= 0xFFFFFFFF):
            return
        for i in range(self.c.nstreams):
            if self.c.streams[i].ssrc == ssrc:
                _free_stream(self.c.streams[i])
                self.c.streams[i] = self.c.streams[self.c.nstreams - 1]
                self.c.nstreams -= 1
                self._rebuild_table()
                return

    cdef void _rebuild_table(self) except *:
        cdef uint32_t cap = 8
        cdef int i
        cdef uint32_t h
        while cap < 2 * <uint32_t>self.c.nstreams + 2:
            cap *= 2
        free(self.c.table)
        self.c.table = <Stream **>calloc(cap, sizeof(Stream *))
        if self.c.table == NULL:
            raise MemoryError()
        self.c.tmask = cap - 1
        for i in range(self.c.nstreams):
            h = (self.c.streams[i].ssrc * <uint32_t>2654435761u) & self.c.tmask
            while self.c.table[h] != NULL:
                h = (h + 1) & self.c.tmask
            self.c.table[h] = self.c.streams[i]

    cdef int _intern(self, rid) except -1:
        cdef int slot = self._id_slot.get(rid, -1)
        cdef int words, i, k
        cdef uint64_t *grown
        cdef Stream *s
        if slot >= 0:
            return slot
        slot = len(self._ids)
        self._ids.append(rid)
        self._id_slot[rid] = slot
        words = slot // 64 + 1
        if words > self.c.id_words:
            for i in range(self.c.nstreams):
                s = self.c.streams[i]
                for k in range(2):
                    grown = <uint64_t *>realloc(s.keys[k].sent, words * sizeof(uint64_t))
                    if grown == NULL:
                        raise MemoryError()
                    memset(grown + self.c.id_words, 0,
                           (words - self.c.id_words) * sizeof(uint64_t))
                    s.keys[k].sent = grown
            self.c.id_words = words
        return slot

    cdef void _sync_route(self, ssrc) except *:
        cdef Stream *s = self._stream(ssrc)
        cdef RouteEntry *route
        cdef int i, n, gated = 0
        if s == NULL:
            return
        receivers = self._ref.routes.get(ssrc, ())
        n = len(receivers)
        route = <RouteEntry *>calloc(max(n, 1), sizeof(RouteEntry))
        if route == NULL:
            raise MemoryError()
        for i, rcv in enumerate(receivers):
            route[i].slot = self._intern(rcv.id)
            route[i].position = rcv.position
            route[i].spi = rcv.spi
            route[i].gated = 1 if getattr(rcv, "gated", False) else 0
            gated += route[i].gated
        free(s.route)
        s.route = route
        s.nroute = n
        s.ngated = gated
        self._ensure_scratch(max(n + 1, self.c.ngroups + 1))

    cdef int _max_route(self):
        cdef int i, m = 0
        for i in range(self.c.nstreams):
            m = max(m, self.c.streams[i].nroute)
        return m

    cdef void _ensure_scratch(self, int need) except *:
        cdef Core *c = &self.c
        if need <= c.scap:
            return
        need = max(need, 2 * c.scap, 16)
        _free_scratch(c)
        c.plan_var = <int32_t *>calloc(need, sizeof(int32_t))
        c.pending = <int32_t *>calloc(need, sizeof(int32_t))
        c.var_pos = <int32_t *>calloc(need, sizeof(int32_t))
        c.var_tid = <int32_t *>calloc(need, sizeof(int32_t))
        c.var_tlen = <int32_t *>calloc(need, sizeof(int32_t))
        c.var_cnt = <int32_t *>calloc(need, sizeof(int32_t))
        c.var_first = <int32_t *>calloc(need, sizeof(int32_t))
        c.miss_spis = <int32_t *>calloc(need, sizeof(int32_t))
        c.var_t = <const uint8_t **>calloc(need, sizeof(uint8_t *))
        c.var_tag = <uint8_t *>calloc(need, 20)
        if (c.plan_var == NULL or c.pending == NULL or c.var_pos == NULL or c.var_tid == NULL
                or c.var_tlen == NULL or c.var_cnt == NULL or c.var_first == NULL
                or c.miss_spis == NULL or c.var_t == NULL or c.var_tag == NULL):
            _free_scratch(c)
            raise MemoryError()
        c.scap = need
        self._grow_out(max(self._ocap, need * 2048))

    cdef void _grow_out(self, int64_t cap) except *:
        cdef int64_t rows = max(<int64_t>self.c.scap, 16)
        cdef uint8_t *b
        if cap > self._ocap:
            b = <uint8_t *>realloc(self._obuf, cap)
            if b == NULL:
                raise MemoryError()
            self._obuf = b
            self._ocap = cap
        if rows > self._mcap:
            free(self._ometa)
            free(self._orcv)
            self._ometa = <int64_t *>malloc(rows * C_OUT_COLUMNS * sizeof(int64_t))
            self._orcv = <int32_t *>malloc(rows * sizeof(int32_t))
            if self._ometa == NULL or self._orcv == NULL:
                raise MemoryError()
            self._mcap = rows

    cdef object _key_snapshot(self, Stream *s, int slot):
        cdef Key *k
        cdef int i
        if slot < 0:
            return None
        k = &s.keys[slot]
        sent = frozenset(
            [self._ids[i] for i in range(len(self._ids)) if bit_get(k.sent, i)]
        )
        return (
            PyBytes_FromStringAndSize(<char *>k.master, k.mlen),
            k.start,
            k.epoch,
            sent,
            k.rtcp_replay.highest,
            _window_bits(&k.rtcp_replay),
        )


cdef object _window_bits(const Replay *w):
    """The window as ReplayWindow.bits: a Python int, bit k for index highest - k."""
    cdef int i
    value = 0
    for i in range(WIN_WORDS - 1, -1, -1):
        value = (value << 64) | w.bits[i]
    return value


cdef void _reset_caches(Stream *s, int wcap) noexcept:
    memset(s.ucache, 0, sizeof(s.ucache))
    s.unext = 0
    if s.wcap != wcap:
        free(s.wcache)
        s.wcache = <WrapEntry *>calloc(wcap, sizeof(WrapEntry))
        s.wcap = wcap if s.wcache != NULL else 0
    elif s.wcache != NULL:
        memset(s.wcache, 0, wcap * sizeof(WrapEntry))
    s.wnext = 0


cdef void _free_stream(Stream *s) noexcept:
    if s == NULL:
        return
    free(s.keys[0].sent)
    free(s.keys[1].sent)
    free(s.route)
    free(s.wcache)
    free(s)


cdef void _free_scratch(Core *c) noexcept:
    free(c.plan_var)
    free(c.pending)
    free(c.var_pos)
    free(c.var_tid)
    free(c.var_tlen)
    free(c.var_cnt)
    free(c.var_first)
    free(c.miss_spis)
    free(<void *>c.var_t)
    free(c.var_tag)
    c.plan_var = c.pending = c.var_pos = c.var_tid = NULL
    c.var_tlen = c.var_cnt = c.var_first = c.miss_spis = NULL
    c.var_t = NULL
    c.var_tag = NULL
    c.scap = 0
