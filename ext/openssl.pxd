# OpenSSL libcrypto declarations used by the packet path (kept apart from the logic, uvloop-style).
# The low-level SHA1_* calls are deprecated in OpenSSL 3 but remain the cheapest way to clone a
# precomputed HMAC inner/outer state per packet: one memcpy of a SHA_CTX, no allocation.
# setup.py defines OPENSSL_SUPPRESS_DEPRECATED so the build stays quiet about it.

cdef extern from "openssl/sha.h" nogil:
    ctypedef struct SHA_CTX:
        pass
    int SHA1_Init(SHA_CTX *c)
    int SHA1_Update(SHA_CTX *c, const void *data, size_t len)
    int SHA1_Final(unsigned char *md, SHA_CTX *c)

cdef extern from "openssl/crypto.h" nogil:
    int CRYPTO_memcmp(const void *a, const void *b, size_t len)

cdef extern from "openssl/evp.h" nogil:
    ctypedef struct EVP_MD:
        pass
    const EVP_MD *EVP_sha1()

cdef extern from "openssl/hmac.h" nogil:
    # The one-shot HMAC(): what a naive C implementation would call per packet (re-keys every
    # time). The benchmark shows it beside the precomputed-state floor.
    unsigned char *HMAC(const EVP_MD *evp_md, const void *key, int key_len,
                        const unsigned char *d, size_t n, unsigned char *md,
                        unsigned int *md_len)
