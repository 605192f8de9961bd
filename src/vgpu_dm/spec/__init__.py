"""The config file (v1): parse, validate with located errors, select a named config."""

from vgpu_dm.spec.loader import MAX_CONFIG_BYTES, load_spec, read_config_source
from vgpu_dm.spec.model import ConfigEntry, Spec

__all__ = ["MAX_CONFIG_BYTES", "ConfigEntry", "Spec", "load_spec", "read_config_source"]
