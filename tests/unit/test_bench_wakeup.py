"""`pvpn bench --sections wakeup`: the event loops' cost per wake-up, measured for real (two
processes, a unix socketpair), and its table in the report."""

from __future__ import annotations

from pvpn.cli.bench import report, wakeup


def test_every_loop_is_measured_in_its_own_interpreter() -> None:
    records = wakeup.measure(200)
    assert [r["loop"] for r in records] == list(wakeup.LOOPS)
    for record in records:
        assert "error" not in record, record
        # 200 round trips between two processes: more than nothing, less than a second each
        assert 0 < record["round_trip"] < 1.0


def test_the_report_shows_each_loop_per_wake_up_and_over_the_floor() -> None:
    results = {"wakeup": [
        {"loop": "blocking", "repeat": 0, "round_trip": 14e-6},
        {"loop": "asyncio", "repeat": 0, "round_trip": 80e-6},
        {"loop": "asyncio", "repeat": 1, "round_trip": 84e-6},
        {"loop": "uvloop", "repeat": 0, "round_trip": 22e-6},
        {"loop": "uvloop", "repeat": 1, "round_trip": "garbage"},
    ]}
    summary = report.summarize(results)
    assert summary["wakeup"]["asyncio"]["median"] == 82e-6
    assert summary["wakeup"]["uvloop"]["median"] == 22e-6  # the unusable record is left out
    text = report.render(results, summary)
    rows = {line.split()[0]: line.split() for line in text.splitlines()
            if line.split() and line.split()[0] in wakeup.LOOPS}
    # asyncio: 82 us a round trip, 41 us a wake-up, (82 - 14) / 2 = 34 us over blocking
    assert rows["asyncio"][1:] == ["82us", "41us", "34us"], rows
    assert rows["uvloop"][1:] == ["22us", "11us", "4us"], rows


def test_no_wakeup_records_no_table() -> None:
    assert "Wake-ups" not in report.render({}, report.summarize({}))
