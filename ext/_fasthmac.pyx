# cython: language_level=3
"""HMAC-SHA1 with the key's inner/outer state computed once.

SRTP re-tags every forwarded packet with the same per-sender key, so the two key-block
compressions of HMAC are paid once at key commit instead of once per packet.
"""

from libc.string cimport memcpy, memset

from openssl cimport SHA1_Final, SHA1_Init, SHA1_Update, SHA_CTX, CRYPTO_memcmp

cdef extern from "Python.h":
    pass


cdef class HmacSha1:
    """A keyed HMAC-SHA1 whose digest of (data || roc) costs two SHA1 finishes."""

    cdef SHA_CTX inner
    cdef SHA_CTX outer

    def __cinit__(self, const unsigned char[:] key):
        cdef unsigned char block[64]
        cdef unsigned char pad[64]
        cdef Py_ssize_t i, n = key.shape[0]
        if n > 64:
            raise ValueError("HMAC-SHA1 keys longer than 64 bytes are not used by SRTP")
        memset(block, 0, 64)
        if n:
            memcpy(block, &key[0], n)
        for i in range(64):
            pad[i] = block[i] ^ 0x36
        SHA1_Init(&self.inner)
        SHA1_Update(&self.inner, pad, 64)
        for i in range(64):
            pad[i] = block[i] ^ 0x5C
        SHA1_Init(&self.outer)
        SHA1_Update(&self.outer, pad, 64)

    cdef void _digest(self, const unsigned char *data, size_t n, unsigned int roc,
                      unsigned char *out) noexcept nogil:
        cdef SHA_CTX c
        cdef unsigned char rocb[4]
        cdef unsigned char md[20]
        memcpy(&c, &self.inner, sizeof(SHA_CTX))
        SHA1_Update(&c, data, n)
        rocb[0] = (roc >> 24) & 0xFF
        rocb[1] = (roc >> 16) & 0xFF
        rocb[2] = (roc >> 8) & 0xFF
        rocb[3] = roc & 0xFF
        SHA1_Update(&c, rocb, 4)
        SHA1_Final(md, &c)
        memcpy(&c, &self.outer, sizeof(SHA_CTX))
        SHA1_Update(&c, md, 20)
        SHA1_Final(out, &c)

    def srtp_tag(self, const unsigned char[:] data, unsigned int roc, int length):
        """Tag of an SRTP packet: HMAC(k_a, authenticated portion || ROC) truncated."""
        cdef unsigned char out[20]
        if length < 1 or length > 20:
            raise ValueError("tag length must be 1..20")
        with nogil:
            self._digest(&data[0] if data.shape[0] else NULL, data.shape[0], roc, out)
        return bytes(out[:length])

    def verify_srtp(self, const unsigned char[:] data, unsigned int roc,
                    const unsigned char[:] tag):
        """Constant-time check of an SRTP tag."""
        cdef unsigned char out[20]
        cdef Py_ssize_t n = tag.shape[0]
        if n < 1 or n > 20:
            return False
        with nogil:
            self._digest(&data[0] if data.shape[0] else NULL, data.shape[0], roc, out)
        return CRYPTO_memcmp(out, &tag[0], n) == 0
