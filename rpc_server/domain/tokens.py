"""API tokens: random, shown once, stored only as a SHA-256 hash.

A token carries 256 random bits, so a plain (unsalted) SHA-256 is enough to make the
stored hash useless to an attacker while keeping lookup a single indexed equality.
"""

from __future__ import annotations

import hashlib
import secrets

TOKEN_PREFIX = "rpcs_"


def new_token() -> str:
    """Return a new token; the prefix lets secret scanners recognise leaked tokens."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
