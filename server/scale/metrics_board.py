"""Every replica's Prometheus metrics in one place, labelled by replica rank, for the ingress's `/metrics`.

Replicas push their registry's text every few seconds (server/scale/replica.py); the board keeps the latest per
rank and forgets a rank that has gone quiet (a replica that died or was scaled down).
"""

from __future__ import annotations

import time

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

STALE_S = 15.0


class MetricsBoard:
    """A Serve deployment of one replica, no CPU reserved."""

    def __init__(self) -> None:
        self._texts: dict[int, tuple[float, str]] = {}

    def put(self, rank: int, text: str) -> None:
        self._texts[rank] = (time.monotonic(), text)

    def collect(self) -> dict[int, str]:
        now = time.monotonic()
        self._texts = {r: (t, text) for r, (t, text) in self._texts.items() if now - t < STALE_S}
        return {r: text for r, (_, text) in self._texts.items()}


# What the ingress itself measures (HTTP statuses, audio decoding); every other family is the replicas' (image
# preprocessing too: the ingress only checks an image, the replica it lands on prepares it).
INGRESS_FAMILIES = frozenset({"vlmserve:http_requests", "vlmserve:audio_preprocess_seconds"})


def merged(ingress: str, texts: dict[int, str]) -> str:
    """The ingress's own families unlabelled, then every replica's, each sample with a `replica` label, as one
    exposition text (HELP and TYPE once per family)."""
    families: dict[str, tuple[str, str, list[Sample]]] = {}
    for family in text_string_to_metric_families(ingress):
        if family.name in INGRESS_FAMILIES:
            families[family.name] = (family.type, family.documentation, list(family.samples))
    for rank, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text):
            if family.name in INGRESS_FAMILIES:
                continue
            entry = families.setdefault(family.name, (family.type, family.documentation, []))
            entry[2].extend(s._replace(labels={**s.labels, "replica": str(rank)}) for s in family.samples)
    lines: list[str] = []
    for name, (kind, doc, samples) in families.items():
        exposed = f"{name}_total" if kind == "counter" else name  # as prometheus_client writes (its parser strips it)
        lines += [f"# HELP {exposed} {doc}", f"# TYPE {exposed} {kind}"]
        for s in samples:
            labels = ",".join(f'{k}="{_escape(v)}"' for k, v in s.labels.items())
            lines.append(f"{s.name}{{{labels}}} {_number(s.value)}")
    return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    return repr(float(value)) if value not in (float("inf"), float("-inf")) else ("+Inf" if value > 0 else "-Inf")
