"""Python glue around the Cython packet path: batches as numpy arenas (``batch``), and a
small relay loop that runs a forwarder over a UDP socket with batched I/O (``relay``).

The extension modules are ``ctms_media._fastforward`` (the forwarder twin) and
``ctms_media._udpio`` (recvmmsg/sendmmsg); this package only arranges arrays around them.
"""
