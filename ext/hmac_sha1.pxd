# HMAC-SHA1 with the key's inner and outer SHA-1 states computed once (at key commit).
# Shared by _fastforward (the forwarder) and _fasthmac (the floor, the benchmark's senders), so
# the tag primitive exists in exactly one place. Inline: the compiler sees through it in the loop.

from libc.string cimport memcpy, memset

from openssl cimport SHA1_Final, SHA1_Init, SHA1_Update, SHA_CTX


cdef struct Hmac:
    SHA_CTX inner   # SHA-1 state after absorbing key ^ ipad
    SHA_CTX outer   # SHA-1 state after absorbing key ^ opad


cdef inline void hmac_init(Hmac *h, const unsigned char *key, size_t n) noexcept nogil:
    """Absorb the padded key into both states; keys longer than a block are not used by SRTP."""
    cdef unsigned char block[64]
    cdef unsigned char pad[64]
    cdef size_t i
    memset(block, 0, 64)
    if n > 64:
        n = 64
    if n:
        memcpy(block, key, n)
    for i in range(64):
        pad[i] = block[i] ^ 0x36
    SHA1_Init(&h.inner)
    SHA1_Update(&h.inner, pad, 64)
    for i in range(64):
        pad[i] = block[i] ^ 0x5C
    SHA1_Init(&h.outer)
    SHA1_Update(&h.outer, pad, 64)


cdef inline void hmac_digest(const Hmac *h, const unsigned char *data, size_t n,
                             const unsigned char *tail4, unsigned char *out) noexcept nogil:
    """HMAC(data || tail4) into out[20]; tail4 is the 4-byte SRTP ROC or NULL (SRTCP)."""
    cdef SHA_CTX c
    cdef unsigned char md[20]
    memcpy(&c, &h.inner, sizeof(SHA_CTX))
    SHA1_Update(&c, data, n)
    if tail4 != NULL:
        SHA1_Update(&c, tail4, 4)
    SHA1_Final(md, &c)
    memcpy(&c, &h.outer, sizeof(SHA_CTX))
    SHA1_Update(&c, md, 20)
    SHA1_Final(out, &c)


cdef inline void put_be32(unsigned char *p, unsigned int v) noexcept nogil:
    p[0] = (v >> 24) & 0xFF
    p[1] = (v >> 16) & 0xFF
    p[2] = (v >> 8) & 0xFF
    p[3] = v & 0xFF
