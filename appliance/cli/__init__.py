"""The `appliance` command line: one module per subcommand group."""
