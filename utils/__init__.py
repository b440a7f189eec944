"""Support package: config schema, presets, the geometry function, errors, I/O, distributed and data helpers."""
