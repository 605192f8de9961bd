"""Everything that reads or changes the machine, through one host-root object."""
