"""Prefect tasks: the Trainer's coarse steps as task runs, with retries on I/O and key-holder calls only.

The Trainer (hetrain.trainer) names each step; hetrain.train_flow's PrefectRunner runs it through the
task of that name. Batches go in groups (trainer.BATCHES_PER_TASK), so task runs stay coarse. The
reveal itself is no task: its transient-fault retry lives in hetrain.mpc_ops.reveal.revealer.
"""

from prefect import task
from prefect.cache_policies import NO_CACHE

from hetrain.core.errors import HetrainError


def transient_only(task, task_run, state) -> bool:
    """Retry I/O and connection faults; never a policy refusal, a bad input or a math error."""
    try:
        state.result()
    except HetrainError:
        return False
    except (OSError, ConnectionError, TimeoutError):
        return True
    except Exception:
        return False
    return False


def _call(fn, *args):
    """A step: the Trainer's bound method (or an engine's) and its arguments."""
    return fn(*args)


def _task(name: str, retried: bool):
    retry = {"retries": 2, "retry_delay_seconds": 1, "retry_condition_fn": transient_only} if retried else {}
    return task(_call, name=name, cache_policy=NO_CACHE, **retry)


# step name → its task; True: the step does I/O (files, the key holder) and is retried on transient faults
STEPS = {name: _task(name, retried) for name, retried in (
    ("set-up-key-holder", True),     # create or load the key, publish the public context
    ("encrypt-owner-table", True),   # validate, standardise and encrypt one in-process owner's table
    ("restore-state", True),         # load the newest checkpoint (resume) or a warm start's parent
    ("train-batch-group", False),    # forward, reveal, backward, reveal, step on a group of batches
    ("evaluate", False),             # the test set under the policy
    ("run-plaintext-twin", False),   # the same round on the owners' plaintext (diagnostic)
    ("write-checkpoint", True),      # atomically write weights, optimizer state, lineage and history
)}
COMPUTE_STEPS = ("train-batch-group", "evaluate")  # with train.compute: dask they run in the round flow
