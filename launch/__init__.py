"""chunkbus.launch: launch files, the process supervisor and its output, and starting one node process."""
