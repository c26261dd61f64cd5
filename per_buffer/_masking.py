"""Masking secrets in text meant for people: error messages, logs, stored failure reasons.

A server, proxy or WAF may echo a request's ``Authorization`` header back in any part of
its answer (a reason phrase, a header, a body), and the code that quotes the answer may
cut it short or lower-case it. :func:`mask` therefore hides a secret in any letter case,
and also every run of :data:`FRAGMENT` or more characters that is a piece of it (a cut
prefix, suffix or middle). It is meant for error paths: its cost grows with the length of
the text times the length of the secret.

:func:`without_userinfo` hides the ``user:password@`` part of a URL.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Final

__all__ = ["FRAGMENT", "MASK", "mask", "without_userinfo"]

#: The shortest piece of a secret that is masked on its own (a shorter secret is masked whole).
FRAGMENT: Final = 8
#: What a masked secret (or piece of one) becomes.
MASK: Final = "<token>"

# Lower-cases ASCII letters only: the text keeps its length, so positions carry over.
_ASCII_LOWER: Final = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


@functools.lru_cache(maxsize=8)
def _pieces(secret: str, fragments: bool) -> frozenset[str]:
    """Every run of ``FRAGMENT`` characters of ``secret`` (lower-cased), or the whole of it.

    Cached for the few secrets in use (in memory only): building them costs more than
    looking for them in a short text.
    """
    lowered = secret.translate(_ASCII_LOWER)
    size = min(len(lowered), FRAGMENT) if fragments else len(lowered)
    return frozenset(lowered[start : start + size] for start in range(len(lowered) - size + 1))


def _spans(lowered: str, secrets: Iterable[str], fragments: bool) -> list[tuple[int, int]]:
    """The merged ``[start, end)`` ranges of ``lowered`` covered by pieces of the secrets."""
    found: list[tuple[int, int]] = []
    for secret in secrets:
        if not secret:
            continue
        for piece in _pieces(secret, fragments):
            at = lowered.find(piece)
            while at >= 0:
                found.append((at, at + len(piece)))
                at = lowered.find(piece, at + 1)
    if not found:
        return found
    found.sort()
    merged = [found[0]]
    for start, end in found[1:]:
        last_start, last_end = merged[-1]
        if start <= last_end:  # overlapping or touching pieces are one masked run
            merged[-1] = (last_start, max(last_end, end))
        else:
            merged.append((start, end))
    return merged


def mask(
    text: str, secrets: Iterable[str], placeholder: str = MASK, *, fragments: bool = True
) -> str:
    """``text`` with every echo of the ``secrets`` replaced by ``placeholder``.

    An echo is the secret in any (ASCII) letter case, or (with ``fragments``) any run of
    at least :data:`FRAGMENT` characters of it; a secret shorter than that is masked
    whole. Overlapping or adjacent echoes become one placeholder. Empty secrets are
    ignored.

    Pieces can match ordinary words: a token holding ``activity`` masks that word too.
    Pass ``fragments=False`` for text that cannot hold a cut echo (a value quoted whole)
    and must stay readable.
    """
    if not text:
        return text
    spans = _spans(text.translate(_ASCII_LOWER), secrets, fragments)
    if not spans:
        return text
    parts: list[str] = []
    position = 0
    for start, end in spans:
        parts.append(text[position:start])
        parts.append(placeholder)
        position = end
    parts.append(text[position:])
    return "".join(parts)


def without_userinfo(url: str) -> str:
    """``url`` with its user information (``user:password@``) replaced by ``***@``.

    The user information runs from after ``scheme://`` (or from the start, without a
    scheme) to the *last* ``@``: a password may hold ``@``, ``/`` or ``:`` that was not
    percent-encoded, and a URL that cannot be parsed must not show it either. A URL
    with an ``@`` elsewhere (in a path or query) loses more than its user information,
    which only makes a message shorter.
    """
    scheme_end = url.find("://")
    start = 0 if scheme_end < 0 else scheme_end + 3
    at = url.rfind("@")
    if at < start:
        return url
    return f"{url[:start]}***{url[at:]}"
