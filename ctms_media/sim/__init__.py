"""Synthetic rooms: real libsrtp senders and receivers used by the demo, the load
generator, the benchmarks and the tests (never by the relay itself)."""
