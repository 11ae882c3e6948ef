"""`imagegen batch dlq list|replay|purge` as an operator runs them, on a SQLite state
store whose dead items are made through the queue API (claim, fail past the
attempts); and the HTTP verbs' one-line error when no service answers."""

from __future__ import annotations

import asyncio
import json
import socket

from serve.batch import Batch, open_queue
from serve.cli.main import main

T0 = 1_700_000_000.0


def on_queue(url, fn):
    async def body():
        q = open_queue(url)
        try:
            return await fn(q)
        finally:
            await q.close()

    return asyncio.run(body())


def dead_letter(url, batch_id: str, n: int, attempts: int = 3) -> list[str]:
    """A batch of n items, each failed with retries, then dead-lettered at the last
    attempt, as the worker does."""

    async def body(q):
        ids = await q.create(Batch(id=batch_id, principal="alice", created=T0),
                             [{"prompt": f"a fox {i}", "tier": "draft", "seed": i}
                              for i in range(n)])
        now = T0
        for attempt in range(1, attempts + 1):
            now += 10
            for item in await q.claim("w1", 30, n, now=now):
                retry = now + 1 if attempt < attempts else None
                await q.fail(item.id, item.lease_owner, f"overloaded (attempt {attempt})",
                             retry, now=now)
        return ids

    return on_queue(url, body)


def states(url, batch_id: str) -> dict[str, str]:
    return {i.id: i.state for i in on_queue(url, lambda q: q.items(batch_id))}


def test_dlq_list_replay_purge(state, capsys):
    ids = dead_letter(state, "b1", 3)
    assert set(states(state, "b1").values()) == {"dead"}

    assert main(["batch", "dlq", "list"]) == 0
    out = capsys.readouterr().out
    assert all(i in out for i in ids) and "overloaded (attempt 3)" in out
    assert main(["batch", "dlq", "list", "--limit", "1", "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(x)["id"] for x in lines] == [ids[0]]
    assert json.loads(lines[0])["attempts"] == 3

    assert main(["batch", "dlq", "replay", ids[0]]) == 0
    assert "replayed 1 of 1" in capsys.readouterr().out
    item = on_queue(state, lambda q: q.items("b1"))[0]
    assert (item.state, item.attempts) == ("pending", 0)
    # one named item no longer dead: said, and a non-zero exit
    assert main(["batch", "dlq", "replay", ids[0], ids[1]]) == 1
    assert "replayed 1 of 2 named" in capsys.readouterr().out
    assert states(state, "b1") == {ids[0]: "pending", ids[1]: "pending", ids[2]: "dead"}


def test_purge_all_needs_yes(state, capsys):
    ids = dead_letter(state, "b1", 2)
    assert main(["batch", "dlq", "purge", "--all"]) == 2
    assert "--yes" in capsys.readouterr().err
    assert set(states(state, "b1").values()) == {"dead"}  # nothing deleted

    assert main(["batch", "dlq", "purge", "--all", "--yes"]) == 0
    assert "purged 2 of 2 dead" in capsys.readouterr().out
    assert states(state, "b1") == {i: "purged" for i in ids}
    assert main(["batch", "dlq", "list"]) == 0
    assert "empty" in capsys.readouterr().out
    assert main(["batch", "dlq", "purge", "--all", "--yes"]) == 0
    assert "empty" in capsys.readouterr().out


def test_replay_all_leaves_a_cancelled_batchs_dead_items(state, capsys):
    async def body(q):
        await q.create(Batch(id="b3", principal="alice", created=T0),
                       [{"prompt": "a", "seed": 1}, {"prompt": "b", "seed": 2}])
        first = (await q.claim("w1", 30, 1, now=T0 + 1))[0]
        await q.fail(first.id, first.lease_owner, "bad input", None, now=T0 + 1)
        await q.cancel("b3", now=T0 + 2)  # the second, pending, is cancelled
        return first.id

    dead = on_queue(state, body)
    assert main(["batch", "dlq", "replay", "--all"]) == 0
    out = capsys.readouterr().out
    assert "replayed 0 of 1 dead" in out and "cancelled" in out
    assert states(state, "b3")[dead] == "dead"


def test_no_service_is_one_line_and_exit_2(capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for argv in (["status", "b1"], ["list"], ["cancel", "b1"], ["results", "b1"]):
        assert main(["batch", *argv, "--url", f"http://127.0.0.1:{port}",
                     "--api-key", "x"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"error: cannot reach http://127.0.0.1:"
                                                       f"{port}")
        assert "Traceback" not in err


def test_submit_of_a_missing_file_is_one_line(tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    assert main(["batch", "submit", str(missing), "--url", "http://127.0.0.1:9",
                 "--api-key", "x"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: cannot read {missing}: No such file or directory\n"
