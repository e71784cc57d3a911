"""The operator's command-line values, parsed and checked before any command runs.

``cli.build_parser`` uses these as argparse ``type=`` functions: a value they refuse is
reported by argparse as one line naming the flag (``cli.OneLineParser``), and nothing
touches the database.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from datetime import timedelta

from email_validator import EmailNotValidError, validate_email

# The longest lifetime a token may be given (and RPC_SERVER_TOKEN_TTL may say): 100 years,
# far inside what a date can hold (an --expires-in of 1e9 days would overflow it).
MAX_TOKEN_DAYS = 36500


@dataclass(frozen=True)
class TokenLifetime:
    """How long a new token works: ``days``, or None for a token that never expires."""

    days: float | None

    def as_timedelta(self) -> timedelta | None:
        return None if self.days is None else timedelta(days=self.days)


def token_lifetime(raw: str) -> TokenLifetime:
    """``--expires-in``: a number of days (0 < DAYS <= 36500), or ``never``."""
    if raw.strip().lower() == "never":
        return TokenLifetime(None)
    try:
        days = float(raw)
    except ValueError:
        days = math.nan
    if not (math.isfinite(days) and 0 < days <= MAX_TOKEN_DAYS):
        raise argparse.ArgumentTypeError(
            f"expected a number of days between 0 and {MAX_TOKEN_DAYS}, or never; got {raw!r}"
        )
    return TokenLifetime(days)


def email_address(raw: str) -> str:
    """An email address as given, once ``email-validator`` accepts its syntax.

    No DNS lookup (``check_deliverability=False``): the CLI may run where DNS does not.
    The address is kept as typed, not normalized, so that it still finds the user an
    earlier ``create-token`` made with the same spelling.
    """
    try:
        validate_email(raw, check_deliverability=False)
    except EmailNotValidError as exc:
        raise argparse.ArgumentTypeError(f"{raw!r} is not an email address: {exc}") from None
    return raw


def _bounded_int(raw: str, low: int, high: int, what: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"expected {what} from {low} to {high}; got {raw!r}")
    return value


def positive_int(raw: str) -> int:
    """A count such as ``mail-status --limit``."""
    return _bounded_int(raw, 1, 1_000_000, "a whole number")


def outbox_id(raw: str) -> int:
    """A receipt's id, as ``mail-status`` shows it (a 64-bit database key)."""
    return _bounded_int(raw, 1, 2**63 - 1, "a message id")


def listen_port(raw: str) -> int:
    return _bounded_int(raw, 1, 65535, "a port")


def worker_count(raw: str) -> int:
    """``serve --workers``: as RPC_SERVER_WORKERS allows."""
    return _bounded_int(raw, 1, 64, "a number of worker processes")
