"""The `vitscale` command line: a thin layer over the library (main), its run-config flags
generated from the dataclasses (flags) and its tables (tables)."""
