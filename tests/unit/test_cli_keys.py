"""`appliance keys create`: an expiry in the past is refused with a clear error, no key made."""

from __future__ import annotations

import pytest
from appliance.security.api_keys import ApiKeyStore

from appliance.cli.main import main
from appliance.config import load_settings


@pytest.fixture
def cli(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\n")

    def run(*args: str):
        rc = main(["--config", str(config), *args])
        out = capsys.readouterr()
        return rc, out.out, out.err

    run.settings = load_settings(config)
    return run


@pytest.mark.parametrize("expires", ["2020-01-01", "2020-01-01T00:00:00+00:00"])
def test_an_expiry_in_the_past_is_refused(cli, expires):
    rc, out, err = cli("keys", "create", "alice", "--expires", expires)
    assert rc != 0 and out == ""
    assert "--expires" in err and "is in the past" in err
    assert ApiKeyStore(cli.settings.api_keys_file).records() == []


def test_an_expiry_in_the_future_is_kept(cli):
    rc, out, _ = cli("keys", "create", "alice", "--expires", "2999-01-01")
    assert rc == 0 and "key " in out
    [record] = ApiKeyStore(cli.settings.api_keys_file).records()
    assert record.expires_at.startswith("2999-01-01")
