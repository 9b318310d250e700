import os
import re

import pytest
import torch


@pytest.fixture(autouse=True)
def _torch_defaults():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    """Under mutmut (``make mutate``), run the tests of the mutated module's own test file first:
    they are the likeliest to kill the mutant, and ``-x`` then stops early. Order only; no test is
    added or left out, and outside a mutation run nothing changes."""
    found = re.match(r"(?:.*\.)?(\w+)\.x[_\u01c1]", os.environ.get("MUTANT_UNDER_TEST", ""))
    if found:
        own = f"test_{found.group(1)}.py"
        items.sort(key=lambda item: item.path.name != own)  # a stable sort keeps the order within each group
