"""Event ingest, attribution and signed links, K-factor and growth analytics, experiments, guardrails."""
