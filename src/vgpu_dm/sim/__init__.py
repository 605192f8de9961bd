"""The simulated host: a sysfs-shaped tree built from the GPU catalog, and the driver's reaction to writes."""
