"""`imagegen keys` and `imagegen quota` as an operator runs them, on a SQLite state
store."""

from __future__ import annotations

import asyncio
import re

import pytest
import yaml

from serve.cli.main import main
from serve.quotas.auth import Authenticator
from serve.quotas.keys import open_keys


def test_create_list_revoke_a_key_that_authenticates_until_revoked(state, capsys):
    assert main(["keys", "create", "team-search", "--role", "user", "--role", "reviewer",
                 "--plan", "drafts-only"]) == 0
    out = capsys.readouterr().out
    key = re.search(r"ig_[a-z0-9]{12}_\S+", out).group(0)
    key_id = key.split("_")[1]
    auth = Authenticator(open_keys(state), ttl_s=0)
    who = asyncio.run(auth.authenticate(f"Bearer {key}"))
    assert (who.name, who.plan, who.has("reviewer")) == ("team-search", "drafts-only", True)
    assert main(["keys", "list"]) == 0
    listed = capsys.readouterr().out
    assert key_id in listed and "active" in listed and key not in listed
    assert main(["keys", "revoke", key_id]) == 0
    assert main(["keys", "revoke", "nosuchkey000"]) == 1
    capsys.readouterr()
    assert main(["keys", "list", "--json"]) == 0
    assert '"revoked": null' not in capsys.readouterr().out


def test_file_entry_stores_nothing_and_prints_a_valid_keys_file(state, capsys, tmp_path):
    from serve.quotas.keys import FileKeys

    assert main(["keys", "create", "ci-bot", "--file-entry"]) == 0
    out = capsys.readouterr().out
    path = tmp_path / "keys.yaml"
    path.write_text(out.split("entry for the keys file:\n", 1)[1])
    assert len(FileKeys(path).by_hash) == 1
    assert yaml.safe_load(path.read_text())["keys"][0]["principal"] == "ci-bot"
    assert asyncio.run(open_keys(state).list()) == []


def test_quota_grant_and_show(state, capsys):
    assert main(["keys", "create", "alice", "--plan", "drafts-only"]) == 0
    assert main(["quota", "grant", "alice", "5"]) == 0
    assert main(["quota", "show", "alice"]) == 0
    out = capsys.readouterr().out
    assert "credits now 5" in out and "bucket    10 of 10" in out and "of 500" in out
    with pytest.raises(SystemExit, match="no active key"):
        main(["quota", "show", "bob"])


@pytest.mark.parametrize(("args", "says"), [
    (["bad name"], "principal: String should match pattern"),
    (["x" * 129], "principal"),
    (["alice", "--plan", "nosuch"], "plan 'nosuch' is not in"),
])
def test_create_refuses_a_bad_name_or_an_unknown_plan_and_stores_nothing(state, capsys, args,
                                                                         says):
    assert main(["keys", "create", *args]) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err
    assert asyncio.run(_listed(state)) == []


async def _listed(url):
    store = open_keys(url)
    try:
        return await store.list()
    finally:
        await store.close()
