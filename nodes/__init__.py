"""chunkbus.nodes: one module per node, and the `chunkbus` command line (cli.py)."""
