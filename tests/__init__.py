"""modelwatch tests.

A package, so `tests.writers` and `tests.conftest` import the same way under `pytest` and
`python -m pytest` alike, and conftest is loaded once.
"""
