"""Presence tracking per topic, multi-node, with aggregate counts (built on `realtime`)."""
