"""The `qexport` command line."""
