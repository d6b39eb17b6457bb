"""The bottom layer: config schema, errors, atomic storage, strict array readers, failpoints."""
