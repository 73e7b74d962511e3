"""The ``virtman`` command line: one module per subcommand."""
