"""The hotswap Python SDK, CLI and demo.

The public API is re-exported by :mod:`hotswap` (``hotswap.Client``, the errors, ...); the
modules here are private. This package imports nothing on purpose, so that ``hotswap control``
and ``hotswap engine`` start without loading the SDK.
"""
