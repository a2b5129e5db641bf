"""metalearn.engines."""
