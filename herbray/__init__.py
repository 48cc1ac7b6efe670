"""herbray: identify plant species on digitized herbarium specimens, at archive scale, on Ray."""

__version__ = "0.1.0"
