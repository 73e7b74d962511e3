"""virtman: boot many VMs from one base image, fetched lazily and relayed host to host.

The package layout follows the architecture (see docs/architecture.md):

- ``protocol``: pure codecs (NBD wire protocol, NBD URIs); no I/O.
- ``blockdev``: the block device layer; every device answers one async interface.
- ``nbd``: asyncio NBD server and client built on the codec.
- ``cli``: the ``virtman`` command.
- ``bench``: benchmarks that print figures.
"""

from __future__ import annotations

__version__ = "0.1.0"
