"""Checkpoints: exact roundtrip, atomic writes, torn directories never read."""

import errno
import io
import json
import zipfile

import numpy as np
import pytest

from hetrain import checkpoint as ckpt
from hetrain.checkpoint import cleanup_temp, latest_checkpoint, load_checkpoint, save_checkpoint
from hetrain.core import store
from hetrain.core.errors import CheckpointError


def _state(seed: int = 0):
    rng = np.random.default_rng(seed)
    params = {"enc1.w": rng.standard_normal((3, 4)), "enc1.b": rng.standard_normal(4).astype(np.float32)}
    optimizer = {"lr": 0.01, "t": 7, "nesterov": False, "m.enc1.w": rng.standard_normal((3, 4))}
    return dict(params=params, optimizer_state=optimizer, rng_state=rng.bit_generator.state,
                lineage={"run_id": "r1", "parent_round": seed}, extra={"val_acc": 0.5 + seed / 100})


def test_roundtrip_is_bit_identical_and_restores_scalar_types_and_rng(tmp_path):
    # Prepare
    state = _state()
    params_before = {k: v.copy() for k, v in state["params"].items()}
    rng = np.random.default_rng(123)
    rng.standard_normal(5)  # advance so the state is not the seed's
    state["rng_state"] = rng.bit_generator.state

    # Execute
    path = save_checkpoint(tmp_path, 3, **state)
    loaded = load_checkpoint(path)

    # Assert
    assert path == tmp_path / "round-00003" and loaded.round == 3 and loaded.path == path
    for key, arr in state["params"].items():
        assert loaded.params[key].dtype == arr.dtype and loaded.params[key].tobytes() == arr.tobytes()
        assert np.array_equal(arr, params_before[key])  # inputs left unchanged
    assert type(loaded.optimizer_state["lr"]) is float and loaded.optimizer_state["lr"] == 0.01
    assert type(loaded.optimizer_state["t"]) is int and loaded.optimizer_state["t"] == 7
    assert type(loaded.optimizer_state["nesterov"]) is bool
    assert loaded.optimizer_state["m.enc1.w"].tobytes() == state["optimizer_state"]["m.enc1.w"].tobytes()
    assert loaded.lineage == state["lineage"] and loaded.extra == state["extra"]
    restored = np.random.default_rng()
    restored.bit_generator.state = loaded.rng_state
    assert restored.standard_normal(4).tobytes() == rng.standard_normal(4).tobytes()


def test_latest_picks_the_highest_complete_round(tmp_path):
    # Prepare
    for round_no in (1, 10, 2):
        save_checkpoint(tmp_path, round_no, **_state(round_no))

    # Execute / Assert
    assert latest_checkpoint(tmp_path) == tmp_path / "round-00010"
    assert latest_checkpoint(tmp_path / "absent") is None


def test_leftover_temp_dir_is_skipped_and_cleaned_up(tmp_path):
    # Prepare: a later round killed mid-write, under its temp name
    save_checkpoint(tmp_path, 1, **_state(1))
    torn = tmp_path / ".round-00002.tmp-dead"
    torn.mkdir()
    (torn / "params.npz").write_bytes(b"half")

    # Execute
    latest = latest_checkpoint(tmp_path)
    cleanup_temp(tmp_path)

    # Assert
    assert latest == tmp_path / "round-00001"
    assert not torn.exists() and (tmp_path / "round-00001").is_dir()
    with pytest.raises(CheckpointError, match="state.json"):
        load_checkpoint(torn)


@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_damaged_params_file_is_skipped_by_latest_and_rejected_by_load(tmp_path, damage):
    # Prepare
    save_checkpoint(tmp_path, 1, **_state(1))
    bad = save_checkpoint(tmp_path, 2, **_state(2))
    if damage == "corrupt":
        (bad / "params.npz").write_bytes(b"\x00" * 64)
    else:
        (bad / "params.npz").unlink()

    # Execute / Assert
    assert latest_checkpoint(tmp_path) == tmp_path / "round-00001"
    with pytest.raises(CheckpointError, match=r"round-00002: params\.npz"):
        load_checkpoint(bad)


@pytest.mark.parametrize("target", ["savez", "write_bytes"])
def test_disk_full_mid_write_leaves_previous_checkpoint_intact(tmp_path, monkeypatch, target):
    # Prepare
    first = save_checkpoint(tmp_path, 1, **_state(1))
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    calls = []

    def fail_on_second_call(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    real = np.savez if target == "savez" else store.write_bytes
    monkeypatch.setattr(np if target == "savez" else store, target, fail_on_second_call)

    # Execute
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(tmp_path, 2, **_state(2))

    # Assert
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-00001"]
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    assert latest_checkpoint(tmp_path) == first


def test_resaving_a_round_replaces_it_and_leaves_no_old_dir(tmp_path):
    # Prepare
    save_checkpoint(tmp_path, 4, **_state(1))

    # Execute
    path = save_checkpoint(tmp_path, 4, **_state(2))

    # Assert
    assert load_checkpoint(path).extra == _state(2)["extra"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-00004"]


def test_failed_resave_keeps_the_old_round(tmp_path, monkeypatch):
    # Prepare: the rename of the new dir into place fails after the old one was moved aside
    save_checkpoint(tmp_path, 4, **_state(1))
    real_rename = ckpt.os.rename

    def rename(src, dst):
        if ".tmp-" in str(src):
            raise OSError(errno.EIO, "I/O error")
        real_rename(src, dst)

    monkeypatch.setattr(ckpt.os, "rename", rename)

    # Execute
    with pytest.raises(OSError, match="I/O error"):
        save_checkpoint(tmp_path, 4, **_state(2))

    # Assert
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-00004"]
    assert load_checkpoint(tmp_path / "round-00004").extra == _state(1)["extra"]


@pytest.mark.parametrize("round_no", [-1, 1.0, True, "3"])
def test_round_number_must_be_a_non_negative_int(tmp_path, round_no):
    with pytest.raises(CheckpointError, match=rf"'round_no' .* int >= 0\. Got {round_no!r}"):
        save_checkpoint(tmp_path, round_no, **_state())


def test_non_json_rng_state_is_refused_before_anything_lands(tmp_path):
    # Prepare: MT19937 state holds an ndarray, which must not be silently stringified
    state = _state()
    state["rng_state"] = np.random.Generator(np.random.MT19937(0)).bit_generator.state

    # Execute / Assert
    with pytest.raises(CheckpointError, match="JSON-able"):
        save_checkpoint(tmp_path, 0, **state)
    assert list(tmp_path.iterdir()) == []


# ---- hostile or corrupted checkpoints: always a CheckpointError -----------------------------------

def _reseal(text: str) -> str:
    """Give an edited state.json a matching self digest, as a forger would (so the field checks behind
    the digest check are what the test exercises)."""
    try:
        state = json.loads(text)
    except (ValueError, RecursionError):
        return text
    if not isinstance(state, dict):
        return text
    state["self_sha256"] = store.sha256_bytes(ckpt._canonical(state))
    return json.dumps(state)


def _rewrite_state(path, edit) -> None:
    """Edit state.json in place, resealed (the digests of the .npz files stay as they were)."""
    state = json.loads((path / "state.json").read_text())
    (path / "state.json").write_text(_reseal(edit(state) if callable(edit) else edit))


def _forge_npz(path, name: str, members: dict[str, bytes], compression=zipfile.ZIP_STORED) -> None:
    """Replace `name` with an archive of raw members and make state.json vouch for it."""
    with zipfile.ZipFile(path / name, "w", compression) as archive:
        for member, data in members.items():
            archive.writestr(member, data)
    state = json.loads((path / "state.json").read_text())
    state["sha256"][name] = store.sha256_file(path / name)
    (path / "state.json").write_text(_reseal(json.dumps(state)))


def _npy_header(shape, descr="<f8") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


STATE_EDITS = {
    "top level is a list": ("[1, 2]", r"state.json: the top level must be a JSON object, got list"),
    "sha256 is a list": (lambda s: json.dumps({**s, "sha256": []}), r"lacks or mistypes \['sha256'\]"),
    "missing optimizer_scalars": (lambda s: json.dumps({k: v for k, v in s.items() if k != "optimizer_scalars"}),
                                  r"lacks or mistypes \['optimizer_scalars'\]"),
    "round is a string": (lambda s: json.dumps({**s, "round": "3"}), r"lacks or mistypes \['round'\]"),
    "deeply nested": ("[" * 100_000 + "]" * 100_000, r"state.json is not valid JSON"),
    "not UTF-8": ("\udcff".encode("utf-8", "surrogateescape").decode("latin-1"), r"state.json is not valid JSON"),
    "unknown optimizer scalar": (lambda s: json.dumps({**s, "optimizer_scalars": ["nope"]}),
                                 r"optimizer scalar 'nope' is not a 0-d array in optimizer.npz"),
}


@pytest.mark.parametrize("case", sorted(STATE_EDITS))
def test_malformed_state_json_is_a_checkpoint_error_naming_the_field(tmp_path, case):
    # Prepare
    path = save_checkpoint(tmp_path, 1, **_state())
    edit, message = STATE_EDITS[case]
    _rewrite_state(path, edit)

    # Execute / Assert
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)
    if case != "unknown optimizer scalar":  # state.json itself is broken: skipped as torn, not a crash
        assert latest_checkpoint(tmp_path) is None


NPZ_FORGERIES = {
    "shape bomb": ({"enc1.w.npy": _npy_header((2**40,)) + b"\0" * 8},
                   r"header declares shape \(1099511627776,\) of float64 \(8796093022208 bytes\) but 8 bytes follow"),
    "object dtype": ({"enc1.w.npy": _npy_header((1,), "|O") + b"\0" * 8}, r"not a valid .npy array|dtype object is not allowed"),
    "compressed member": ({"enc1.w.npy": _npy_header((1,)) + b"\0" * 8}, r"is compressed, not .npy or over"),
    "not a zip": (None, r"not a readable .npz archive"),
}


@pytest.mark.parametrize("case", sorted(NPZ_FORGERIES))
def test_forged_npz_is_a_checkpoint_error_before_numpy_allocates(tmp_path, case):
    # Prepare
    path = save_checkpoint(tmp_path, 1, **_state())
    members, message = NPZ_FORGERIES[case]
    if members is None:
        (path / "params.npz").write_bytes(b"PK\x03\x04 definitely not a zip")
        _rewrite_state(path, lambda s: json.dumps({**s, "sha256": {**s["sha256"], "params.npz":
                                                                     store.sha256_file(path / "params.npz")}}))
    else:
        compression = zipfile.ZIP_DEFLATED if case == "compressed member" else zipfile.ZIP_STORED
        _forge_npz(path, "params.npz", members, compression)

    # Execute / Assert
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


@pytest.mark.parametrize("edit", [("0.55", "0.56"), ('"round": 2', '"round": 2 ')])
def test_state_json_damaged_in_place_but_still_parseable_is_skipped_and_refused(tmp_path, edit):
    # Prepare: round 2's state.json changed after it was written; it still parses (the second edit
    # only adds a space, so the JSON value is unchanged and must still verify)
    save_checkpoint(tmp_path, 1, **_state(1))
    bad = save_checkpoint(tmp_path, 2, **_state(5))
    text = (bad / "state.json").read_text()
    assert edit[0] in text
    (bad / "state.json").write_text(text.replace(edit[0], edit[1], 1))
    damaged = edit[0] == "0.55"

    # Execute / Assert
    assert latest_checkpoint(tmp_path) == (tmp_path / "round-00001" if damaged else bad)
    if damaged:
        with pytest.raises(CheckpointError, match=r"round-00002: state\.json has sha256 .* damaged or edited"):
            load_checkpoint(bad)
    else:
        assert load_checkpoint(bad).extra == _state(5)["extra"]


def test_state_json_of_another_format_is_refused_with_the_format_this_code_reads(tmp_path):
    # Prepare
    path = save_checkpoint(tmp_path, 1, **_state(1))
    state = (path / "state.json").read_text().replace(f'"format": {ckpt.FORMAT_VERSION}', '"format": 99')
    (path / "state.json").write_text(state)

    # Execute / Assert
    with pytest.raises(CheckpointError, match=rf"format 99; this hetrain reads format {ckpt.FORMAT_VERSION}"):
        load_checkpoint(path)


def test_resave_killed_between_its_two_renames_keeps_the_round_after_cleanup(tmp_path):
    # Prepare: the state a SIGKILL leaves between `final -> .old-…` and `tmp -> final`
    first = save_checkpoint(tmp_path, 4, **_state(1))
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    first.rename(tmp_path / ".old-round-00004-0badc0de")
    torn = tmp_path / ".round-00004.tmp-deadbeef"
    torn.mkdir()
    (torn / "params.npz").write_bytes(b"half")

    # Execute
    cleanup_temp(tmp_path)

    # Assert: the committed round is back, byte for byte; the half-written one is gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-00004"]
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    assert latest_checkpoint(tmp_path) == first and load_checkpoint(first).extra == _state(1)["extra"]
