"""What has been revealed about each sample, across rounds and keys: the key holder's memory.

A layer with h outputs reveals h linear combinations of a sample's d features per set of
weights. The trainer knows the weights, so after reveals under k distinct weight matrices it
holds up to k·h combinations: at k·h >= d it can solve for the features. The ledger records,
per layer and per sample pseudonym, the distinct weight digests its activations were revealed
under, and refuses a reveal that would lift any sample's rank bound k·h above the layer's
limit. It also counts each sample's gradient releases, for the DP accounting.

The ledger outlives key rotation: a new key does not make old reveals forgotten.
"""

import json
import re
from pathlib import Path

from hetrain.mpc_ops.reveal import dp
from hetrain.core import store
from hetrain.core.config import PolicyConfig
from hetrain.core.errors import BundleError, PolicyRefusal
from hetrain.core.shapes import LinearShape
from hetrain.mpc_ops.reveal.policy import rank_limit
from hetrain.mpc_ops.reveal.protocol import RevealRequest

LEDGER_FILE = "reveal_ledger.json"
_DIGEST = re.compile(r"^[0-9a-f]{64}$")
_ROW = re.compile(r"^[0-9a-f]{8,64}$")
MAX_ROWS = 1 << 16


class RevealLedger:
    def __init__(self, path: Path, policy: PolicyConfig, shapes: dict[str, LinearShape]):
        self.path, self.policy, self.shapes = Path(path), policy, shapes
        data = json.loads(self.path.read_text()) if self.path.exists() else {}
        if not isinstance(data, dict):
            raise BundleError(f"{self.path}: the reveal ledger must be a JSON object")
        self.weights: dict[str, dict[str, list[str]]] = data.get("weights", {})
        self.gradients: dict[str, dict[str, int]] = data.get("gradients", {})

    # ---- checks, before any decryption -------------------------------------------------
    def check(self, request: RevealRequest) -> None:
        """Raise PolicyRefusal if the request is not tied to its rows or would exceed a rank limit."""
        rows = request.rows
        if not isinstance(request.weights, str) or len(request.weights) > 64:
            raise BundleError("reveal request: 'weights' must be a string of at most 64 hex digits")
        if not isinstance(rows, list) or len(rows) > MAX_ROWS \
                or not all(isinstance(r, str) and _ROW.match(r) for r in rows):
            raise BundleError(f"reveal request: 'rows' must be a list of at most {MAX_ROWS} hex sample "
                              f"pseudonyms (8-64 characters)")
        if len(set(rows)) != len(rows):
            raise BundleError(f"reveal request: 'rows' names {len(rows) - len(set(rows))} sample(s) twice")
        if request.kind in ("gradient", "metric"):
            if len(rows) != request.aggregate:
                raise PolicyRefusal("undeclared_rows", f"layer '{request.layer}': a gradient over "
                                    f"{request.aggregate} samples must name those {request.aggregate} rows; "
                                    f"it names {len(rows)}")
            return
        shape = self.shapes[request.layer]
        if len(rows) * shape.out_features != sum(request.counts):
            raise PolicyRefusal("undeclared_rows", f"layer '{request.layer}': the request reveals "
                                f"{sum(request.counts)} values, which is not {len(rows)} named rows × "
                                f"{shape.out_features} outputs")
        if not _DIGEST.match(request.weights or ""):
            raise PolicyRefusal("undeclared_weights", f"layer '{request.layer}': an activation reveal must "
                                f"carry the SHA-256 of the weights it was computed under")
        limit = rank_limit(self.policy.reveals[request.layer], shape)
        if limit is None:
            return
        seen = self.weights.get(request.layer, {})
        digest = request.weights[:16]
        worst = max((len(seen.get(r, [])) for r in rows if digest not in seen.get(r, [])), default=None)
        if worst is not None and (worst + 1) * shape.out_features > limit:
            raise PolicyRefusal(
                "rank_limit",
                f"layer '{request.layer}': a sample in this batch was already revealed under {worst} "
                f"distinct weights; one more would give the trainer {(worst + 1) * shape.out_features} "
                f"combinations of its {shape.in_features} features, over the limit of {limit} "
                f"(policy.reveals.{request.layer}.max_rank); freeze the layer's weights or reveal less",
            )

    # ---- recording, once the reveal is allowed ------------------------------------------
    def record(self, request: RevealRequest) -> None:
        if request.kind in ("gradient", "metric"):
            counts = self.gradients.setdefault(request.layer, {})
            for r in request.rows:
                counts[r] = counts.get(r, 0) + 1
        else:
            seen = self.weights.setdefault(request.layer, {})
            digest = request.weights[:16]
            for r in request.rows:
                if digest not in seen.setdefault(r, []):
                    seen[r].append(digest)
        store.write_json(self.path, {"weights": self.weights, "gradients": self.gradients}, mode=0o600)

    # ---- public summaries ---------------------------------------------------------------
    def summary(self) -> dict:
        """Per layer: the largest rank bound any sample reached, and the DP ε spent (if DP is on)."""
        out = {}
        for layer, shape in self.shapes.items():
            seen = self.weights.get(layer, {})
            k = max((len(v) for v in seen.values()), default=0)
            releases = max(self.gradients.get(layer, {}).values(), default=0)
            out[layer] = {
                "max_distinct_weights": k, "max_rank_bound": min(k * shape.out_features, shape.in_features),
                "in_features": shape.in_features,
                "rank_limit": rank_limit(self.policy.reveals[layer], shape) if layer in self.policy.reveals else None,
                "max_gradient_releases": releases,
                "dp_epsilon": round(dp.epsilon(self.policy.dp, releases), 4) if self.policy.dp else None,
                "dp_delta": self.policy.dp.delta if self.policy.dp else None,
            }
        return out
