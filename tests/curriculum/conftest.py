"""Fixtures of the curriculum tests: small tables filled through the public API."""
import numpy as np
import pytest

from ace.curriculum import init_table, insert, make_rows, state_hash


ROWS = 8  # candidate batch size of most tests: one compiled insert per capacity


def filled_table(capacity: int, n_rows: int, *, step: int = 0):
    """A table of `capacity` rows with `n_rows` root tasks, hashes of "task-<i>"; returns (table, result)."""
    hashes = np.stack([state_hash(f"task-{i}") for i in range(n_rows)])
    rows = make_rows(-1, np.arange(n_rows) % 3, 0, hashes, pad_to=max(ROWS, n_rows))
    return insert(init_table(capacity), rows, step=step)


@pytest.fixture
def make_filled_table():
    return filled_table
