"""Per-round checkpoints: written under a temporary name, fsynced and renamed, so no torn one is ever read."""

import io
import json
import logging
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hetrain.core import npyfile, store
from hetrain.core.errors import CheckpointError
from hetrain.core.failpoints import failpoint

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: state.json carries a digest of itself ("self_sha256")
MAX_STATE_BYTES = 64 << 20  # state.json: RNG state, lineage and the metrics history
MAX_ARRAYS_BYTES = 4 << 30  # params.npz / optimizer.npz
_ROUND_DIR = re.compile(r"round-(\d{5,})")
_TEMP_GLOBS = (".round-*.tmp-*", ".old-*")


@dataclass(frozen=True)
class Checkpoint:
    """One verified round of training state, as read back from disk."""

    round: int
    params: dict[str, np.ndarray]
    optimizer_state: dict
    rng_state: dict
    lineage: dict
    extra: dict
    path: Path


def _npz_bytes(arrays: dict[str, np.ndarray], what: str) -> bytes:
    for key, arr in arrays.items():
        if arr.dtype == object:
            raise CheckpointError(f"{what} entry '{key}' has dtype object; only numeric, bool or str values can be saved")
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _canonical(state: dict) -> bytes:
    """The bytes `self_sha256` is taken over: the state without that field, in one fixed form."""
    body = {k: v for k, v in state.items() if k != "self_sha256"}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _json_bytes(state: dict) -> bytes:
    try:  # no `default=`: a value JSON cannot hold exactly must fail here, not be stringified
        as_read = json.loads(json.dumps(state))  # digest what a reader will parse (int keys become str)
        sealed = {**as_read, "self_sha256": store.sha256_bytes(_canonical(as_read))}
        return (json.dumps(sealed, indent=2, sort_keys=True) + "\n").encode()
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"state.json for round {state['round']}: rng_state, lineage and extra must be JSON-able: {exc}") from exc


def save_checkpoint(root: Path, round_no: int, *, params: dict[str, np.ndarray], optimizer_state: dict,
                    rng_state: dict, lineage: dict, extra: dict | None = None) -> Path:
    """Atomically write `root/round-NNNNN/` and return its path.

    Files go into a temporary sibling directory, `state.json` (holding the other files' digests) last;
    the directory is then renamed into place. A re-saved round replaces the old one. On any error the
    temporary directory is removed and earlier checkpoints are left untouched.
    """
    if isinstance(round_no, bool) or not isinstance(round_no, int) or round_no < 0:
        raise CheckpointError(f"The 'round_no' parameter of save_checkpoint must be an int >= 0. Got {round_no!r} instead.")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"round-{round_no:05d}"
    final, tmp = root / name, root / f".{name}.tmp-{secrets.token_hex(4)}"
    tmp.mkdir()
    old = None
    try:
        scalars = sorted(k for k, v in optimizer_state.items() if isinstance(v, (bool, int, float)))
        files = {
            "params.npz": _npz_bytes({k: np.asarray(v) for k, v in params.items()}, "params"),
            "optimizer.npz": _npz_bytes({k: np.asarray(v) for k, v in optimizer_state.items()}, "optimizer_state"),
        }
        state = {"format": FORMAT_VERSION, "round": round_no, "rng_state": rng_state, "lineage": lineage,
                 "extra": extra or {}, "optimizer_scalars": scalars,
                 "sha256": {fname: store.sha256_bytes(data) for fname, data in files.items()}}
        files["state.json"] = _json_bytes(state)
        for fname, data in files.items():  # write_bytes fsyncs each file and then the temp dir
            failpoint("checkpoint.tmp_write", tmp / fname)
            store.write_bytes(tmp / fname, data)
        failpoint("checkpoint.before_rename")
        if final.exists():
            old = root / f".old-{name}-{secrets.token_hex(4)}"
            os.rename(final, old)
        os.rename(tmp, final)
        failpoint("checkpoint.after_rename")
        store.fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not final.exists():  # put the replaced round back
            os.rename(old, final)
        raise
    if old is not None:
        shutil.rmtree(old)
    return final


def _check_state(path: Path, state: dict) -> None:
    """state.json holds every field load_checkpoint uses, with the type it needs."""
    fields = {"round": int, "sha256": dict, "rng_state": dict, "lineage": dict, "extra": dict, "optimizer_scalars": list}
    wrong = [k for k, kind in fields.items() if not isinstance(state.get(k), kind) or isinstance(state.get(k), bool)]
    if wrong:
        raise CheckpointError(f"checkpoint {path}: state.json lacks or mistypes {wrong} (needs round: int, sha256, "
                              f"rng_state, lineage, extra: objects, optimizer_scalars: list)")
    if not all(isinstance(k, str) for k in state["optimizer_scalars"]):
        raise CheckpointError(f"checkpoint {path}: state.json optimizer_scalars must list parameter names (strings)")


def _verify(path: Path) -> dict:
    """Return the parsed state.json of `path` after checking its own digest and both file digests;
    raise CheckpointError otherwise."""
    state_file = path / "state.json"
    data = store.read_bounded(state_file, MAX_STATE_BYTES, f"checkpoint {path}: state.json", CheckpointError)
    state = store.parse_json(data, f"checkpoint {path}: {state_file.name}", CheckpointError)
    if state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path}: state.json has format {state.get('format')!r:.40}; this hetrain "
                              f"reads format {FORMAT_VERSION}")
    _check_state(path, state)
    digests, round_no, sealed = state["sha256"], state["round"], state.get("self_sha256")
    actual = store.sha256_bytes(_canonical(state))
    if actual != sealed:
        raise CheckpointError(f"checkpoint {path}: state.json has sha256 {actual} over its content, but records "
                              f"{sealed!r:.80}: it was damaged or edited after it was written")
    for fname in ("params.npz", "optimizer.npz"):
        try:
            actual = store.sha256_file(path / fname)
        except OSError as exc:
            raise CheckpointError(f"checkpoint {path}: {fname} is missing: {exc}") from exc
        if actual != digests.get(fname):
            raise CheckpointError(f"checkpoint {path}: {fname} has sha256 {actual}, state.json expects "
                                  f"{str(digests.get(fname))[:80]}")
    match = _ROUND_DIR.fullmatch(path.name)
    if match is None or int(match.group(1)) != round_no:
        raise CheckpointError(f"checkpoint {path}: state.json says round {round_no}, the directory name disagrees")
    return state


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    return npyfile.read_npz(path, f"checkpoint file {path}", CheckpointError, MAX_ARRAYS_BYTES, kinds="biufU")


def load_checkpoint(path: Path) -> Checkpoint:
    """Read and verify one checkpoint directory; raise CheckpointError naming the bad or missing file."""
    path = Path(path)
    state = _verify(path)
    optimizer_state: dict = _read_npz(path / "optimizer.npz")
    for key in state["optimizer_scalars"]:  # 0-d arrays back to the python int/float/bool they were
        if key not in optimizer_state or optimizer_state[key].ndim != 0:
            raise CheckpointError(f"checkpoint {path}: optimizer scalar {key!r:.80} is not a 0-d array in optimizer.npz")
        optimizer_state[key] = optimizer_state[key].item()
    return Checkpoint(round=state["round"], params=_read_npz(path / "params.npz"), optimizer_state=optimizer_state,
                      rng_state=state["rng_state"], lineage=state["lineage"], extra=state["extra"], path=path)


def latest_checkpoint(root: Path) -> Path | None:
    """Return the highest-round complete checkpoint under `root`, skipping torn ones, or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    rounds = [(int(m.group(1)), p) for p in root.iterdir() if (m := _ROUND_DIR.fullmatch(p.name)) and p.is_dir()]
    for _, path in sorted(rounds, reverse=True):
        try:
            _verify(path)
        except CheckpointError as exc:
            log.warning("skipping torn checkpoint: %s", exc)
            continue
        return path
    return None


def cleanup_temp(root: Path) -> None:
    """Remove temporary directories left by an interrupted save_checkpoint.

    A re-save killed between its two renames leaves the replaced round only under `.old-…`: that
    round is put back in place rather than deleted.
    """
    root = Path(root)
    if not root.is_dir():
        return
    for old in sorted(root.glob(".old-*")):
        match = re.fullmatch(r"\.old-(round-\d{5,})-[0-9a-f]+", old.name)
        if match and not (root / match.group(1)).exists():
            os.rename(old, root / match.group(1))
            store.fsync_dir(root)
    for pattern in _TEMP_GLOBS:
        for leftover in root.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)
