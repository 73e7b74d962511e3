"""Whole clusters on one machine: ``LocalCluster`` and ``virtman up``."""
