"""Pure protocol code: codecs and parsers that import no sockets, files or asyncio."""
