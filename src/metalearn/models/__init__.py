"""metalearn.models."""
