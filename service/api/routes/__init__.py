"""One router per resource: caption, adapters, health (plus the try-it page)."""
