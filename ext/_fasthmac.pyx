# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""HMAC-SHA1 with the key's inner/outer state computed once, and the batch loops built on it.

SRTP re-tags every forwarded packet with the same per-sender key, so the two key-block
compressions of HMAC are paid once at key commit instead of once per packet. Besides the
keyed object, this module holds what the benchmark and the tests need around the forwarder:
the physical floor (exactly the two HMAC passes a forwarded packet costs, nothing else) and a
sender-side stamper that writes sequence numbers and tags into a batch arena in place, so load
generators keep up with the relay without Python work per packet.
"""

from libc.stdint cimport int32_t, int64_t, uint8_t
from libc.string cimport memcpy

from hmac_sha1 cimport Hmac, hmac_digest, hmac_init, put_be32
from openssl cimport CRYPTO_memcmp, EVP_sha1, HMAC


cdef class HmacSha1:
    """A keyed HMAC-SHA1 whose digest of (data || roc) costs two SHA-1 finishes."""

    cdef Hmac h
    cdef bytes key

    def __cinit__(self, const unsigned char[:] key):
        if key.shape[0] > 64:
            raise ValueError("HMAC-SHA1 keys longer than 64 bytes are not used by SRTP")
        self.key = bytes(key)
        hmac_init(&self.h, <const unsigned char *>self.key, len(self.key))

    def srtp_tag(self, const unsigned char[:] data, unsigned int roc, int length) -> bytes:
        """Tag of an SRTP packet: HMAC(k_a, authenticated portion || ROC) truncated."""
        cdef unsigned char out[20]
        cdef unsigned char rocb[4]
        if length < 1 or length > 20:
            raise ValueError("tag length must be 1..20")
        put_be32(rocb, roc)
        with nogil:
            hmac_digest(&self.h, &data[0] if data.shape[0] else NULL, data.shape[0], rocb, out)
        return out[:length]

    def srtcp_tag(self, const unsigned char[:] data, int length) -> bytes:
        """Tag of an SRTCP packet: HMAC(k_a, header .. E/index word) truncated."""
        cdef unsigned char out[20]
        if length < 1 or length > 20:
            raise ValueError("tag length must be 1..20")
        with nogil:
            hmac_digest(&self.h, &data[0] if data.shape[0] else NULL, data.shape[0], NULL, out)
        return out[:length]

    def verify_srtp(self, const unsigned char[:] data, unsigned int roc,
                    const unsigned char[:] tag) -> bool:
        """Constant-time check of an SRTP tag."""
        cdef unsigned char out[20]
        cdef unsigned char rocb[4]
        cdef Py_ssize_t n = tag.shape[0]
        if n < 1 or n > 20:
            return False
        put_be32(rocb, roc)
        with nogil:
            hmac_digest(&self.h, &data[0] if data.shape[0] else NULL, data.shape[0], rocb, out)
        return CRYPTO_memcmp(out, &tag[0], n) == 0

    def stamp_rtp(self, uint8_t[:, ::1] arena, const int32_t[::1] lengths,
                  const int64_t[::1] indices, Py_ssize_t count, int tag_len,
                  int trailer_len) -> None:
        """Sender side, in place: packet i gets SEQ = indices[i] & 0xFFFF and the tag for ROC
        indices[i] >> 16 over everything before its tag (tail byte included). The trailer
        after the tag is left as it is."""
        cdef Py_ssize_t i
        cdef int64_t auth_end, index
        cdef unsigned char rocb[4]
        cdef unsigned char out[20]
        if count > arena.shape[0] or count > lengths.shape[0] or count > indices.shape[0]:
            raise ValueError("count exceeds the batch")
        if tag_len < 1 or tag_len > 20:
            raise ValueError("tag length must be 1..20")
        for i in range(count):
            auth_end = lengths[i] - trailer_len - tag_len
            if auth_end < 12 or lengths[i] > arena.shape[1]:
                raise ValueError(f"packet {i} is too short for its tag and trailer")
        with nogil:
            for i in range(count):
                index = indices[i]
                auth_end = lengths[i] - trailer_len - tag_len
                arena[i, 2] = (index >> 8) & 0xFF
                arena[i, 3] = index & 0xFF
                put_be32(rocb, <unsigned int>(index >> 16))
                hmac_digest(&self.h, &arena[i, 0], auth_end, rocb, out)
                memcpy(&arena[i, auth_end], out, tag_len)

    def floor_batch(self, const uint8_t[:, ::1] arena, const int32_t[::1] lengths,
                    Py_ssize_t count, int tag_len, int trailer_len) -> int:
        """The physical floor of forwarding packet i: HMAC over its authenticated portion
        (the verify) and HMAC over that portion less the tail byte (the re-tag), both with
        the precomputed key state; nothing else. Returns a checksum so no pass is elided."""
        cdef Py_ssize_t i
        cdef int64_t auth_end
        cdef unsigned char rocb[4]
        cdef unsigned char out[20]
        cdef unsigned int acc = 0
        if count > arena.shape[0] or count > lengths.shape[0]:
            raise ValueError("count exceeds the batch")
        put_be32(rocb, 0)
        with nogil:
            for i in range(count):
                auth_end = lengths[i] - trailer_len - tag_len
                if auth_end < 1:
                    continue
                hmac_digest(&self.h, &arena[i, 0], auth_end, rocb, out)
                acc += out[0]
                hmac_digest(&self.h, &arena[i, 0], auth_end - 1, rocb, out)
                acc += out[0]
        return acc

    def oneshot_batch(self, const uint8_t[:, ::1] arena, const int32_t[::1] lengths,
                      Py_ssize_t count, int tag_len, int trailer_len) -> int:
        """As floor_batch, through OpenSSL's one-shot HMAC() that re-keys per call: what a
        straightforward C relay would pay (shown beside the floor, not used by the relay)."""
        cdef Py_ssize_t i
        cdef int64_t auth_end
        cdef unsigned char out[20]
        cdef unsigned int outlen = 0
        cdef unsigned int acc = 0
        cdef const unsigned char *k = <const unsigned char *>self.key
        cdef int klen = len(self.key)
        if count > arena.shape[0] or count > lengths.shape[0]:
            raise ValueError("count exceeds the batch")
        with nogil:
            for i in range(count):
                auth_end = lengths[i] - trailer_len - tag_len
                if auth_end < 1:
                    continue
                HMAC(EVP_sha1(), k, klen, &arena[i, 0], auth_end, out, &outlen)
                acc += out[0]
                HMAC(EVP_sha1(), k, klen, &arena[i, 0], auth_end - 1, out, &outlen)
                acc += out[0]
        return acc
