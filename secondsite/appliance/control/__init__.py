"""appliance/control."""
