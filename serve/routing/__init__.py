"""Routing: which revision serves each tier, live.

table.py (the document and its validation, pure), breaker.py (per revision,
pure), live.py (what one ingress applies now), sources.py (a watched file or
mounted ConfigMap; the Kubernetes API through kube.py).
"""

from .live import LiveRouting
from .table import (
    BreakerConfig,
    Route,
    RoutingTable,
    load_routing,
    parse_routing,
    parse_routing_text,
)

__all__ = ["BreakerConfig", "LiveRouting", "Route", "RoutingTable", "load_routing",
           "parse_routing", "parse_routing_text"]
