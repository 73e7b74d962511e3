"""``--accel``, ``--qemu`` and ``--accel-cache``: how the commands that start guests choose
(the options `virtman agent`, `vm`, `up` and `bench guests` share; below cli/ and bench/).

The environment is read here, at the command-line boundary, and nowhere below:
``VIRTMAN_QEMU`` names the QEMU binary (default ``qemu-system-x86_64``; tests point it
at a wrapper), ``XDG_CACHE_HOME`` places the KVM verdict cache.
"""

from __future__ import annotations

import argparse
import os

from virtman.hypervisor.qemu import QEMU, Accel, HypervisorSettings, default_verdict_cache

ACCEL_CHOICES = [a.value for a in Accel]
ACCEL_HELP = (
    "auto: KVM only where a Linux kernel is seen to boot under it (probed once per host "
    "and kernel, cached), else TCG; kvm or tcg: as said. A guest silent under KVM is "
    "restarted under TCG once"
)


def add_accel_option(p: argparse.ArgumentParser, *, default: str | None = "auto") -> None:
    p.add_argument(
        "--accel",
        choices=ACCEL_CHOICES,
        default=default,
        help=f"{ACCEL_HELP} (default {default})" if default else f"{ACCEL_HELP} (default: "
        "the agent's --accel)",
    )


def add_hypervisor_options(p: argparse.ArgumentParser) -> None:
    """``--accel`` (default auto), ``--qemu`` and ``--accel-cache``."""
    add_accel_option(p)
    p.add_argument(
        "--qemu",
        default=os.environ.get("VIRTMAN_QEMU") or QEMU,
        metavar="PATH",
        help=f"the QEMU binary (default $VIRTMAN_QEMU or {QEMU})",
    )
    p.add_argument(
        "--accel-cache",
        default=default_verdict_cache(dict(os.environ)),
        metavar="FILE",
        help="where --accel auto keeps its verdicts (default "
        "$XDG_CACHE_HOME/virtman/accel.json, else ~/.cache/virtman/accel.json)",
    )


def hypervisor_settings(args: argparse.Namespace) -> HypervisorSettings:
    return HypervisorSettings(
        qemu=args.qemu, accel=Accel(args.accel), verdict_cache=args.accel_cache
    )
