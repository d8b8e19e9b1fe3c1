"""Settings: code defaults -> environment -> explicit override."""

from config.settings import Settings, load_settings

__all__ = ["Settings", "load_settings"]
