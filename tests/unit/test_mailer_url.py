"""Mailer choice and ``RPC_SERVER_SMTP_URL`` parsing; the retry policy's backoff."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from rpc_server.mail.deliverer import RetryPolicy
from rpc_server.mail.mailer import FileMailer, SmtpMailer, mailer_for


def test_plain_smtp_with_a_port() -> None:
    assert SmtpMailer.from_url("smtp://mail.example:2525") == SmtpMailer(
        hostname="mail.example", port=2525
    )


def test_plain_smtp_defaults_to_port_25_with_opportunistic_starttls() -> None:
    """start_tls None: upgrade when the server offers STARTTLS (aiosmtplib's default)."""
    mailer = SmtpMailer.from_url("smtp://mail.example")
    assert (mailer.port, mailer.use_tls, mailer.start_tls) == (25, False, None)
    assert (mailer.username, mailer.password, mailer.cafile) == (None, None, None)


def test_smtps_is_implicit_tls_on_port_465() -> None:
    mailer = SmtpMailer.from_url("smtps://mail.example")
    assert (mailer.hostname, mailer.port, mailer.use_tls, mailer.start_tls) == (
        "mail.example",
        465,
        True,
        None,
    )
    assert SmtpMailer.from_url("smtps://mail.example:2465").port == 2465


@pytest.mark.parametrize("flag", ["1", "true", "yes", "TRUE"])
def test_starttls_query_flag(flag: str) -> None:
    mailer = SmtpMailer.from_url(f"smtp://mail.example:587?starttls={flag}")
    assert (mailer.port, mailer.start_tls, mailer.use_tls) == (587, True, False)


@pytest.mark.parametrize("flag", ["0", "false", "no", "NO"])
def test_starttls_off_means_plain_text(flag: str) -> None:
    assert SmtpMailer.from_url(f"smtp://mail.example?starttls={flag}").start_tls is False


@pytest.mark.parametrize("flag", ["", "maybe", "2"])
def test_starttls_takes_yes_or_no_only(flag: str) -> None:
    with pytest.raises(ValueError, match=r"\?starttls= takes 1 or 0"):
        SmtpMailer.from_url(f"smtp://mail.example?starttls={flag}&x=1")


@pytest.mark.parametrize("flag", ["0", "1"])
def test_smtps_takes_no_starttls_flag(flag: str) -> None:
    with pytest.raises(ValueError, match="already TLS"):
        SmtpMailer.from_url(f"smtps://mail.example?starttls={flag}")


@pytest.mark.parametrize(
    "url",
    ["smtp://user:secret@mail.example?starttls=0", "smtp://user@mail.example?starttls=no"],
)
def test_credentials_without_tls_are_a_configuration_error(url: str) -> None:
    with pytest.raises(ValueError, match="never sent without TLS") as raised:
        SmtpMailer.from_url(url)
    assert "secret" not in str(raised.value)


def test_credentials_with_opportunistic_or_implicit_tls_are_fine() -> None:
    assert SmtpMailer.from_url("smtp://user:pw@mail.example").start_tls is None
    assert SmtpMailer.from_url("smtps://user:pw@mail.example").use_tls


def test_cafile_names_extra_trusted_certificates(tmp_path: Path) -> None:
    bundle = tmp_path / "private-ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    mailer = SmtpMailer.from_url(f"smtp://mail.example?cafile={bundle}&starttls=1")
    assert (mailer.cafile, mailer.start_tls) == (str(bundle), True)
    with pytest.raises(ValueError, match="cafile= names no file"):
        SmtpMailer.from_url(f"smtp://mail.example?cafile={tmp_path / 'missing.pem'}")


def test_credentials_are_unquoted() -> None:
    mailer = SmtpMailer.from_url("smtp://user:p%40ss@mail.example:587?starttls=1")
    assert (mailer.username, mailer.password) == ("user", "p@ss")
    assert (mailer.hostname, mailer.port, mailer.start_tls) == ("mail.example", 587, True)
    encoded_user = SmtpMailer.from_url("smtp://shop%40example.com:s%3Acret%2F@h")
    assert (encoded_user.username, encoded_user.password) == ("shop@example.com", "s:cret/")


@pytest.mark.parametrize(
    "url",
    ["http://mail.example", "mail.example:25", "smtp://", "smtp:///nohost", "lmtp://h:24", ""],
)
def test_bad_url_is_a_value_error(url: str) -> None:
    with pytest.raises(ValueError, match="RPC_SERVER_SMTP_URL"):
        SmtpMailer.from_url(url)


def test_mailer_for_picks_smtp_when_a_url_is_set_else_files(tmp_path: Path) -> None:
    assert mailer_for("smtp://h:2525", str(tmp_path)) == SmtpMailer(hostname="h", port=2525)
    assert mailer_for(None, str(tmp_path)) == FileMailer(tmp_path)
    assert mailer_for("", str(tmp_path)) == FileMailer(tmp_path)


# --- backoff ----------------------------------------------------------------------------


def test_delay_grows_exponentially_up_to_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    # Without jitter (the top of the range), the delays are base * 2**(n-1), capped.
    monkeypatch.setattr(random, "uniform", lambda low, high: high)
    policy = RetryPolicy(max_attempts=20, base_seconds=30.0, cap_seconds=3600.0)
    delays = [policy.delay_after(attempts) for attempts in range(1, 11)]
    assert delays == [30.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 3600.0, 3600.0, 3600.0]
    assert policy.delay_after(0) == 30.0


def test_jitter_stays_within_half_to_full_delay() -> None:
    policy = RetryPolicy(base_seconds=10.0, cap_seconds=100.0)
    for attempts, full in ((1, 10.0), (2, 20.0), (3, 40.0), (4, 80.0), (5, 100.0), (9, 100.0)):
        samples = [policy.delay_after(attempts) for _ in range(300)]
        assert all(full / 2 <= delay <= full for delay in samples), (attempts, full)
        assert len(set(samples)) > 1, "jittered"


def test_defaults() -> None:
    assert RetryPolicy() == RetryPolicy(max_attempts=8, base_seconds=30.0, cap_seconds=3600.0)


def test_delay_is_capped_for_any_attempt_count() -> None:
    """Nothing bounds RPC_SERVER_MAIL_MAX_ATTEMPTS: a huge attempt count must give the
    cap, not an OverflowError from ``base * 2 ** (attempts - 1)`` turned into a float
    (which, raised in ``_deliver``, would leave the row unsettled).
    """
    policy = RetryPolicy(max_attempts=5000, base_seconds=30.0, cap_seconds=3600.0)
    assert 1800.0 <= policy.delay_after(1100) <= 3600.0
