"""Every whole-request error class maps to exactly one gRPC status."""

import grpc
import pytest

from relay import errors


def _subclasses(cls: type) -> list[type]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *_subclasses(sub)]
    return found


@pytest.mark.parametrize("cls", _subclasses(errors.RelayError), ids=lambda c: c.__name__)
def test_every_error_class_is_mapped(cls: type[errors.RelayError]) -> None:
    error = cls(["x: y"]) if cls is errors.InvalidArgument else cls("x")
    assert isinstance(errors.status_for(error), grpc.StatusCode)


def test_unmapped_class_is_caught() -> None:
    class Stray(errors.RelayError):
        pass

    with pytest.raises(TypeError):
        errors.status_for(Stray("x"))


def test_invalid_argument_lists_problems_and_bounds_the_message() -> None:
    error = errors.InvalidArgument([f"devices[{i}].token: required" for i in range(25)])
    assert str(error).startswith("devices[0].token: required; devices[1].token")
    assert str(error).endswith("and 15 more")
    assert errors.status_for(error) == grpc.StatusCode.INVALID_ARGUMENT
