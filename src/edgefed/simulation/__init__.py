"""N virtual devices on one machine, running the same library code as real devices."""
