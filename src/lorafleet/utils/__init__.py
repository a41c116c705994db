"""Small helpers with no lorafleet imports (usable from every layer)."""
