"""The trainer's explicit reveal: blind a ciphertext tensor, ask the key holder, unblind.

One `Revealer` per run: it holds the key-holder client, the public context, the key id, the mask
bound, the round number every request is audited under, and the traffic it caused. Both engines
(hybrid and tiled) reveal through it. No Prefect in here: retries of the key-holder call are the
transient-fault loop below, so a reveal costs no task run.
"""

import logging
import time

import numpy as np
import tenseal as ts

from hetrain.core.errors import HetrainError
from hetrain.core.failpoints import failpoint
from hetrain.mpc_ops.crypto.tensors import EncryptedTensor
from hetrain.mpc_ops.reveal.protocol import KeyHolderClient, RevealRequest, RevealResponse, blind, unblind

KEY_HOLDER_RETRY_DELAYS = (1.0, 2.0, 4.0)


def call_key_holder(client: KeyHolderClient, request: RevealRequest,
                    delays=KEY_HOLDER_RETRY_DELAYS, method: str = "reveal") -> RevealResponse:
    """One blinded reveal, retried on transient I/O faults only, never on a refusal or bad input.

    Not a task of its own: a round makes two reveals per batch, and as task runs they cost
    about 8% of a digits round (measured by `hetrain bench`), far over the 5% budget.
    """
    for delay in (*delays, None):
        try:
            return getattr(client, method)(request)
        except HetrainError:
            raise
        except (OSError, ConnectionError, TimeoutError) as exc:
            if delay is None:
                raise
            logging.getLogger("hetrain").warning("key holder call failed (%s); retrying in %.0f s", exc, delay)
            time.sleep(delay)


class Revealer:
    """Blind → key holder → unblind, counting bytes each way and reveals of the current round."""

    def __init__(self, client: KeyHolderClient, context: ts.Context, key_id: str, mask_bound: float,
                 round_no: int = 0, delays=KEY_HOLDER_RETRY_DELAYS):
        self.client, self.context, self.key_id, self.mask_bound = client, context, key_id, mask_bound
        self.delays = delays
        self.start_round(round_no)

    def start_round(self, round_no: int) -> None:
        """Audit the following requests under `round_no`, and count its traffic from zero."""
        self.round_no = round_no
        self.to_key_holder = self.from_key_holder = self.reveals = 0

    def reveal(self, enc: EncryptedTensor) -> np.ndarray:
        request, masks = blind(enc, self.context, key_id=self.key_id, round_no=self.round_no,
                               mask_bound=self.mask_bound)
        response = call_key_holder(self.client, request, self.delays)
        failpoint("round.after_reveal")
        self.to_key_holder += request.n_bytes
        self.from_key_holder += sum(v.nbytes for v in response.values)
        self.reveals += 1
        return unblind(enc, response, masks)

    __call__ = reveal

    def reveal_verified(self, request, masks: np.ndarray) -> np.ndarray:
        """A verified reveal (its mask is owner-made and already inside the ciphertext): ask, subtract the mask."""
        response = call_key_holder(self.client, request, self.delays, method="reveal_verified")
        failpoint("round.after_reveal")
        self.to_key_holder += request.n_bytes
        self.from_key_holder += sum(v.nbytes for v in response.values)
        self.reveals += 1
        return response.values[0] - masks

    def traffic(self) -> dict:
        """This round's key-holder traffic, as the metrics row names it."""
        return {"bytes_to_key_holder": self.to_key_holder, "bytes_from_key_holder": self.from_key_holder,
                "reveals": self.reveals}
