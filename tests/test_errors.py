"""Every whole-request error class maps to exactly one gRPC status."""

import pytest
from grpclib.const import Status

import relay.limits  # noqa: F401 (defines RelayError subclasses of its own)
from relay import errors


def _subclasses(cls: type) -> list[type]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *_subclasses(sub)]
    return found


# Constructor arguments for classes that take more than a message. Every subclass is found,
# wherever it is defined (relay.limits adds some): a new class with a new signature must add
# its sample here, and is then checked for a status like the others.
SAMPLE_ARGS: dict[str, tuple[object, ...]] = {
    "InvalidArgument": (["x: y"],),
    "RateLimited": ("x", 1.0),
}


@pytest.mark.parametrize("cls", _subclasses(errors.RelayError), ids=lambda c: c.__name__)
def test_every_error_class_is_mapped(cls: type[errors.RelayError]) -> None:
    error = cls(*SAMPLE_ARGS.get(cls.__name__, ("x",)))
    assert isinstance(errors.status_for(error), Status)


def test_unmapped_class_is_caught() -> None:
    class Stray(errors.RelayError):
        pass

    with pytest.raises(TypeError):
        errors.status_for(Stray("x"))


def test_invalid_argument_lists_problems_and_bounds_the_message() -> None:
    error = errors.InvalidArgument([f"devices[{i}].token: required" for i in range(25)])
    assert str(error).startswith("devices[0].token: required; devices[1].token")
    assert str(error).endswith("and 15 more")
    assert errors.status_for(error) == Status.INVALID_ARGUMENT
