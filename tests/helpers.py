"""Assertions shared by the test modules."""

import pytest

from sdmem.errors import InputError


def raises(fn, where: str, *problem: str) -> InputError:
    """fn() must raise an InputError whose location contains `where` and whose message contains each `problem`."""
    with pytest.raises(InputError) as info:
        fn()
    assert where in info.value.where, info.value
    for p in problem:
        assert p in info.value.problem, info.value
    return info.value
