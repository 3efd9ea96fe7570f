"""The project's own error types.

Parsers raise these (never IndexError/struct.error) so callers at the I/O edge can count a
bad datagram and move on with a single ``except CtmsError``.
"""


class CtmsError(Exception):
    """Base of every error ctms_media raises on purpose."""


class MalformedError(CtmsError):
    """Bytes that do not frame as the protocol says (truncated, wrong version, bad lengths)."""


class UnwrapError(CtmsError):
    """An EKT ciphertext failed its integrity check or decoded to an impossible plaintext."""


class ConfigError(CtmsError):
    """A parameter set, stream or route that the contract does not allow."""


class LimitReached(CtmsError):
    """A configured bound on relay state (``[limits]``) would be exceeded by a request.

    Its own class, apart from :class:`ConfigError`, because the request itself is fine: it
    may succeed once something leaves, so the admin API answers 503, not 400.
    """
