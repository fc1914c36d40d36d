"""appliance/journal."""
