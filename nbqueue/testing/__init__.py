"""Test support shipped with nbqueue: the broker and backend contract suites."""
