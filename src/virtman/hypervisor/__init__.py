"""Hypervisor glue: QEMU guests and libvirt domains on VM snapshot exports."""
