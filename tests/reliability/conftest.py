"""The reliability tests use the end-to-end fixtures (real local stacks)."""

from tests.e2e.conftest import stack, stack2, xtest

__all__ = ["stack", "stack2", "xtest"]
