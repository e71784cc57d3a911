"""Exceptions to JSON-RPC errors: one table, along the class hierarchy, no internals leaked."""

from __future__ import annotations

import logging
import re
from typing import Any

import pytest
from jsonrpcserver.sentinels import NODATA
from oslash.either import Left
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from rpc_server.domain.errors import (
    AlreadyRegistered,
    Conflict,
    DomainError,
    IdempotencyKeyReused,
    InvalidTransition,
    NotFound,
    PaymentNotVerified,
    Unauthenticated,
)
from rpc_server.domain.states import PurchaseState
from rpc_server.jsonrpc.errors import (
    CONFLICT,
    INTERNAL_ERROR,
    NOT_FOUND,
    PAYMENT_NOT_VERIFIED,
    SERVICE_UNAVAILABLE,
    UNAUTHENTICATED,
    code_for,
    error_result,
)

SECRET = "password=hunter2 at db.internal:5432"


def error_of(exc: Exception) -> Any:
    result = error_result(exc, method="purchase.fulfill")
    assert isinstance(result, Left)
    return result._error


class CourseGone(NotFound):
    message = "Course gone"


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (NotFound("Purchase not found", {"purchase_id": "abc"}), NOT_FOUND),
        (CourseGone(), NOT_FOUND),
        (Conflict(), CONFLICT),
        (InvalidTransition(PurchaseState.CANCELED, PurchaseState.FULFILLED), CONFLICT),
        (IdempotencyKeyReused("k", "python-basics"), CONFLICT),
        (AlreadyRegistered("python-basics"), CONFLICT),
        (Unauthenticated(), UNAUTHENTICATED),
        (PaymentNotVerified("missing", "no proof"), PAYMENT_NOT_VERIFIED),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, Exception) else str(value),
)
def test_domain_errors_map_along_the_class_hierarchy(exc: DomainError, code: int) -> None:
    error = error_of(exc)
    assert error.code == code
    assert code_for(exc) == code
    assert error.message == exc.message
    assert error.data == (exc.data if exc.data is not None else NODATA)


def test_not_found_keeps_message_and_data() -> None:
    error = error_of(NotFound("Purchase not found", {"purchase_id": "abc"}))
    assert (error.code, error.message, error.data) == (
        404,
        "Purchase not found",
        {"purchase_id": "abc"},
    )


def test_invalid_transition_data() -> None:
    error = error_of(InvalidTransition(PurchaseState.FULFILLED, PurchaseState.FAILED))
    assert error.code == 409
    assert error.message == "A fulfilled purchase cannot become failed"
    assert error.data == {"current_state": "fulfilled", "requested_state": "failed"}


def test_error_without_data_has_no_data_member() -> None:
    assert error_of(Unauthenticated()).data is NODATA
    assert "Bearer" in error_of(Unauthenticated()).message


def test_an_unmapped_domain_error_is_internal() -> None:
    assert code_for(DomainError()) is None
    assert error_of(DomainError(SECRET)).code == INTERNAL_ERROR


@pytest.mark.parametrize(
    "exc",
    [
        OperationalError("SELECT 1", {}, Exception(SECRET)),
        InterfaceError("SELECT 1", {}, Exception(SECRET)),
        PoolTimeoutError(SECRET),
        ConnectionRefusedError(SECRET),
        DBAPIError("SELECT 1", {}, Exception(SECRET), connection_invalidated=True),
    ],
    ids=["operational", "interface", "pool-timeout", "connection", "invalidated"],
)
def test_database_unavailable_is_32000_without_its_text(exc: Exception) -> None:
    error = error_of(exc)
    assert error.code == SERVICE_UNAVAILABLE == -32000
    assert error.message == "Service unavailable: try again later"
    assert error.data is NODATA
    assert "hunter2" not in repr(error)


def test_a_dbapi_error_on_a_live_connection_is_internal() -> None:
    error = error_of(DBAPIError("SELECT 1", {}, Exception(SECRET), connection_invalidated=False))
    assert error.code == INTERNAL_ERROR


@pytest.mark.parametrize("exc", [RuntimeError(SECRET), KeyError(SECRET), ValueError(SECRET)])
def test_any_other_exception_is_internal_with_only_an_error_id(
    exc: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="rpc_server.jsonrpc.errors"):
        try:
            raise exc
        except Exception as raised:
            error = error_of(raised)

    assert error.code == INTERNAL_ERROR == -32603
    assert error.message == "Internal error"
    assert list(error.data) == ["error_id"]
    error_id = error.data["error_id"]
    assert re.fullmatch(r"[0-9a-f]{32}", error_id)
    assert "hunter2" not in repr(error)
    # The id leads from the client's answer to the log record that has the traceback.
    [record] = [r for r in caplog.records if error_id in r.getMessage()]
    assert record.levelno == logging.ERROR
    assert "purchase.fulfill" in record.getMessage()
    assert record.exc_info is not None
    assert record.exc_info[1] is exc


def test_error_ids_are_unique() -> None:
    first = error_of(RuntimeError("x")).data["error_id"]
    second = error_of(RuntimeError("x")).data["error_id"]
    assert first != second


@pytest.mark.parametrize("reason", PaymentNotVerified.REASONS)
def test_payment_not_verified_is_402_with_its_reason(reason: str) -> None:
    error = error_of(PaymentNotVerified(reason, "the detail"))
    assert error.code == 402
    assert error.message == "Payment not verified: the detail"
    assert error.data == {"reason": reason}


def test_the_reasons_are_the_documented_six() -> None:
    assert set(PaymentNotVerified.REASONS) == {
        "missing", "invalid_signature", "expired", "mismatch", "reused", "malformed",
    }  # fmt: skip


def test_already_registered_is_409_with_the_course() -> None:
    error = error_of(AlreadyRegistered("python-basics"))
    assert (error.code, error.message, error.data) == (
        409,
        "You are already registered for this course",
        {"course": "python-basics"},
    )
