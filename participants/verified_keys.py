"""The key holder's side of the verified reveal, without the CKKS secret key: the MAC key it shares with the
owners, the seed of the ciphertext layer's weights, the owners' tags and the once-per-output ledger.

Its files live in RUN_DIR/key_holder/ (mode 0600), beside the secret key; the trainer never reads them.
"""

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np

from hetrain.core import store
from hetrain.core.errors import BundleError, PolicyRefusal
from hetrain.mpc_ops.reveal import verified

MAC_KEY_FILE = "mac_key.npy"
WEIGHT_SEED_FILE = "weight_seed.bin"
TAGS_DIR = "tags"
LEDGER_FILE = "verified_ledger.json"
MAX_TAG_ENTRIES = 1 << 20


class VerifiedKeys:
    """MAC key, weight seed, owners' tags and the verified-reveal ledger of one key."""

    def __init__(self, directory: Path, primes: list[int], n: int):
        self.directory, self.primes, self.n = Path(directory), list(primes), n
        self.mac_key = self._mac_key()
        self._seed = self._weight_seed()
        self._tags = self._read_tags()
        path = self.directory / LEDGER_FILE
        self._revealed = set(json.loads(path.read_text())) if path.exists() else set()

    # ---- secrets, made once per key ----------------------------------------------------------
    def _mac_key(self) -> np.ndarray:
        path = self.directory / MAC_KEY_FILE
        if path.exists():
            key = np.load(path, allow_pickle=False)
            if key.shape != (len(self.primes), 2 * self.n) or key.dtype != np.uint64:
                raise BundleError(f"{path}: a MAC key of shape {key.shape}; this key needs ({len(self.primes)}, {2 * self.n})")
            return key
        rows = []
        for q in self.primes:  # uniform mod q from the CSPRNG (rejection-free: 128 random bits reduced)
            raw = np.frombuffer(os.urandom(16 * 2 * self.n), dtype=np.uint64).reshape(-1, 2)
            rows.append(np.array([((int(hi) << 64) | int(lo)) % q for hi, lo in raw], dtype=np.uint64))
        key = np.stack(rows)
        buf = io.BytesIO()
        np.save(buf, key, allow_pickle=False)
        store.write_bytes(path, buf.getvalue(), mode=0o600)
        return key

    def _weight_seed(self) -> bytes:
        path = self.directory / WEIGHT_SEED_FILE
        if not path.exists():
            store.write_bytes(path, os.urandom(32), mode=0o600)
        return path.read_bytes()

    def weights(self, layer: str, d: int, h: int) -> np.ndarray:
        """The layer's weights (d × h): drawn from this key's seed and the layer's name, never trained."""
        return verified.draw_weights(hashlib.sha256(self._seed + layer.encode()).digest(), d, h)

    # ---- the owners' tags ----------------------------------------------------------------------
    def _read_tags(self) -> dict:
        tags: dict = {}
        for path in sorted((self.directory / TAGS_DIR).glob("*.json")) if (self.directory / TAGS_DIR).is_dir() else []:
            _merge(tags, json.loads(path.read_text()), path.stem)
        return tags

    def register(self, owner: str, entries: dict) -> int:
        """An owner's tags ({chunk: {"n", "features": {j: tag}, "masks": {layer: {k: tag}}}}); returns the count.

        Only owners call this (never the trainer, which must not see a tag). A chunk's sample count and
        each tag are fixed once registered: an owner re-registering the same chunk must repeat them.
        """
        if not isinstance(entries, dict) or not owner.isidentifier():
            raise BundleError(f"tags of owner {owner!r:.40}: expected a mapping of chunks")
        merged = json.loads(json.dumps(self._tags))
        count = _merge(merged, entries, owner)
        path = self.directory / TAGS_DIR / f"{owner}.json"
        mine = json.loads(path.read_text()) if path.exists() else {}
        _merge(mine, entries, owner)
        store.write_json(path, mine, mode=0o600)
        self._tags = merged
        return count

    def chunk(self, chunk: str) -> dict:
        entry = self._tags.get(chunk)
        if entry is None:
            raise PolicyRefusal("unverified", f"chunk '{chunk}' has no tags from the owners; nothing was decrypted")
        return entry

    # ---- the check ---------------------------------------------------------------------------------
    def check(self, request: "verified.VerifiedRevealRequest", weights: np.ndarray, scale: float,
              coeffs: np.ndarray) -> int:
        """Refuse unless `coeffs` is Σ_j m_jk·ct_j + M_k for the chunk's tagged ciphertexts; return the chunk's n."""
        entry, d = self.chunk(request.chunk), weights.shape[0]
        features = entry["features"]
        if set(features) != {str(j) for j in range(d)}:
            raise PolicyRefusal("unverified", f"chunk '{request.chunk}' has tags for {len(features)} of the {d} "
                                              f"input features; nothing was decrypted")
        mask = entry["masks"].get(request.layer, {}).get(str(request.output))
        if mask is None:
            raise PolicyRefusal("unverified", f"chunk '{request.chunk}' has no tagged mask for output "
                                              f"{request.output} of layer '{request.layer}'; nothing was decrypted")
        mults = verified.multipliers(weights, request.output, scale, self.primes)
        expected = verified.expected_tag([features[str(j)] for j in range(d)], mask, mults, self.primes)
        verified.check_tag(coeffs, self.mac_key, expected, self.primes,
                           f"layer '{request.layer}', chunk '{request.chunk}', output {request.output}")
        return int(entry["n"])

    def once(self, request: "verified.VerifiedRevealRequest") -> None:
        """Each (layer, chunk, output) is revealed once per key: a second reveal could average out the flooding."""
        key = f"{request.layer}/{request.chunk}/{request.output}"
        if key in self._revealed:
            raise PolicyRefusal("already_revealed", f"output {request.output} of layer '{request.layer}' for chunk "
                                                    f"'{request.chunk}' was already revealed under this key; each "
                                                    f"is revealed once")
        self._revealed.add(key)
        store.write_json(self.directory / LEDGER_FILE, sorted(self._revealed), mode=0o600)

    def summary(self) -> dict:
        return {"chunks_tagged": len(self._tags), "outputs_revealed": len(self._revealed)}


def _merge(into: dict, entries: dict, owner: str) -> int:
    """Fold one owner's tag entries into `into`; a changed tag or sample count is refused."""
    count = 0
    for chunk, entry in entries.items():
        if not isinstance(chunk, str) or len(chunk) > verified.MAX_CHUNK_ID or not isinstance(entry, dict):
            raise BundleError(f"tags of owner '{owner}': bad chunk entry {chunk!r:.60}")
        target = into.setdefault(chunk, {"n": entry.get("n"), "features": {}, "masks": {}})
        if target["n"] != entry.get("n") or not isinstance(entry.get("n"), int):
            raise BundleError(f"tags of owner '{owner}': chunk '{chunk}' has {entry.get('n')!r} samples, "
                              f"another owner registered {target['n']!r}")
        for j, tag in (entry.get("features") or {}).items():
            count += _put(target["features"], str(j), tag, owner, chunk)
        for layer, outputs in (entry.get("masks") or {}).items():
            for k, tag in outputs.items():
                count += _put(target["masks"].setdefault(layer, {}), str(k), tag, owner, chunk)
        if count > MAX_TAG_ENTRIES:
            raise BundleError(f"tags of owner '{owner}': more than {MAX_TAG_ENTRIES} entries")
    return count


def _put(table: dict, key: str, tag, owner: str, chunk: str) -> int:
    if not (isinstance(tag, list) and all(isinstance(t, int) and t >= 0 for t in tag)):
        raise BundleError(f"tags of owner '{owner}': chunk '{chunk}' entry {key}: a tag is a list of ints per prime")
    if key in table and table[key] != tag:
        raise BundleError(f"tags of owner '{owner}': chunk '{chunk}' entry {key} was registered with another tag; "
                          f"tags are fixed once registered")
    table[key] = tag
    return 1
