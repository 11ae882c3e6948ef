"""How an answer counts, and the SLO verdict over locust's own stats.

Stats entries are named by tier: `draft` holds the tier's answered requests and its
failures; an expected refusal (429: the caller's budget or fair share; 503: no
capacity now, with Retry-After) is a success under its own name, `draft 429`, so it
neither fails the run nor hides in the tier's latency. `evaluate` is a pure function
of a `locust.stats.RequestStats`: the quitting listener calls it, the unit tests feed
it requests logged with `stats.log_request` / `log_error`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

EXPECTED_STATUSES = (429, 503)
# gRPC statuses with the same meaning (serve/errors.py's table): quota and fair
# share are RESOURCE_EXHAUSTED; no capacity UNAVAILABLE, a model timeout
# DEADLINE_EXCEEDED (both 503 on HTTP).
GRPC_EXPECTED = {"RESOURCE_EXHAUSTED": 429, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 503}


def outcome(status: int) -> str:
    """`ok` (2xx), `refused` (an expected 429 or 503) or `failed` (anything else,
    0 for no answer)."""
    if 200 <= status < 300:
        return "ok"
    return "refused" if status in EXPECTED_STATUSES else "failed"


def grpc_refusal(code: str, service_code: str | None) -> int | None:
    """The HTTP status (429, 503) a gRPC error stands for when it is an expected
    refusal, else None. Only when the service itself answered (its `imagegen-code`
    trailer): a refused connection is UNAVAILABLE too, and the client's own deadline
    DEADLINE_EXCEEDED, and both are failures."""
    return GRPC_EXPECTED.get(code) if service_code else None


def entry_name(tier: str, status: int | None = None) -> str:
    """The stats name of a request: its tier, plus the status for a refusal."""
    return tier if status is None or outcome(status) != "refused" else f"{tier} {status}"


def parse_name(name: str) -> tuple[str, int | None]:
    """entry_name's inverse: (tier, refusal status or None)."""
    tier, _, status = name.partition(" ")
    return (tier, int(status)) if status.isdigit() else (name, None)


@dataclass(frozen=True)
class Slo:
    p95_ms: dict[str, float] = field(default_factory=dict)  # tier -> bound; absent: unchecked
    max_fail_ratio: float = 0.01


@dataclass
class TierSummary:
    requests: int = 0  # answered plus failed; refusals are counted apart
    failures: int = 0
    p50_ms: float | None = None
    p95_ms: float | None = None
    refused: dict[int, int] = field(default_factory=dict)  # status -> count


@dataclass
class Check:
    what: str
    limit: float
    measured: float | None  # None: nothing to measure
    ok: bool
    op: str = "<="  # how measured must compare with limit


@dataclass
class Report:
    checks: list[Check]
    tiers: dict[str, TierSummary]
    requests: int
    failures: int
    entries: list[dict] = field(default_factory=list)  # per stats entry, for the table

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "requests": self.requests, "failures": self.failures,
                "checks": [asdict(c) for c in self.checks],
                "tiers": {t: asdict(s) for t, s in self.tiers.items()},
                "entries": self.entries}


def tier_entries(stats) -> dict[str, object]:
    """Per tier, one StatsEntry merging that tier's own entries over every request
    type (transport), refusals left out."""
    from locust.stats import StatsEntry

    merged: dict[str, StatsEntry] = {}
    for entry in stats.entries.values():
        tier, refused = parse_name(entry.name)
        if refused is None:
            merged.setdefault(tier, StatsEntry(stats, tier, "")).extend(entry)
    return merged


def summarise(stats) -> dict[str, TierSummary]:
    tiers = {}
    for tier, e in tier_entries(stats).items():
        answered = e.num_requests - e.num_none_requests
        tiers[tier] = TierSummary(
            e.num_requests, e.num_failures,
            e.get_response_time_percentile(0.5) if answered else None,
            e.get_response_time_percentile(0.95) if answered else None)
    for entry in stats.entries.values():
        tier, refused = parse_name(entry.name)
        if refused is not None:
            s = tiers.setdefault(tier, TierSummary())
            s.refused[refused] = s.refused.get(refused, 0) + entry.num_requests
    return tiers


def evaluate(stats, slo: Slo, exceptions: int = 0) -> Report:
    """The verdict: each tier's p95 under its bound (a bound on a tier with no
    answered request fails: nothing was shown), the failure ratio over every request
    (refusals included) at most max_fail_ratio, at least one request, and no
    exception raised in a user's code."""
    tiers = summarise(stats)
    total, failures = stats.total.num_requests, stats.total.num_failures
    checks = [Check("requests", 1, total, total >= 1, ">=")]
    ratio = failures / total if total else None
    checks.append(Check("fail_ratio", slo.max_fail_ratio, ratio,
                        ratio is not None and ratio <= slo.max_fail_ratio))
    for tier, bound in sorted(slo.p95_ms.items()):
        p95 = tiers[tier].p95_ms if tier in tiers else None
        checks.append(Check(f"p95_ms[{tier}]", bound, p95, p95 is not None and p95 <= bound))
    if exceptions:
        checks.append(Check("user_exceptions", 0, exceptions, False))
    return Report(checks, tiers, total, failures, table(stats))


def table(stats) -> list[dict]:
    """Per stats entry (transport and name): counts, p50/p95/p99 and requests/s."""
    rows = []
    for e in sorted(stats.entries.values(), key=lambda e: (e.method, e.name)):
        answered = e.num_requests - e.num_none_requests
        pct = {f"p{round(q * 100)}_ms": e.get_response_time_percentile(q) if answered else None
               for q in (0.5, 0.95, 0.99)}
        rows.append({"type": e.method, "name": e.name, "requests": e.num_requests,
                     "failures": e.num_failures, **pct, "rps": round(e.total_rps, 3)})
    return rows


def describe(report: Report) -> list[str]:
    """One line per check, for the log."""
    lines = []
    for c in report.checks:
        got = "none" if c.measured is None else f"{c.measured:.4g}"
        lines.append(f"SLO {c.what}: {got} (want {c.op} {c.limit:g}) "
                     f"{'ok' if c.ok else 'MISSED'}")
    return lines
