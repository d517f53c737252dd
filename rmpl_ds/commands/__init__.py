"""The `rmpl-ds` subcommands, one module each (see rmpl_ds.cli for the protocol)."""
