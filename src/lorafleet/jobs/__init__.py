"""Jobs built on the public API: `lorafleet train` (and its YAML), evaluation, outputs."""
