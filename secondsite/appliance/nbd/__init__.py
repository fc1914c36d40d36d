"""appliance/nbd."""
