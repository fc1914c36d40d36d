"""appliance/stream."""
