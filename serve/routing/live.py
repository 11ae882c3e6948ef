"""The routing an ingress replica applies now: the last good document, each
revision's readiness and breaker, and what /v1/routing shows. No Ray; the ingress
feeds it (documents from a source, readiness from the model deployments) and the
service asks it where to send a tier and tells it how each call went."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import Any

from ..errors import ConfigError
from ..lockfile import Lock
from .breaker import Breaker, State
from .table import RoutingTable, parse_routing_text

log = logging.getLogger("imagegen.routing")


class LiveRouting:
    def __init__(self, table: RoutingTable, lock: Lock, origin: str, *, metrics=None,
                 clock: Callable[[], float] = time.monotonic,
                 draw: Callable[[], float] = random.random) -> None:
        self.lock = lock
        self.metrics = metrics
        self.clock = clock
        self.draw = draw
        self.ready: dict[str, tuple[bool, str | None]] = {}
        self.breakers: dict[str, Breaker] = {}
        self.error: str | None = None  # the last document refused, and why
        self.source_error: str | None = None  # the source cannot be read now, and why
        self.source = origin
        self._set(table, origin)

    # --- the document -------------------------------------------------------

    def apply_text(self, text: str, origin: str) -> bool:
        """Apply a new document; an invalid one is refused (the last good one stays),
        logged and counted. True when applied."""
        try:
            table = parse_routing_text(text, self.lock, origin=origin)
        except ConfigError as e:
            self.error = e.message
            log.error("routing document refused, keeping version %d: %s",
                      self.table.version, e.message)
            if self.metrics is not None:
                self.metrics.inc("imagegen_routing_config_errors_total", 1, source=self.kind)
            return False
        if table != self.table:
            self._set(table, origin)
        self.error = self.source_error = None
        return True

    def unreachable(self, message: str) -> None:
        """The source cannot be read now: keep what is applied, say why."""
        self.source_error = message

    def reachable(self) -> None:
        """The source answers again (its document may be unchanged)."""
        self.source_error = None

    def _set(self, table: RoutingTable, origin: str) -> None:
        self.table = table
        self.origin = origin
        self.applied_at = time.time()
        for model in table.routed_models():
            b = self.breakers.setdefault(model, Breaker(table.breaker))
            b.config = table.breaker
        log.info("routing version %d applied from %s", table.version, origin)
        self._publish()

    @property
    def kind(self) -> str:
        return self.source.split(" ", 1)[0]

    # --- readiness and outcomes --------------------------------------------

    def set_ready(self, model: str, ready: bool, reason: str | None = None) -> None:
        if self.ready.get(model) != (ready, reason):
            self.ready[model] = (ready, reason)
            self._publish()

    def candidates(self, tier: str) -> list[str]:
        """The tier's revisions in the order to try (UnknownTier, TierDisabled)."""
        return self.table.route(tier).candidates(self.draw())

    def is_ready(self, model: str) -> bool:
        return self.ready.get(model, (True, None))[0]  # unknown yet: let it try

    def likely(self, order: list[str]) -> str:
        """The revision of `order` a request will most likely reach: the first ready
        one whose breaker is not open (asks nothing of the breaker), else the first."""
        for model in order:
            b = self.breakers.get(model)
            if self.is_ready(model) and (b is None or b.state is not State.OPEN):
                return model
        return order[0]

    def allow(self, model: str) -> bool:
        """Ready and its breaker lets a request through (a half-open yes is a probe:
        record its outcome)."""
        return self.is_ready(model) and self._breaker(model).allow(self.clock())

    def record(self, model: str, ok: bool) -> None:
        b = self._breaker(model)
        before = b.state
        b.record(ok, self.clock())
        if b.state is not before:
            log.warning("breaker of %s: %s -> %s", model, before.name, b.state.name)
            self._publish()

    def release(self, model: str) -> None:
        """The request `allow` let through ended without an outcome."""
        self._breaker(model).release()

    def _breaker(self, model: str) -> Breaker:
        return self.breakers.setdefault(model, Breaker(self.table.breaker))

    def tier_ready(self, tier: str) -> bool:
        route = self.table.tiers[tier]
        return route.disabled is None and any(self.is_ready(m) for m in route.candidates(0.0))

    def on_fallback(self, tier: str) -> bool:
        """The tier's primary is switched off, not ready or its breaker is open."""
        route = self.table.tiers[tier]
        b = self.breakers.get(route.model)
        return (route.force_fallback or not self.is_ready(route.model)
                or (b is not None and b.state is State.OPEN))

    def _publish(self) -> None:
        if self.metrics is None:
            return
        for tier in self.table.tiers:
            self.metrics.set("imagegen_fallback_active", float(self.on_fallback(tier)), tier=tier)
        for model, b in self.breakers.items():
            entry = self.lock.models.get(model)
            if entry is not None:
                self.metrics.set("imagegen_breaker_state", float(b.state), model=model,
                                 revision=entry.revision)

    def snapshot(self) -> dict[str, Any]:
        """What GET /v1/routing shows."""
        t = self.table
        return {
            "version": t.version, "source": self.source, "origin": self.origin,
            "applied_at": self.applied_at, "error": self.error,
            "source_error": self.source_error,
            "document": t.model_dump(mode="json"),
            "tiers": {name: {"primary": r.model, "fallbacks": r.fallbacks,
                             "force_fallback": r.force_fallback, "disabled": r.disabled,
                             "on_fallback": self.on_fallback(name), "ready": self.tier_ready(name)}
                      for name, r in t.tiers.items()},
            "revisions": {m: {"ready": self.is_ready(m), "reason": self.ready.get(m, (1, None))[1],
                              "breaker": self._breaker(m).state.name.lower()}
                          for m in t.routed_models()},
        }
