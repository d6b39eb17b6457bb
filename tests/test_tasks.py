"""Retry policy of the trainer's key-holder call: transient I/O faults only, never a refusal."""

import pytest

from hetrain.mpc_ops.reveal.revealer import call_key_holder
from hetrain.core.errors import PolicyRefusal


class FlakyHolder:
    """Fails with the given exceptions in turn, then answers."""

    def __init__(self, *failures):
        self.failures, self.calls = list(failures), 0

    def reveal(self, request):
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return f"revealed {request}"


def test_transient_faults_are_retried_until_the_key_holder_answers():
    # Prepare
    holder = FlakyHolder(ConnectionError("reset"), OSError(28, "No space left on device"))
    # Execute
    result = call_key_holder(holder, "req", delays=(0, 0, 0))
    # Assert
    assert result == "revealed req" and holder.calls == 3


def test_a_policy_refusal_is_never_retried():
    # Prepare
    holder = FlakyHolder(PolicyRefusal("min_batch", "only 8 samples"))
    # Execute / Assert
    with pytest.raises(PolicyRefusal, match="min_batch"):
        call_key_holder(holder, "req", delays=(0, 0, 0))
    assert holder.calls == 1


def test_retries_stop_after_the_last_delay_with_the_original_error():
    # Prepare
    holder = FlakyHolder(*[TimeoutError("slow")] * 4)
    # Execute / Assert
    with pytest.raises(TimeoutError, match="slow"):
        call_key_holder(holder, "req", delays=(0, 0, 0))
    assert holder.calls == 4
