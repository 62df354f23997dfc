"""Parse a Prometheus text exposition (stdin) with the official client's parser (run by
tests/operations.rs); print every sample as JSON: {"name{label=value,...}": value}.

Fails (exit 1) on anything the parser refuses, and on a family without HELP or TYPE."""
import json
import sys

from prometheus_client.parser import text_string_to_metric_families

samples = {}
for family in text_string_to_metric_families(sys.stdin.read()):
    assert family.documentation, f"{family.name}: no HELP"
    assert family.type != "unknown", f"{family.name}: no TYPE"
    for s in family.samples:
        labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
        samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
json.dump(samples, sys.stdout)
