"""Volt, the coordinator: image registry, relay trees, heartbeats and repair."""
