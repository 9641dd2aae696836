"""Cutting display text on grapheme-cluster boundaries so that a rendered payload fits its limit.

The caller passes a ``size_of`` function that renders and encodes the whole payload with a
candidate text and returns its size in bytes, so every quirk of the payload (JSON escaping of
quotes and control characters, text that appears twice, JSON nested in a JSON string) is
measured rather than estimated. ``size_of`` must not decrease when the candidate grows by a
character, which holds for JSON: it escapes each character on its own.
"""

from __future__ import annotations

from collections.abc import Callable

# Until types-regex is a dev dependency (asked of the lead), regex has no stubs here.
import regex  # type: ignore[import-untyped, unused-ignore]

ELLIPSIS = "…"
_GRAPHEME = regex.compile(r"\X")


def fit_text(size_of: Callable[[str], int], text: str, limit: int) -> str | None:
    """The longest form of ``text`` whose payload is at most ``limit`` bytes.

    Args:
        size_of: the encoded size of the payload rendered with a candidate text.
        text: the text to fit.
        limit: the payload's limit in bytes.

    Returns:
        ``text`` itself when it fits; otherwise its longest prefix of whole grapheme clusters
        followed by an ellipsis (possibly the ellipsis alone); None when not even the ellipsis
        fits.
    """
    if size_of(text) <= limit:
        return text
    spare = limit - size_of(ELLIPSIS)
    if spare < 0:
        return None
    # A cut's text is escaped in the payload, so it costs at least its UTF-8 bytes: only the
    # clusters within `spare` bytes can be kept, and at least one byte each.
    graphemes = leading_graphemes(text, spare)
    most = min(len(graphemes), spare)
    count = _largest(lambda k: size_of(_cut(graphemes, k)) <= limit, most)
    return _cut(graphemes, count)


def fit_pair(
    size_of: Callable[[str, str], int], first: str, second: str, limit: int
) -> tuple[str, str] | None:
    """Fit two texts into one payload, cutting ``second`` first and ``first`` only if needed.

    For a message, ``first`` is the sender and ``second`` the preview: the preview is the long,
    expendable one, and the sender is what tells the user whose message it is.

    Returns:
        The fitted ``(first, second)``, or None when the payload cannot fit even with both cut
        down to an ellipsis.
    """
    fitted = fit_text(lambda text: size_of(first, text), second, limit)
    if fitted is not None:
        return first, fitted
    rest = ELLIPSIS if second else ""
    head = fit_text(lambda text: size_of(text, rest), first, limit)
    return None if head is None else (head, rest)


def leading_graphemes(text: str, max_bytes: int, chunk_chars: int = 64) -> list[str]:
    """The grapheme clusters that start ``text``, until they pass ``max_bytes`` of UTF-8.

    Segmenting a whole text at once takes quadratic time on a run of regional indicators
    (``regex`` counts back to the start of the run for every flag): tens of milliseconds per
    device for a 4,000-character preview. Segmenting in chunks that restart at a cluster
    boundary bounds that and gives the same clusters: the rules look back only within a
    cluster, except regional-indicator parity, and a boundary inside a run of regional
    indicators always follows an even number of them.
    """
    found: list[str] = []
    start = used = 0
    size = chunk_chars
    while start < len(text) and used <= max_bytes:
        piece = _GRAPHEME.findall(text[start : start + size])
        if start + size < len(text):
            piece.pop()  # the chunk's last cluster may go on past the chunk
        if not piece:
            size *= 2  # a single cluster longer than the chunk (a base with many marks)
            continue
        joined = "".join(piece)
        found += piece
        start += len(joined)
        used += len(joined.encode())
        size = chunk_chars
    return found


def _cut(graphemes: list[str], count: int) -> str:
    return "".join(graphemes[:count]) + ELLIPSIS


def _largest(fits: Callable[[int], bool], most: int) -> int:
    """The largest ``k`` in ``[0, most]`` with ``fits(k)``, given ``fits(0)`` and monotony."""
    low, high = 0, most
    while low < high:
        mid = (low + high + 1) // 2
        if fits(mid):
            low = mid
        else:
            high = mid - 1
    return low
