"""chunkbus.launch: the launch-file loader and process supervisor (the launch issue fills it)."""
