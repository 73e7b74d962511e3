"""The compute agent (VirtMan Compute): cache group, image relays, VMs, VM API."""
