"""Which failures the stream retries: judged by type and by what they were raised from, and a
verdict reached in one process kept when the failure is sent to another."""

from __future__ import annotations

import pickle

from kafka.errors import KafkaTimeoutError, TopicAuthorizationFailedError
from sqlalchemy.exc import OperationalError

from lakehouse.errors import LakehouseError
from streaming.failures import JudgedFailure, passes_later


def _raised_from(error: BaseException, cause: BaseException) -> BaseException:
    try:
        raise error from cause
    except BaseException as raised:
        return raised


def test_a_lakehouse_error_caused_by_a_locked_catalog_may_pass_but_bad_rows_never_do():
    locked = OperationalError("COMMIT", {}, Exception("database is locked"))
    assert passes_later(_raised_from(LakehouseError("the commit kept conflicting"), locked))
    assert not passes_later(LakehouseError("events: 3 row(s) have no 'event_id', the idempotency key"))
    assert not passes_later(TypeError("unexpected keyword argument"))


def test_timeouts_and_retriable_broker_errors_may_pass():
    assert passes_later(TimeoutError("no answer"))
    assert passes_later(ConnectionRefusedError("refused"))
    assert passes_later(KafkaTimeoutError("broker away"))
    assert not passes_later(TopicAuthorizationFailedError("not allowed"))


def test_a_verdict_survives_pickling_as_the_cause_chain_does_not():
    locked = _raised_from(LakehouseError("the commit kept conflicting"), OperationalError("COMMIT", {}, Exception("locked")))
    judged = pickle.loads(pickle.dumps(JudgedFailure(f"LakehouseError: {locked}", passes_later(locked))))
    assert passes_later(judged) and str(judged) == "LakehouseError: the commit kept conflicting"
    assert not passes_later(pickle.loads(pickle.dumps(locked)))  # what a process on the other side would see
    assert not passes_later(pickle.loads(pickle.dumps(JudgedFailure("ValueError: bad rows", False))))
