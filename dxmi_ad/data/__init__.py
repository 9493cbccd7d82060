"""Data sets and readers: image folders (MVTec layout), embedded textures, feature files, tables."""
