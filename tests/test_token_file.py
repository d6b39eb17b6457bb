"""The bearer token file: made once with mode 0600, and refused when others can read it or it is malformed."""

import stat

import pytest

from hetrain.core.errors import ConfigError
from hetrain.mpc_ops.reveal.token_file import create_token, read_token


def test_create_token_writes_a_random_token_readable_by_the_owner_only(tmp_path):
    # Prepare
    first, second = tmp_path / "a" / "kh.token", tmp_path / "b.token"

    # Execute
    created = create_token(first), create_token(second)

    # Assert
    assert created == (True, True)
    assert stat.S_IMODE(first.stat().st_mode) == 0o600
    assert len(read_token(first)) >= 43 and read_token(first) != read_token(second)


def test_create_token_keeps_an_existing_token(tmp_path):
    # Prepare
    path = tmp_path / "kh.token"
    create_token(path)
    before = path.read_text()

    # Execute
    created = create_token(path)

    # Assert
    assert created is False and path.read_text() == before


def test_token_file_that_others_can_read_is_refused_with_the_fix(tmp_path):
    # Prepare
    path = tmp_path / "kh.token"
    create_token(path)
    path.chmod(0o644)

    # Execute / Assert
    with pytest.raises(ConfigError, match=rf"token file {path} has mode 0644; .*run `chmod 600 {path}`"):
        read_token(path)


def test_missing_token_file_names_the_command_that_makes_one(tmp_path):
    with pytest.raises(ConfigError, match=r"does not exist; create one with `hetrain key-holder token .*nope.token`"):
        read_token(tmp_path / "nope.token")


@pytest.mark.parametrize("content", ["short", "has spaces in it but is long enough to pass the length", ""])
def test_malformed_token_is_refused(tmp_path, content):
    # Prepare
    path = tmp_path / "kh.token"
    path.write_text(content)
    path.chmod(0o600)

    # Execute / Assert
    with pytest.raises(ConfigError, match=r"must hold one token of 32 to 512 URL-safe characters"):
        read_token(path)
